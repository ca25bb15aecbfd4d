"""The OpenAI endpoints tokenmill serves, one class each (see base.py for what they share), found
by url by every face: batch files, the server, Ray replicas."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenmill.endpoints.base import Call, Endpoint, Prompt, Streamer
from tokenmill.endpoints.chat import CHAT_URL, ChatCompletions
from tokenmill.endpoints.completions import COMPLETIONS_URL, Completions
from tokenmill.endpoints.embeddings import EMBEDDINGS_URL, Embeddings
from tokenmill.endpoints.responses import RESPONSES_URL, Responses
from tokenmill.errors import RequestError

if TYPE_CHECKING:
    from tokenmill.frontend import Frontend

ENDPOINTS: dict[str, Endpoint] = {e.url: e for e in (ChatCompletions(), Completions(), Embeddings(), Responses())}
URLS = tuple(ENDPOINTS)

__all__ = ["CHAT_URL", "COMPLETIONS_URL", "EMBEDDINGS_URL", "ENDPOINTS", "RESPONSES_URL", "URLS", "Call", "Endpoint",
           "Prompt", "Streamer", "check_task"]


def check_task(frontend: Frontend, endpoint: Endpoint) -> None:
    """Raises RequestError (param "model") if the loaded model cannot serve the endpoint: an
    embedding model answers only /v1/embeddings, a generative one everything else."""
    if frontend.task != endpoint.task:
        does = "embeds" if frontend.task == "embed" else "generates"
        raise RequestError("wrong_task", f"model {frontend.model_name} {does} text; it cannot serve {endpoint.url}",
                           "model")
