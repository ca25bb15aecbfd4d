"""The Python API: `LLM(model).generate(...)`, `.chat(...)` and `.embed(...)`, named as in vLLM."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from tqdm.auto import tqdm

from tokenmill.engine.client import LocalClient, Submission, drive
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.create import create_engine
from tokenmill.outputs import EmbeddingRequestOutput, EngineOutput, RequestOutput
from tokenmill.pooling_params import PoolingParams
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
        self.engine = create_engine(EngineConfig(model=model, **engine_args))
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
        self._require("generate")
        prompts = _as_prompts(prompts)
        params = _params_for(prompts, sampling_params, SamplingParams(), "sampling_params")
        tokenized = (self._tokenize(p) + (next(params),) for p in prompts)
        return self._run(tokenized, params, "sampling_params", use_tqdm,  # type: ignore[return-value]
                         getattr(prompts, "__len__", None))

    def chat(self, messages: Conversation | Iterable[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation, then generates as `generate`.
        A conversation the template rejects raises `RequestError`."""
        self._require("generate")
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            messages = [messages]
        frontend = self.frontend
        params = _params_for(messages, sampling_params, SamplingParams(), "sampling_params")
        templated = (frontend.tokenize_chat(c, add_generation_prompt, chat_template_kwargs) + (next(params),)
                     for c in messages)
        return self._run(templated, params, "sampling_params", use_tqdm,  # type: ignore[return-value]
                         getattr(messages, "__len__", None))

    def embed(self, prompts: PromptType | Iterable[PromptType],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """Embeds every prompt (as `generate` takes them); returns their outputs in input order, each
        embedding in `.outputs.embedding`. A prompt longer than the model's context fails (its output's
        `error` says so) unless its PoolingParams' truncate_prompt_tokens cuts it."""
        self._require("embed")
        prompts = _as_prompts(prompts)
        params = _params_for(prompts, pooling_params, PoolingParams(), "pooling_params")

        def tokenized() -> Iterator[tuple[str | None, list[int], SamplingParams | PoolingParams | None]]:
            for p in prompts:
                pooling = next(params)
                truncate = pooling.truncate_prompt_tokens if isinstance(pooling, PoolingParams) else None
                yield self._tokenize(p, truncate) + (pooling,)

        return self._run(tokenized(), params, "pooling_params", use_tqdm,  # type: ignore[return-value]
                         getattr(prompts, "__len__", None))

    def _require(self, task: str) -> None:
        if self.frontend.task != task:
            does = "embeds text: call embed()" if self.frontend.task == "embed" else \
                "generates text: call generate() or chat(), or load it with task='embed'"
            raise ValueError(f"model {self.frontend.model_name} {does}")

    def _tokenize(self, prompt: PromptType, truncate: int | None = None) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return self.frontend.tokenize(list(prompt["prompt_token_ids"]), truncate)
            prompt = prompt["prompt"]
        return self.frontend.tokenize(prompt, truncate)

    def _run(self, prompts: Iterator[tuple[str | None, list[int], SamplingParams | PoolingParams | None]],
             params: Iterator[SamplingParams | PoolingParams | None], params_name: str, use_tqdm: bool,
             length: Any) -> list[EngineOutput]:
        """Runs (text, token ids, params) triples; params None means the params ran out before the prompts."""
        if self._running:
            raise RuntimeError("generate(), chat() and embed() cannot run inside another call on the same LLM "
                               "(e.g. from its prompt iterator): the engine has one step loop")
        index_of: dict[str, int] = {}

        def requests() -> Iterator[Submission]:
            for index, (text, token_ids, request_params) in enumerate(prompts):
                if request_params is None:
                    raise ValueError(f"more prompts than {params_name} ({index} given)")
                request_id = str(next(self._request_ids))
                index_of[request_id] = index
                yield Submission(request_id, text, token_ids, request_params)
            if not isinstance(params, itertools.repeat) and next(params, None) is not None:
                raise ValueError(f"more {params_name} than prompts")

        results: dict[int, EngineOutput] = {}
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
                        if isinstance(output, RequestOutput):
                            out_tokens += sum(len(c.token_ids) for c in output.outputs)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(f"in {in_tokens / elapsed:.0f} tok/s, out {out_tokens / elapsed:.0f} tok/s",
                                            refresh=False)
                        bar.update(1)
        finally:
            bar.close()
            self._running = False
        return [results[i] for i in range(len(results))]


def _as_prompts(prompts: PromptType | Iterable[PromptType]) -> Iterable[PromptType]:
    """One prompt (a string, a dict, a list of token ids) as a list of one; any other iterable as it is."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]  # type: ignore[list-item]
    return prompts  # type: ignore[return-value]


Params = TypeVar("Params", SamplingParams, PoolingParams)


def _params_for(prompts: Iterable[Any], given: Params | Sequence[Params] | None,
                default: Params, name: str) -> Iterator[Params | None]:
    """The params of each prompt in turn: one for all (repeated), or one each, checked against the
    prompts' number where it is known, then None: so that a lazy input of another length is an
    error, not a cut (`_run` checks both ends)."""
    if given is None or isinstance(given, (SamplingParams, PoolingParams)):
        return itertools.repeat(given or default)  # type: ignore[arg-type]
    if hasattr(prompts, "__len__") and len(given) != len(prompts):  # type: ignore[arg-type]
        raise ValueError(f"got {len(given)} {name} for {len(prompts)} prompts")  # type: ignore[arg-type]
    return itertools.chain(given, [None])
