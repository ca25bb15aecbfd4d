"""A request and its sequences: the state the scheduler, the KV manager and the runner share.

A `Request` is what a user asked for; it owns `n` `Sequence`s, one per sample, all queued at once:
the later ones find the prompt's K/V in the prefix cache (see `Scheduler`). Only the scheduler
changes a sequence's `status`.
"""

from __future__ import annotations

import enum
import hashlib
import time

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from xgrammar import GrammarMatcher

from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from tokenmill.sampling_params import SamplingParams

# The prompt's last tokens a sequence's text stream starts from (see Sequence._primed_decoder).
PRIMER_TOKENS = 4


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request: Request, index: int) -> None:
        self.request = request
        self.index = index
        self.params = request.params
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # of the full blocks of token_ids, in order
        self.num_registered_blocks = 0  # leading blocks of block_table that are in the prefix cache
        self.num_released_blocks = 0  # leading blocks of block_table given back, out of every window's reach
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""
        self.logprobs: list[TokenLogprobs] | None = [] if self.params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if self.params.logprobs is not None else None
        self._decoder: DecodeStream | None = None  # made on the first token, when the tokenizer is at hand
        self.grammar: GrammarMatcher | None = None  # set by the engine for structured output
        # Tokens drafted for this step (engine/speculation.py): computed after token_ids, kept as
        # far as the samples agree; cleared after every step. draft_match_class: the class of the length of
        # the match that found them (their acceptance is measured per class).
        self.draft_token_ids: list[int] = []
        self.draft_match_class = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def next_token_seed(self, ahead: int = 0) -> int | None:
        """The seed of the noise that draws this sequence's next token (with `ahead`, the token that
        many after it: a drafted position), or None for an unseeded request.

        A hash of (request seed, sample index, output position) alone: the same token gets the same
        noise whatever ran beside it, after a preemption and recompute, or in another process on a
        resumed job. Hashed rather than added, so that seed 1's first sample is not seed 0's second.
        """
        if self.params.seed is None:
            return None
        key = f"{self.params.seed}:{self.index}:{self.num_output_tokens + ahead}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")

    def _primed_decoder(self, tokenizer: Tokenizer) -> DecodeStream:
        """A text stream that continues the prompt's: primed with its last tokens, so that tokenizers
        that drop the leading space of a text's first word (SentencePiece's Metaspace) keep it on the
        first generated word."""
        skip = self.params.skip_special_tokens
        primer = self.token_ids[max(0, self.num_prompt_tokens - PRIMER_TOKENS):self.num_prompt_tokens]
        # NOTE: a prompt that ends inside a character (its last byte tokens an incomplete UTF-8
        # sequence) would otherwise put the primer's text before the character the output completes
        # ("a" + 0xE4, then 0xB8 0xAD, read "a中"): the primer ends before those bytes, which are fed as
        # steps whose text (none while incomplete) is the prompt's.
        dangling: list[int] = []
        while primer and tokenizer.decode(primer, skip_special_tokens=skip).endswith("\ufffd"):
            dangling.insert(0, primer.pop())
        decoder = DecodeStream(ids=primer, skip_special_tokens=skip)
        for token_id in dangling:
            decoder.step(tokenizer, token_id)
        return decoder

    def append_token(self, token_id: int, tokenizer: Tokenizer) -> str:
        """Adds a generated token; returns the text it completes (may be empty mid-character)."""
        if self._decoder is None:
            self._decoder = self._primed_decoder(tokenizer)
        self.token_ids.append(token_id)
        try:
            piece = self._decoder.step(tokenizer, token_id) or ""
        except Exception as e:
            # NOTE: tokenizers' DecodeStream fails when its window's text stops being a prefix of the text with the
            # new token (byte-fallback tokens whose invalid UTF-8 decodes differently once a later token comes:
            # Gemma 3 closing a French quotation with a no-break space and a guillemet; vLLM's issue 17448). As
            # vLLM does, the stream starts afresh at this token; the text so far stands.
            if not str(e).startswith("Invalid prefix encountered"):
                raise
            self._decoder = DecodeStream(skip_special_tokens=self.params.skip_special_tokens)
            piece = self._decoder.step(tokenizer, token_id) or ""
        self.text += piece
        return piece

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(self.index, self.text, self.output_token_ids, self.finish_reason,
                                self.stop_reason, self.logprobs, self.cumulative_logprob)


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, max_total_tokens: int, priority: int = 0, stream: bool = False,
                 bad_words_token_ids: list[list[int]] | None = None) -> None:
        self.request_id = request_id
        self.priority = priority  # lower first: interactive 0, batch jobs higher
        self.stream = stream  # report progress every step, not just at the end
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        # max_tokens capped by the context length; the request ends with "length" there.
        self.max_total_tokens = max_total_tokens
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        # The logits processors' settings as the sampler takes them, built once here rather than each step.
        self.logit_bias: tuple[torch.Tensor, torch.Tensor] | None = (  # token ids, their biases
            (torch.tensor(list(params.logit_bias)), torch.tensor(list(params.logit_bias.values()), dtype=torch.float))
            if params.logit_bias else None)
        self.allowed_token_ids = None if params.allowed_token_ids is None else torch.tensor(params.allowed_token_ids)
        # Each bad word's token ids (per spelling: see SamplingParams.bad_words), tokenized by the engine.
        self.bad_words_token_ids = bad_words_token_ids or []
        self.seqs = [Sequence(self, i) for i in range(params.n)]
        self.num_cached_tokens: int | None = None  # set when first admitted
        # NOTE: stamped by the scheduler and the engine (a clock read per stage, not per token); the
        # server's latency histograms are observed from it by whoever receives the output.
        self.metrics = RequestMetrics(arrival_time=time.monotonic())

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def to_output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [s.to_output() for s in self.seqs], self.finished,
                             self.num_cached_tokens or 0, self.prompt_logprobs, metrics=self.metrics)
