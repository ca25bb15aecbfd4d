"""Per-request embedding settings, named as vLLM's `PoolingParams`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolingParams:
    # Keep the first `dimensions` values of the embedding and renormalise them (Matryoshka
    # embeddings): only for models trained for it (the engine refuses it otherwise).
    dimensions: int | None = None
    normalize: bool | None = None  # None: as the model's folder says (sentence-transformers' Normalize module)
    # Cut a prompt longer than this many tokens instead of failing it (-1: the model's context), as
    # the tokenizer truncates: its special tokens kept, on its truncation side. Applied by the face
    # that tokenizes (Frontend.tokenize), before the engine sees the prompt.
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.dimensions is not None and not (is_int(self.dimensions) and self.dimensions >= 1):
            raise ValueError(f"dimensions must be an integer >= 1, got {self.dimensions!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a boolean, got {self.normalize!r}")
        truncate = self.truncate_prompt_tokens
        if truncate is not None and not (is_int(truncate) and (truncate >= 1 or truncate == -1)):
            raise ValueError(f"truncate_prompt_tokens must be -1 or an integer >= 1, got {truncate!r}")
