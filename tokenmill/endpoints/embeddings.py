"""`/v1/embeddings`: OpenAI's embeddings request and response, in batch files and the server.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tokenmill.endpoints.base import Call, Endpoint, check_fields
from tokenmill.errors import RequestError
from tokenmill.outputs import EmbeddingRequestOutput, EngineOutput
from tokenmill.pooling_params import PoolingParams

if TYPE_CHECKING:
    from tokenmill.frontend import Frontend

EMBEDDINGS_URL = "/v1/embeddings"
MAX_INPUTS = 2048  # OpenAI's limit on one request's inputs
ENCODING_FORMATS = ("float", "base64")
# `truncate_prompt_tokens` and `normalize` are vLLM's extensions.
USED_FIELDS = frozenset({"input", "encoding_format", "dimensions", "truncate_prompt_tokens", "normalize"})
INPUT_FORMS = "a non-empty string, a list of strings, a list of token ids or a list of token-id lists"


@dataclass
class EmbeddingCall(Call):
    """What an embeddings body asks for: its inputs, in order, and how to encode the vectors."""

    inputs: list[str | list[int]] = field(default_factory=list)
    encoding_format: str = "float"  # or "base64"


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


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    # NOTE: little-endian float32 bytes, what the official client decodes (np.frombuffer(..., "float32")).
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


class Embeddings(Endpoint):
    url = EMBEDDINGS_URL
    task = "embed"
    id_prefix = "embd"  # OpenAI leaves embedding responses unnamed
    prompt_field = "input"
    # NOTE: embeddings keep input order: with no KV cache there is no prefix to share, and the
    # engine packs whole prompts without padding, first fit, so its steps run full in any order.
    prefix_ordered = False

    def parse(self, body: Any) -> EmbeddingCall:
        if not isinstance(body, dict):
            raise RequestError("invalid_body", "body must be a JSON object")
        check_fields(body, self.url, USED_FIELDS)
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
        return EmbeddingCall(body, params, inputs=inputs, encoding_format=encoding_format)

    def prepare(self, frontend: Frontend, call: Call) -> None:
        """Each input's text (None for token ids) and token ids, truncated as the request asks."""
        assert isinstance(call, EmbeddingCall) and isinstance(call.params, PoolingParams)
        truncate, count = call.params.truncate_prompt_tokens, len(call.inputs)
        prompts = []
        for i, one in enumerate(call.inputs):
            try:
                prompts.append(frontend.tokenize(one, truncate))
            except RequestError as e:
                raise self.prompt_error(e, i, count) from None
        call.prompts = prompts

    def respond(self, call: Call, outputs: Sequence[EngineOutput], request_id: str, model: str) -> dict[str, Any]:
        """The `list` of `embedding` objects, in input order, with usage."""
        assert isinstance(call, EmbeddingCall)
        data = []
        for i, output in enumerate(outputs):
            assert isinstance(output, EmbeddingRequestOutput) and output.outputs is not None
            data.append({"object": "embedding", "index": i,
                         "embedding": _encode(output.outputs.embedding, call.encoding_format)})
        tokens = sum(len(o.prompt_token_ids) for o in outputs)
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
