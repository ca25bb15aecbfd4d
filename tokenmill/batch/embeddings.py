"""OpenAI's embeddings request and response, shared by batch files (`/v1/embeddings` lines) and the
server's `POST /v1/embeddings`.

A body asks for k inputs (a string, a list of strings, a list of token ids or a list of token-id
lists); each becomes one engine request, and the k outputs make one response, in input order. A
request fails as a whole: the first input (by index) that failed on its own names itself in the
message ("input[3]: ..."). Unknown fields are refused rather than ignored, since any of them could
be meant to change the vectors.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tokenmill.errors import RequestError
from tokenmill.outputs import EmbeddingRequestOutput
from tokenmill.pooling_params import PoolingParams

if TYPE_CHECKING:
    from tokenmill.frontend import Frontend

EMBEDDINGS_URL = "/v1/embeddings"
MAX_INPUTS = 2048  # OpenAI's limit on one request's inputs
ENCODING_FORMATS = ("float", "base64")
# Fields that change nothing in the vectors: `model` (batch lines run the job's model; the server
# checks it) and `user`. `truncate_prompt_tokens` and `normalize` are vLLM's extensions.
ACCEPTED_FIELDS = {"input", "model", "user", "encoding_format", "dimensions", "truncate_prompt_tokens", "normalize"}
INPUT_FORMS = "a non-empty string, a list of strings, a list of token ids or a list of token-id lists"


@dataclass(frozen=True)
class EmbeddingRequest:
    """What an embeddings body asks for: its inputs, in order, and how to pool and encode them."""

    inputs: list[str | list[int]]
    params: PoolingParams
    encoding_format: str  # "float" or "base64"


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _inputs(value: Any) -> list[str | list[int]]:
    if value == "" or value == []:
        raise RequestError("invalid_value", "body.input must not be empty", "input")
    if isinstance(value, str):
        inputs: list[str | list[int]] = [value]
    elif _is_token_ids(value) and value:
        inputs = [value]
    elif isinstance(value, list) and (all(isinstance(v, str) for v in value) or all(map(_is_token_ids, value))):
        inputs = list(value)
    else:
        raise RequestError("invalid_type", f"body.input must be {INPUT_FORMS}", "input")
    if len(inputs) > MAX_INPUTS:
        raise RequestError("invalid_value", f"body.input has {len(inputs)} inputs; at most {MAX_INPUTS} are allowed",
                           "input")
    for i, one in enumerate(inputs):
        if not one:
            raise RequestError("invalid_value", f"body.input[{i}] is empty", "input")
    return inputs


def parse_embedding_body(body: Any) -> EmbeddingRequest:
    """Checks an embeddings request body; raises RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError("invalid_body", "body must be a JSON object")
    unknown = sorted(set(body) - ACCEPTED_FIELDS)
    if unknown:
        raise RequestError("unsupported_parameter", f"body.{unknown[0]} is not supported by {EMBEDDINGS_URL} "
                                                    f"(accepted: {', '.join(sorted(ACCEPTED_FIELDS))})", unknown[0])
    inputs = _inputs(body.get("input"))
    encoding_format = body.get("encoding_format")
    if encoding_format is None:
        encoding_format = "float"
    elif encoding_format not in ENCODING_FORMATS:
        raise RequestError("invalid_value", f"body.encoding_format must be float or base64, got "
                                            f"{json.dumps(encoding_format)}", "encoding_format")
    try:
        params = PoolingParams(dimensions=body.get("dimensions"), normalize=body.get("normalize"),
                               truncate_prompt_tokens=body.get("truncate_prompt_tokens"))
    except ValueError as e:  # the message starts with the field's name
        raise RequestError("invalid_value", f"body.{e}", str(e).split()[0]) from None
    return EmbeddingRequest(inputs, params, encoding_format)


def check_task(frontend: Frontend, url: str) -> None:
    """Raises RequestError (param "model") if the loaded model cannot serve url: an embedding model
    answers only /v1/embeddings, a generative one everything else."""
    embeds = frontend.task == "embed"
    if embeds != (url == EMBEDDINGS_URL):
        does = "embeds" if embeds else "generates"
        raise RequestError("wrong_task", f"model {frontend.model_name} {does} text; it cannot serve {url}", "model")


def tokenize_inputs(frontend: Frontend, request: EmbeddingRequest) -> list[tuple[str | None, list[int]]]:
    """Each input's text (None for token ids) and token ids, truncated as the request asks."""
    truncate, count = request.params.truncate_prompt_tokens, len(request.inputs)
    prepared = []
    for i, one in enumerate(request.inputs):
        try:
            prepared.append(frontend.tokenize(one, truncate))
        except RequestError as e:
            raise input_error(e, i, count) from None
    return prepared


def input_error(error: RequestError, index: int, count: int) -> RequestError:
    """An input's own failure as the whole request's: named by its index if the request has several
    inputs and the error is about the input (not, say, about `dimensions`)."""
    if error.param not in ("prompt", "input"):
        return error
    message = f"input[{index}]: {error.message}" if count > 1 else error.message
    return RequestError(error.code, message, "input")


def first_failure(outputs: Sequence[EmbeddingRequestOutput]) -> RequestError | None:
    """What the request as a whole fails with: an internal error if any input had one (nothing of
    the request is done, so it can run again), else the lowest-indexed input's own error."""
    failed = [(i, o.error) for i, o in enumerate(outputs) if o.error is not None]
    for _, error in failed:
        if error.internal:
            return error
    if not failed:
        return None
    index, error = failed[0]
    return input_error(error, index, len(outputs))


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    # NOTE: little-endian float32 bytes, what the official client decodes (np.frombuffer(..., "float32")).
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def prompt_tokens(outputs: Sequence[EmbeddingRequestOutput]) -> int:
    return sum(len(o.prompt_token_ids) for o in outputs)


def embedding_response(outputs: Sequence[EmbeddingRequestOutput], encoding_format: str, model: str) -> dict[str, Any]:
    """The `list` of `embedding` objects, in input order, with usage. Every output has succeeded."""
    data = []
    for i, output in enumerate(outputs):
        assert output.outputs is not None
        data.append({"object": "embedding", "index": i, "embedding": _encode(output.outputs.embedding,
                                                                              encoding_format)})
    tokens = prompt_tokens(outputs)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
