"""What the engine hands back, shaped like vLLM's outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.errors import RequestError


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 is the most likely token
    decoded_token: str | None = None


# One entry per token: token id -> its Logprob (the top-k, plus the chosen token).
TokenLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # Set when this request failed (on its own, e.g. an over-long prompt, or inside the engine: see
    # `RequestError.internal`); the others go on.
    error: RequestError | None = None
