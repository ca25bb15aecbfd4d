"""Structured output: token masks from a grammar library (xgrammar), never a hand-made compiler.

Each distinct constraint is compiled once (xgrammar's compiler caches compiled grammars); each
constrained sequence holds a matcher that tracks where its output is in the grammar. Every step
the matchers of the constrained rows fill one shared bitmask, applied to the batch's logits in
one call, so constrained and free requests share a batch.
"""

from __future__ import annotations

import json
import re
import threading

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from tokenmill.sampling_params import StructuredOutputsParams

ANY_OBJECT = {"type": "object"}  # what json_object asks for, as OpenAI's JSON mode


class StructuredOutputs:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: set[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None  # built on first use: it reads the whole vocabulary
        self._lock = threading.Lock()

    def _get_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:  # built once, whichever thread asks first
            return self._build_compiler()

    def _build_compiler(self) -> xgr.GrammarCompiler:
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._eos_token_ids)
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def matcher(self, spec: StructuredOutputsParams) -> xgr.GrammarMatcher:
        """A fresh matcher for one sequence; raises ValueError if the constraint cannot be compiled."""
        return xgr.GrammarMatcher(self.compile(spec))

    def compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The compiled grammar, from the compiler's cache after the first time. Callers outside the
        engine thread call this first, so that a slow compilation never stalls the running batch."""
        grammar = grammar_of(spec)
        try:
            return self._get_compiler().compile_grammar(grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"structured output: cannot compile {spec.kind}: {_first_line(e)}") from None

    def apply(self, logits: torch.Tensor, matchers: list[tuple[int, xgr.GrammarMatcher]]) -> None:
        """Masks, in place, the tokens each constrained row's grammar does not allow next."""
        bitmask = xgr.allocate_token_bitmask(logits.shape[0], self._vocab_size)
        for row, matcher in matchers:
            matcher.fill_next_token_bitmask(bitmask, row)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self._vocab_size,
                                        indices=[row for row, _ in matchers])


def grammar_of(spec: StructuredOutputsParams) -> xgr.Grammar:
    """The constraint as a grammar (what tools/grammar.py joins with tool calls); raises ValueError
    if the library cannot read it."""
    try:
        if spec.json is not None or spec.json_object:
            schema = json.dumps(spec.json or ANY_OBJECT) if not isinstance(spec.json, str) else spec.json
            # NOTE: compact JSON (no free whitespace): a small model can otherwise spend its whole
            # budget on whitespace and never close the object.
            return xgr.Grammar.from_json_schema(schema, any_whitespace=False)
        if spec.regex is not None:
            return xgr.Grammar.from_regex(spec.regex)
        if spec.choice is not None:
            return xgr.Grammar.from_regex("|".join(_regex_literal(c) for c in spec.choice))
        assert spec.grammar is not None
        return xgr.Grammar.from_ebnf(spec.grammar)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"structured output: cannot compile {spec.kind}: {_first_line(e)}") from None


def _regex_literal(text: str) -> str:
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}/" else c for c in text)


def _first_line(e: Exception) -> str:
    """The library's message without its source location and assertion text."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)  # "[time] file.cc:123: "
    return text.split("is false: ", 1)[-1]
