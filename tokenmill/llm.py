"""The Python API: `LLM(model).generate(...)`, `.chat(...)` and `.embed(...)`, named as in vLLM.

`LLM(model, **kwargs)` takes vLLM's constructor arguments (VLLM_ARGS says what each becomes here),
so that a vLLM script runs unchanged: those that mean something set the engine's settings, those
that only tune vLLM's GPU internals are ignored with one warning naming them, and any other
keyword raises TypeError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from tokenmill.engine.client import LocalClient, Submission, drive
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.create import create_engine
from tokenmill.outputs import EmbeddingRequestOutput, EngineOutput, RequestOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams
from tokenmill.tools import parse_tool_request, prepare_chat, tool_call_format

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]
Conversation = list[dict[str, Any]]
ENGINE_ARGS = tuple(f.name for f in dataclasses.fields(EngineConfig) if f.name != "model")

# A keyword's value -> the settings it makes (EngineConfig fields, and "seed", this LLM's), or None
# where it is ignored. A value that cannot be honoured here raises ValueError.
Translation = Callable[[Any], dict[str, Any] | None]


def _sets(name: str, convert: Callable[[Any], Any] = lambda value: value) -> Translation:
    """Sets `name`; None keeps tokenmill's default (vLLM's optional arguments, e.g. max_num_seqs=None)."""
    return lambda value: {} if value is None else {name: convert(value)}


def _choice(mapping: dict[Any, Any]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if value not in mapping:
            raise ValueError(f"tokenmill supports {' or '.join(map(repr, mapping))}")
        return mapping[value]
    return convert


def _only(*supported: Any) -> Translation:
    """Accepted with the values that describe tokenmill as it is; any other is an error."""
    def check(value: Any) -> dict[str, Any]:
        if value not in supported:
            raise ValueError(f"tokenmill supports {' or '.join(map(repr, supported))}")
        return {}
    return check


def _ignored(value: Any) -> None:
    return None


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

VLLM_ARGS: dict[str, Translation] = {
    **{name: _sets(name) for name in ENGINE_ARGS},  # EngineConfig's own, tokenmill's names
    "dtype": _sets("dtype", lambda value: _DTYPE_NAMES.get(value, value)),  # vLLM's names are in DTYPES
    "quantization": _sets("quantization", lambda value: "auto" if value == "gguf" else value),
    "task": _sets("task", _choice({"auto": "auto", "generate": "generate", "embed": "embed", "embedding": "embed"})),
    "runner": _sets("task", _choice({"auto": "auto", "generate": "generate", "pooling": "embed"})),
    # On a GPU, vLLM's meaning; on the CPU, the KV cache's share of the RAM available.
    "gpu_memory_utilization": lambda value: {} if value is None else {"gpu_memory_utilization": float(value),
                                                                       "kv_cache_memory": float(value)},
    "kv_cache_memory_bytes": _sets("kv_cache_memory", int),
    "seed": _sets("seed"),
    # NOTE: tokenmill never runs a model's own code (it runs the architectures it implements), so
    # trusting it changes nothing.
    "trust_remote_code": lambda value: {},
    "tensor_parallel_size": _only(1), "pipeline_parallel_size": _only(1), "data_parallel_size": _only(1),
    "tokenizer_mode": _only("auto", "hf"),  # fast tokenizers, through transformers
    "revision": _only(None), "code_revision": _only(None), "tokenizer_revision": _only(None),  # no hub
    "kv_cache_dtype": _only("auto"),  # the model's dtype
    "skip_tokenizer_init": _only(False),
    "max_logprobs": _only(20),  # tokenmill's limit, as vLLM's default (engine.MAX_LOGPROBS)
    # Tuning of vLLM's GPU, compilation, parallelism, logging and download internals: nothing here.
    **dict.fromkeys((
        "enforce_eager", "swap_space", "cpu_offload_gb", "disable_custom_all_reduce", "max_seq_len_to_capture",
        "compilation_config", "disable_log_stats", "disable_async_output_proc", "cuda_graph_sizes",
        "cudagraph_capture_sizes", "max_cudagraph_capture_size", "max_parallel_loading_workers",
        "distributed_executor_backend", "worker_cls", "worker_extension_cls", "num_gpu_blocks_override",
        "enable_chunked_prefill", "max_num_partial_prefills", "max_long_partial_prefills",
        "long_prefill_token_threshold", "num_lookahead_slots", "async_scheduling", "scheduling_policy",
        "prefix_caching_hash_algo", "calculate_kv_scales", "kv_sharing_fast_prefill", "disable_cascade_attn",
        "enable_sleep_mode", "use_tqdm_on_load", "pt_load_map_location", "safetensors_load_strategy",
        "download_dir", "hf_token", "load_format", "model_impl", "ray_workers_use_nsight", "otlp_traces_endpoint",
        "collect_detailed_traces", "enable_log_requests", "disable_log_requests", "aggregate_engine_logging",
        "mm_processor_cache_gb", "disable_mm_preprocessor_cache", "enable_expert_parallel", "enable_dbo",
    ), _ignored),
}


def request_seed(seed: int, number: int) -> int:
    """The seed of the `number`-th request (from 0, in submission order) an `LLM(seed=seed)` runs
    without a seed of its own. Hashed rather than added, so that seed 1's request 0 is not seed 0's
    request 1."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{number}".encode()).digest()[:8], "little") >> 1


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        """`model`: a Hugging Face folder or a .gguf file (None: SmolLM2-135M-Instruct). `kwargs`:
        any other `EngineConfig` field (dtype, max_num_seqs, kv_cache_memory, ...; the defaults are
        EngineConfig's), or vLLM's constructor arguments, as VLLM_ARGS maps them:
        - `seed`: the seed of every request given without one, derived from (seed, the request's
          number: `request_seed`), so that a script gives the same samples run after run whatever
          the batching (seeded sampling is batch-invariant). None (the default): unseeded requests
          draw fresh noise.
        - `gpu_memory_utilization`: on a GPU, vLLM's (the share of its memory for weights, activations and
          the KV cache); on the CPU, the KV cache's share of the RAM available (kv_cache_memory as a
          fraction). `kv_cache_memory_bytes`: the KV cache's size.
        - `max_model_len`, `max_num_seqs`, `max_num_batched_tokens`, `enable_prefix_caching`,
          `block_size`, `tokenizer` (a folder), `generation_config` ("auto", "vllm" or a folder),
          `task`/`runner`, `quantization` (tokenmill's values, or "gguf" for "auto"), `dtype`
          ("auto", "float32"/"float", "bfloat16", "float16"/"half", or a torch dtype).
        - `trust_remote_code`: accepted, and changes nothing: tokenmill never runs a model's code.
        - `tensor_parallel_size`, `pipeline_parallel_size`, `data_parallel_size`: 1 only;
          `revision` and the like: None only (no hub here); `tokenizer_mode` "auto" or "hf";
          `kv_cache_dtype` "auto".
        - those that only tune vLLM's GPU internals (`enforce_eager`, `swap_space`, ...): ignored,
          with one warning naming them.
        Any other keyword raises TypeError; a value that cannot be honoured, ValueError.
        """
        settings: dict[str, Any] = {}
        set_by: dict[str, str] = {}
        ignored = []
        for name, value in kwargs.items():
            if name not in VLLM_ARGS:
                close = difflib.get_close_matches(name, VLLM_ARGS, n=1)
                hint = f"did you mean {close[0]!r}?" if close else \
                    f"engine arguments are {', '.join(ENGINE_ARGS)}, and vLLM's in tokenmill.llm.VLLM_ARGS"
                raise TypeError(f"LLM() got an unexpected keyword argument {name!r}; {hint}")
            try:
                made = VLLM_ARGS[name](value)
            except ValueError as e:
                raise ValueError(f"LLM() {name}={value!r}: {e}") from None
            if made is None:
                ignored.append(name)
            for setting, setting_value in (made or {}).items():
                if setting in settings and settings[setting] != setting_value:
                    raise TypeError(f"LLM() got {set_by[setting]}={kwargs[set_by[setting]]!r} and "
                                    f"{name}={value!r}, which set the same thing differently")
                settings[setting], set_by[setting] = setting_value, name
        if ignored:
            logger.warning("LLM(): ignored %s: %s only tune vLLM's GPU internals", ", ".join(ignored),
                           "it would" if len(ignored) == 1 else "they would")
        self.seed: int | None = settings.pop("seed", None)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"LLM() seed must be an integer, got {self.seed!r}")
        self.engine = create_engine(EngineConfig(model=model, **settings))
        self._client = LocalClient(self.engine)
        self.frontend = self._client.frontend  # tokenizer, chat template, model name, context length
        self._request_ids = itertools.count()
        self._running = False  # one generate/chat at a time: each drives the engine's step loop

    def get_tokenizer(self) -> Any:
        return self.frontend.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation defaults (EngineConfig.generation_config), as
        vLLM's: what generate() and chat() use when given none."""
        return SamplingParams(**self.frontend.generation_defaults)

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
        params = _params_for(prompts, sampling_params, self.get_default_sampling_params(), "sampling_params")
        tokenized = (self._tokenize(p) + (next(params),) for p in prompts)
        return self._run(tokenized, params, "sampling_params", use_tqdm,  # type: ignore[return-value]
                         getattr(prompts, "__len__", None))

    def chat(self, messages: Conversation | Iterable[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation, then generates as `generate`.
        `tools` (OpenAI's function tools) reach the prompt in the model's tool-call format, as
        conversations' assistant `tool_calls` and `role: "tool"` turns do; as in vLLM the output is
        the model's text: `tokenmill.tools.parse_reply` reads its calls. A conversation the
        template rejects, or malformed tools, raise `RequestError`."""
        self._require("generate")
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            messages = [messages]
        frontend = self.frontend
        params = _params_for(messages, sampling_params, self.get_default_sampling_params(), "sampling_params")
        tool_request = parse_tool_request({"tools": tools}) if tools is not None else None
        fmt = tool_call_format(frontend.tokenizer)

        def templated() -> Iterator[tuple[str | None, list[int], SamplingParams | None]]:
            for conversation in messages:
                rendered, kwargs = prepare_chat(fmt, conversation, tool_request, chat_template_kwargs)
                yield frontend.tokenize_chat(rendered, add_generation_prompt, kwargs) + (next(params),)

        return self._run(templated(), params, "sampling_params", use_tqdm,  # type: ignore[return-value]
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
                number = next(self._request_ids)
                request_id = str(number)
                index_of[request_id] = index
                yield Submission(request_id, text, token_ids, self._seeded(request_params, number))
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


    def _seeded(self, params: SamplingParams | PoolingParams, number: int) -> SamplingParams | PoolingParams:
        """params with this LLM's seed for request `number` if they have none (see __init__)."""
        if self.seed is None or not isinstance(params, SamplingParams) or params.seed is not None:
            return params
        return dataclasses.replace(params, seed=request_seed(self.seed, number))


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
