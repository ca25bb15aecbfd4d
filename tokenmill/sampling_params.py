"""Per-request generation settings, named and validated as in vLLM so scripts port unchanged.

Logprobs are always those of the model's raw output: before penalties, logit_bias, allowed_token_ids,
bad_words, min_tokens, a grammar and temperature (vLLM v1's default, `logprobs_mode="raw_logprobs"`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StructuredOutputsParams:
    """Constrains the output to a grammar: set exactly one of these (names as in vLLM)."""

    json: dict[str, Any] | str | None = None  # a JSON schema
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF)
    json_object: bool = False  # any JSON object

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of json, regex, choice, grammar, json_object; "
                             f"got {given or 'none'}")
        if self.choice is not None and not (isinstance(self.choice, list) and self.choice
                                            and all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs choice must be a non-empty list of non-empty strings")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"structured_outputs {name} must be a string")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("structured_outputs json must be a JSON schema (an object or its text)")

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None) \
            if not self.json_object else "json_object"


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # None: up to the model's context length; 0: the prompt alone is computed (its prompt_logprobs,
    # if asked), nothing is generated, and the request ends with "length".
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # number of top logprobs per generated token
    prompt_logprobs: int | None = None  # number of top logprobs per prompt token
    structured_outputs: StructuredOutputsParams | None = None
    # Added to the logits before any other processing (OpenAI's): token id -> bias in [-100, 100].
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # every other token is masked
    # vLLM's: each word's last token is banned where the output so far ends with the word's other
    # tokens, the word tokenized as it is and with a leading space (so banned at the start and
    # mid-text); a one-token word is always banned.
    bad_words: list[str] | None = None
    # False: this request never computes drafted tokens (the engine's `speculative` setting aside).
    speculative: bool = True
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.allowed_token_ids, tuple):
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.bad_words, tuple):
            self.bad_words = list(self.bad_words)
        self._validate()

    def _validate(self) -> None:
        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        checks: list[tuple[str, Callable[[], bool], str]] = [
            ("n", lambda: is_int(self.n) and self.n >= 1, "must be an integer >= 1"),
            ("temperature", lambda: is_number(self.temperature) and self.temperature >= 0, "must be a number >= 0"),
            ("top_p", lambda: is_number(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", lambda: is_int(self.top_k) and self.top_k >= 0, "must be -1, 0 or a positive integer"),
            ("min_p", lambda: is_number(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("presence_penalty", lambda: is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "must be in [-2, 2]"),
            ("frequency_penalty", lambda: is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "must be in [-2, 2]"),
            ("repetition_penalty", lambda: is_number(self.repetition_penalty) and self.repetition_penalty > 0,
             "must be a number > 0"),
            ("max_tokens", lambda: self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 0),
             "must be an integer >= 0"),
            ("min_tokens", lambda: is_int(self.min_tokens) and self.min_tokens >= 0, "must be an integer >= 0"),
            ("min_tokens", lambda: self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "must be <= max_tokens"),
            ("stop", lambda: all(isinstance(s, str) and s for s in self.stop_strings), "must be non-empty strings"),
            ("stop_token_ids", lambda: all(is_int(t) and t >= 0 for t in self.stop_token_ids),
             "must be non-negative integers"),
            ("logprobs", lambda: self.logprobs is None or (is_int(self.logprobs) and self.logprobs >= 0),
             "must be an integer >= 0"),
            ("prompt_logprobs",
             lambda: self.prompt_logprobs is None or (is_int(self.prompt_logprobs) and self.prompt_logprobs >= 0),
             "must be an integer >= 0"),
            ("seed", lambda: self.seed is None or is_int(self.seed), "must be an integer"),
            ("structured_outputs",
             lambda: self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
             "must be a StructuredOutputsParams"),
            ("logit_bias", lambda: self.logit_bias is None or (
                isinstance(self.logit_bias, dict) and all(is_int(t) and t >= 0 and is_number(b) and -100 <= b <= 100
                                                          for t, b in self.logit_bias.items())),
             "must map token ids (integers >= 0) to numbers in [-100, 100]"),
            ("allowed_token_ids", lambda: self.allowed_token_ids is None or (
                isinstance(self.allowed_token_ids, list) and self.allowed_token_ids
                and all(is_int(t) and t >= 0 for t in self.allowed_token_ids)),
             "must be a non-empty list of token ids (integers >= 0)"),
            ("bad_words", lambda: self.bad_words is None or (
                isinstance(self.bad_words, list) and all(isinstance(w, str) and w.strip() for w in self.bad_words)),
             "must be a list of non-blank strings"),
            ("speculative", lambda: isinstance(self.speculative, bool), "must be true or false"),
            # NOTE: min_tokens blocks the stop tokens, and where a grammar then allows nothing else
            # no token would be valid: the two are refused together.
            ("min_tokens", lambda: self.structured_outputs is None or self.min_tokens == 0,
             "cannot be combined with structured_outputs"),
        ]
        for name, ok, rule in checks:
            if not ok():
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    @property
    def can_speculate(self) -> bool:
        """Whether drafted tokens may be verified for this request: every row samples as a plain
        decode would, which needs settings that do not depend on the tokens before it
        (engine/speculation.py)."""
        return (self.speculative and self.logprobs is None and self.structured_outputs is None
                and not self.bad_words and self.presence_penalty == 0 and self.frequency_penalty == 0
                and self.repetition_penalty == 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
