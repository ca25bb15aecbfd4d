"""The Python API: `LLM(model).generate(...)` and `.chat(...)`, named as in vLLM."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.engine import Engine
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]
Conversation = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", max_num_seqs: int = 128,
                 max_num_batched_tokens: int = 256, kv_cache_memory: int | float = 0.2,
                 enable_prefix_caching: bool = True, block_size: int = 16, max_model_len: int | None = None) -> None:
        self.engine = Engine(EngineConfig(
            model=model, dtype=dtype, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            kv_cache_memory=kv_cache_memory, enable_prefix_caching=enable_prefix_caching, block_size=block_size,
            max_model_len=max_model_len))
        self._request_ids = itertools.count()
        self._running = False  # one generate/chat at a time: each drives the engine's step loop

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

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
        tokenizer = self.engine.tokenizer

        def tokenized() -> Iterator[tuple[str | None, list[int]]]:
            for p in prompts:
                if isinstance(p, dict):
                    if "prompt_token_ids" in p:
                        yield p.get("prompt"), list(p["prompt_token_ids"])
                        continue
                    p = p["prompt"]
                if isinstance(p, str):
                    yield p, tokenizer.encode(p)
                else:
                    yield None, list(p)

        return self._run(tokenized(), sampling_params, use_tqdm, getattr(prompts, "__len__", None))

    def chat(self, messages: Conversation | Iterable[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation, then generates as `generate`."""
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            messages = [messages]
        tokenizer = self.engine.tokenizer

        def templated() -> Iterator[tuple[str, list[int]]]:
            for conversation in messages:
                text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt,
                                                     **(chat_template_kwargs or {}))
                yield text, tokenizer.encode(text, add_special_tokens=False)

        return self._run(templated(), sampling_params, use_tqdm, getattr(messages, "__len__", None))

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
        engine = self.engine
        # Requests in flight: enough to keep the batch full, few enough to bound memory.
        window = 2 * engine.config.max_num_seqs
        results: dict[int, RequestOutput] = {}
        index_of: dict[str, int] = {}
        bar = tqdm(total=length() if length else None, desc="requests", disable=not use_tqdm, dynamic_ncols=True)
        start, in_tokens, out_tokens = time.perf_counter(), 0, 0
        pending = zip(itertools.count(), prompts, params_iter)
        exhausted = False
        self._running = True
        try:
            while True:
                while not exhausted and len(index_of) < window:
                    item = next(pending, None)
                    if item is None:
                        exhausted = True
                        if one_each and next(params_iter) is not None:
                            raise ValueError("more sampling_params than prompts")
                        break
                    index, (text, token_ids), params = item
                    if params is None:
                        raise ValueError(f"more prompts than sampling_params ({index} given)")
                    request_id = str(next(self._request_ids))
                    failed = engine.add_request(request_id, text, token_ids, params)
                    if failed is not None:
                        results[index] = failed
                        bar.update(1)
                    else:
                        index_of[request_id] = index
                if not index_of and exhausted:
                    break
                for output in engine.step():
                    results[index_of.pop(output.request_id)] = output
                    in_tokens += len(output.prompt_token_ids)
                    out_tokens += sum(len(c.token_ids) for c in output.outputs)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"in {in_tokens / elapsed:.0f} tok/s, out {out_tokens / elapsed:.0f} tok/s",
                                        refresh=False)
                    bar.update(1)
        finally:
            for request_id in index_of:  # interrupted: leave the engine clean for the next call
                engine.abort_request(request_id)
            bar.close()
            self._running = False
        return [results[i] for i in range(len(results))]

