"""Why a request failed, as a value every face can read without parsing a message.

A `RequestError` is either the request's own fault (a prompt too long for the context, a grammar
that does not compile, ...; `internal` is False): the batch format writes it as a permanent error
record and the server answers 4xx. Or the engine's (`code == INTERNAL_ERROR`: a bug, an
out-of-memory inside a step; logged with its traceback): the batch runner writes nothing for it,
so the line runs again on the next run of the job, and the server answers 500.
"""

from __future__ import annotations

from dataclasses import dataclass

INTERNAL_ERROR = "internal_error"


@dataclass
class RequestError(Exception):
    code: str  # OpenAI-style: "invalid_request", "invalid_value", "context_length_exceeded", ...
    message: str
    param: str | None = None  # the request field to blame, if one is

    def __str__(self) -> str:
        return self.message

    @property
    def internal(self) -> bool:
        return self.code == INTERNAL_ERROR
