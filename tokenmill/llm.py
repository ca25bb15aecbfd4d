"""The Python API: `LLM(model).generate(...)` and `.chat(...)`, named as in vLLM."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import fields
from typing import Any

from tqdm.auto import tqdm

from tokenmill.engine.client import LocalClient, Submission, drive
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.engine import Engine
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]
Conversation = list[dict[str, Any]]
ENGINE_ARGS = tuple(f.name for f in fields(EngineConfig) if f.name != "model")


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        """`model`: a Hugging Face folder or a .gguf file (None: SmolLM2-135M-Instruct). `engine_args`:
        any other `EngineConfig` field by keyword (dtype, max_num_seqs, kv_cache_memory, ...); the
        defaults are EngineConfig's."""
        unknown = [name for name in engine_args if name not in ENGINE_ARGS]
        if unknown:
            raise TypeError(f"LLM() got an unexpected keyword argument {unknown[0]!r}; "
                            f"engine arguments are {', '.join(ENGINE_ARGS)}")
        self.engine = Engine(EngineConfig(model=model, **engine_args))
        self._client = LocalClient(self.engine)
        self.frontend = self._client.frontend  # tokenizer, chat template, model name, context length
        self._request_ids = itertools.count()
        self._running = False  # one generate/chat at a time: each drives the engine's step loop

    def get_tokenizer(self) -> Any:
        return self.frontend.tokenizer

    def generate(self, prompts: PromptType | Iterable[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every prompt; returns their outputs in input order.

        Prompts are strings, token-id lists or vLLM-style dicts ({"prompt": ...} or
        {"prompt_token_ids": ...}), as one prompt, a list, or any iterable, which is consumed lazily.
        A prompt that cannot run (empty, longer than the context) gets an output whose `error`
        says why; the others complete.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        frontend = self.frontend

        def tokenized() -> Iterator[tuple[str | None, list[int]]]:
            for p in prompts:
                if isinstance(p, dict):
                    if "prompt_token_ids" in p:
                        yield p.get("prompt"), list(p["prompt_token_ids"])
                        continue
                    p = p["prompt"]
                yield frontend.tokenize(p)

        return self._run(tokenized(), sampling_params, use_tqdm, getattr(prompts, "__len__", None))

    def chat(self, messages: Conversation | Iterable[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation, then generates as `generate`.
        A conversation the template rejects raises `RequestError`."""
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            messages = [messages]
        frontend = self.frontend
        templated = (frontend.tokenize_chat(c, add_generation_prompt, chat_template_kwargs) for c in messages)
        return self._run(templated, sampling_params, use_tqdm, getattr(messages, "__len__", None))

    def _run(self, prompts: Iterator[tuple[str | None, list[int]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None, use_tqdm: bool,
             length: Any) -> list[RequestOutput]:
        one_each = not (sampling_params is None or isinstance(sampling_params, SamplingParams))
        if sampling_params is None:
            params_iter: Iterator[SamplingParams | None] = itertools.repeat(SamplingParams())
        elif isinstance(sampling_params, SamplingParams):
            params_iter = itertools.repeat(sampling_params)
        else:
            if length is not None and len(sampling_params) != length():
                raise ValueError(f"got {len(sampling_params)} sampling_params for {length()} prompts")
            # The None marks the end, so that a lazy input of another length is an error, not a cut.
            params_iter = itertools.chain(sampling_params, [None])

        if self._running:
            raise RuntimeError("generate() and chat() cannot run inside another call on the same LLM "
                               "(e.g. from its prompt iterator): the engine has one step loop")
        index_of: dict[str, int] = {}

        def requests() -> Iterator[Submission]:
            for index, (text, token_ids) in enumerate(prompts):
                params = next(params_iter)
                if params is None:
                    raise ValueError(f"more prompts than sampling_params ({index} given)")
                request_id = str(next(self._request_ids))
                index_of[request_id] = index
                yield Submission(request_id, text, token_ids, params)
            if one_each and next(params_iter) is not None:
                raise ValueError("more sampling_params than prompts")

        results: dict[int, RequestOutput] = {}
        bar = tqdm(total=length() if length else None, desc="requests", disable=not use_tqdm, dynamic_ncols=True)
        start, in_tokens, out_tokens = time.perf_counter(), 0, 0
        self._running = True
        try:
            # NOTE: closed (so its requests in flight are aborted) when interrupted, leaving the
            # engine clean for the next call.
            with contextlib.closing(drive(self._client, requests())) as steps:
                for outputs in steps:
                    for output in outputs:
                        results[index_of.pop(output.request_id)] = output
                        in_tokens += len(output.prompt_token_ids)
                        out_tokens += sum(len(c.token_ids) for c in output.outputs)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(f"in {in_tokens / elapsed:.0f} tok/s, out {out_tokens / elapsed:.0f} tok/s",
                                            refresh=False)
                        bar.update(1)
        finally:
            bar.close()
            self._running = False
        return [results[i] for i in range(len(results))]
