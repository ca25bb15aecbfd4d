"""What the engine hands back, shaped like vLLM's outputs: `RequestOutput` for generation,
`EmbeddingRequestOutput` for embeddings."""

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
class RequestMetrics:
    """When a request reached each stage, in seconds on `time.monotonic()`'s clock (vLLM's names):
    queued by the engine, first admitted to a step, its first token sampled, finished. A stage not
    reached yet is None; all are set once the request's output is finished (the first token's
    time stays None for a prompt-only request, max_tokens=0)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    logprobs: list[TokenLogprobs] | None = None
    # The sum of the chosen tokens' logprobs when logprobs were asked for, else None (vLLM's).
    cumulative_logprob: float | None = None

    def finished(self) -> bool:  # a method, as vLLM's (RequestOutput.finished is an attribute)
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
    metrics: RequestMetrics | None = None  # None for a request that never ran (refused, or failed)


@dataclass
class EmbeddingOutput:
    embedding: list[float]  # pooled, then normalised and cut to `dimensions` as the request asked

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """One prompt's embedding (vLLM's name); `outputs` is None when the request failed (`error`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput | None = None
    error: RequestError | None = None
    finished: bool = True  # an embedding is never streamed: reported once, finished
    num_cached_tokens: int = 0  # no prefix cache for embeddings: kept so that faces count tokens alike


# What an engine's step hands back: a generation's or an embedding's output.
EngineOutput = RequestOutput | EmbeddingRequestOutput
