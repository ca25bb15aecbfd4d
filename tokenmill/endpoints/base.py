"""What every OpenAI endpoint does, whichever face (batch file, server, Ray replica) serves it.

A request body goes through four steps, the same everywhere:
1. `Endpoint.parse(body)`: the body checked alone, without the model; a `Call`, or a RequestError
   naming the field. Every field is either used, accepted because it changes nothing here (listed
   in `IGNORED_FIELDS`), or refused: nothing that would change the output is dropped silently.
2. `Endpoint.prepare(frontend, call)`: what needs the model: the prompts tokenized (a body may hold
   k prompts: k engine requests), grammars compiled, the model's generation defaults applied.
   Runs outside the engine's step loop.
3. The k engine requests run with `call.params`.
4. `Endpoint.respond(call, outputs, request_id, model)`: the response body from the k outputs, in prompt order,
   once all have succeeded; `failure(outputs)` says why the request as a whole failed otherwise.
   A streamed request instead goes through the endpoint's `Streamer` (server only).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from tokenmill.errors import RequestError
from tokenmill.outputs import EngineOutput, RequestOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.frontend import Frontend

# One engine request's prompt: its text (None for token ids) and token ids.
Prompt = tuple[str | None, list[int]]
# Accepted by every endpoint and changing nothing in the output: `model` (the server checks it; a
# batch line runs the job's model), and OpenAI's bookkeeping fields.
IGNORED_FIELDS = frozenset({"model", "user", "metadata", "store", "service_tier"})


@dataclass
class Call:
    """One parsed request body. `prepare` completes it for the model (its prompts, and its params
    with the model's defaults); endpoints subclass it for what their responses need."""

    body: dict[str, Any]
    params: SamplingParams | PoolingParams
    prompts: list[Prompt] = field(default_factory=list)  # set by prepare
    created: int = field(default_factory=lambda: int(time.time()))


class Streamer(ABC):
    """Turns one streamed call's outputs into server-sent events, as the endpoint's clients expect."""

    @abstractmethod
    def start(self) -> list[str]:
        """Events before any output."""

    @abstractmethod
    def update(self, index: int, output: RequestOutput) -> list[str]:
        """Events for what prompt `index`'s output adds since its last update."""

    @abstractmethod
    def finish(self, outputs: Sequence[RequestOutput]) -> list[str]:
        """Events after every prompt's output finished, the stream's end included."""

    def error(self, error: dict[str, Any]) -> list[str]:
        """The events of a failure mid-stream (an OpenAI error body)."""
        return [sse(error)]


class Endpoint(ABC):
    url: ClassVar[str]
    task: ClassVar[str]  # what the model must do: "generate" or "embed"
    id_prefix: ClassVar[str]  # of response ids, as OpenAI names them ("chatcmpl", "cmpl", ...)
    prompt_field: ClassVar[str]  # the field an error about the prompt names
    prefix_ordered: ClassVar[bool] = True  # batch lines gain from running in prompt order (a shared KV prefix)

    @abstractmethod
    def parse(self, body: Any) -> Call:
        """Checks a body alone; raises RequestError naming the field."""

    @abstractmethod
    def prepare(self, frontend: Frontend, call: Call) -> None:
        """Sets call.prompts (and completes call.params) for the model; raises RequestError."""

    @abstractmethod
    def respond(self, call: Call, outputs: Sequence[EngineOutput], request_id: str, model: str) -> dict[str, Any]:
        """The response body; every output has succeeded."""

    def streamer(self, call: Call, request_id: str, model: str) -> Streamer:
        raise RequestError("invalid_value", f"{self.url} does not stream", "stream")

    def streams(self, call: Call) -> bool:
        return call.body.get("stream") is True

    def blamed_param(self, param: str | None) -> str | None:
        """The request field an error names: the engine's "prompt" is this endpoint's prompt field."""
        return self.prompt_field if param == "prompt" else param

    def failure(self, outputs: Sequence[EngineOutput | None]) -> RequestError | None:
        """What the request as a whole fails with, from its prompts' outputs so far (None: none
        yet): an internal error if any prompt had one (nothing of the request is done, so it can
        run again), else the lowest-indexed prompt's own error, named by its index when the
        request has several."""
        failed = [(i, o.error) for i, o in enumerate(outputs) if o is not None and o.error is not None]
        for _, error in failed:
            if error.internal:
                return error
        if not failed:
            return None
        index, error = failed[0]
        return self.prompt_error(error, index, len(outputs))

    def prompt_error(self, error: RequestError, index: int, count: int) -> RequestError:
        if error.param not in ("prompt", self.prompt_field):
            return error
        message = f"{self.prompt_field}[{index}]: {error.message}" if count > 1 else error.message
        return RequestError(error.code, message, self.prompt_field)


def check_fields(body: dict[str, Any], url: str, used: frozenset[str],
                 refused: dict[str, str] | None = None) -> None:
    """Refuses, naming it, the first field of body that this endpoint neither uses nor ignores:
    a field the client means to change the output must not be dropped silently. `refused` gives
    fields a reason of their own."""
    for name in body:
        if name in used or name in IGNORED_FIELDS:
            continue
        reason = (refused or {}).get(name, f"is not supported by {url}")
        raise RequestError("unsupported_parameter", f"body.{name} {reason}", name)


def typed(body: dict[str, Any], name: str, kinds: tuple[type, ...]) -> Any:
    """body[name], None if absent; a RequestError if it is not of one of kinds (a bool is no number)."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = {(int,): "an integer", (int, float): "a number", (bool,): "a boolean", (str,): "a string",
                 (dict,): "an object", (list,): "a list"}[kinds]
        raise RequestError("invalid_type", f"body.{name} must be {names}, got {json.dumps(value)}", name)
    return value


def sse(data: dict[str, Any], event: str | None = None) -> str:
    """One server-sent event."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def usage(outputs: Sequence[RequestOutput]) -> dict[str, Any]:
    """OpenAI's usage object of a request's outputs (k prompts: their sums)."""
    completion_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)}}
