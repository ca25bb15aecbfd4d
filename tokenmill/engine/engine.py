"""The engine: one step loop over the scheduler, the KV cache manager and the model runner.

It never knows which face (Python API, batch job, server) it serves: each hands it token ids and
`SamplingParams` and reads back `RequestOutput`s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil
import torch

from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.sampler import sample, top_logprobs
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Request, Sequence, Status
from tokenmill.engine.structured import StructuredOutputs
from tokenmill.kv.manager import KVCacheManager, cdiv
from tokenmill.models.loader import load_model
from tokenmill.outputs import RequestOutput, TokenLogprobs
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # top logprobs per token, as vLLM's default and OpenAI's limit


@dataclass
class EngineConfig:
    model: str | None = None
    dtype: str = "auto"
    max_num_seqs: int = 128
    # Measured (benchmarks/bench_scheduler.py, docs/PERFORMANCE.md): 256 runs a mixed job 1-4% and a
    # prompt-only job 5-14% faster than 1024 on this class of CPU.
    max_num_batched_tokens: int = 256
    kv_cache_memory: int | float = 0.2  # bytes, or a fraction of the RAM available at start
    enable_prefix_caching: bool = True
    block_size: int = 16
    max_model_len: int | None = None


@dataclass
class EngineStats:
    steps: int = 0
    computed_tokens: int = 0  # tokens run through the model, prompts and generated
    requests_finished: int = 0
    prompt_tokens: int = 0  # of finished requests
    cached_prompt_tokens: int = 0  # of those, found in the prefix cache
    generated_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # NOTE: bf16 matmuls are only fast where the CPU has native bf16 instructions.
        capability = torch.backends.cpu.get_cpu_capability()
        has_bf16 = torch.cuda.is_available() or _cpu_has_bf16() or capability == "AVX512_BF16"
        return torch.bfloat16 if has_bf16 else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
        if config.max_num_batched_tokens < config.max_num_seqs:
            logger.warning("max_num_batched_tokens=%d < max_num_seqs=%d: a step decodes at most %d sequences, "
                           "the others wait", config.max_num_batched_tokens, config.max_num_seqs,
                           config.max_num_batched_tokens)
        self.config = config
        self.dtype = resolve_dtype(config.dtype)
        loaded = load_model(config.model, self.dtype, config.max_model_len)
        self.model_path = loaded.path
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.max_model_len = loaded.max_model_len
        self._backend_tokenizer = self.tokenizer.backend_tokenizer

        block_bytes = ModelRunner.kv_bytes_per_block(loaded.model, config.block_size, self.dtype)
        budget = config.kv_cache_memory
        if isinstance(budget, float):
            if not 0 < budget <= 1:
                raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {budget}")
            budget = int(psutil.virtual_memory().available * budget)
        # Never more blocks than max_num_seqs full-length sequences could use.
        useful = config.max_num_seqs * cdiv(self.max_model_len, config.block_size)
        num_blocks = min(budget // block_bytes, useful)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} holds no KV block "
                             f"({block_bytes} bytes each)")
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.runner = ModelRunner(loaded.model, num_blocks, config.block_size, self.dtype)
        self.structured = StructuredOutputs(self.tokenizer, loaded.config.vocab_size, self.eos_token_ids)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        logger.info("KV pool: %d blocks of %d tokens (%.0f MiB)", num_blocks, config.block_size,
                    num_blocks * block_bytes / 2**20)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv.pool.num_blocks * self.kv.block_size

    def add_request(self, request_id: str, prompt: str | None, token_ids: list[int], params: SamplingParams,
                    priority: int = 0, stream: bool = False) -> RequestOutput | None:
        """Queues a request. Returns a finished output carrying the error if it cannot run at all.

        `prompt` is the text the token ids came from, if any; it is only handed back in outputs.
        Lower `priority` values are admitted first. A `stream` request's output is returned after
        every step that adds to it, not only when it finishes.
        """
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        error = self._check_prompt(token_ids, params)
        max_total = min(self.max_model_len, len(token_ids) + (params.max_tokens or self.max_model_len))
        if error is None and max_total > self.kv_capacity_tokens:
            error = (f"request needs up to {max_total} tokens of KV cache but the pool holds "
                     f"{self.kv_capacity_tokens}: raise kv_cache_memory or lower max_tokens")
        # NOTE: checked before the Request is built: its detokenizer rejects out-of-range ids by raising.
        if error is not None:
            return RequestOutput(request_id, prompt, token_ids, [], finished=True, error=error)
        request = Request(request_id, prompt, token_ids, params, max_total, priority, stream)
        if params.structured_outputs is not None:
            try:
                for seq in request.seqs:
                    seq.grammar = self.structured.matcher(params.structured_outputs)
            except ValueError as e:
                return RequestOutput(request_id, prompt, token_ids, [], finished=True, error=str(e))
        self.requests[request_id] = request
        self.scheduler.add(request.seqs[0])
        return None

    def _check_prompt(self, token_ids: list[int], params: SamplingParams) -> str | None:
        if not token_ids:
            return "the prompt is empty"
        if not all(type(t) is int for t in token_ids):
            return "prompt token ids must be integers"
        if len(token_ids) >= self.max_model_len:
            return (f"the prompt has {len(token_ids)} tokens; the model's context is {self.max_model_len} "
                    "tokens, including at least one generated")
        vocab = self.runner.model.config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            return f"prompt token ids must be in [0, {vocab})"
        if any(t >= vocab for t in params.stop_token_ids):
            return f"stop_token_ids must be in [0, {vocab})"
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > MAX_LOGPROBS:
                return f"{name} must be <= {MAX_LOGPROBS}"
        return None

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if seq.status is Status.RUNNING:
                self.kv.free(seq)
            elif seq.status is Status.WAITING and seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)
            seq.finish("abort")
        self.scheduler.running = [s for s in self.scheduler.running if not s.finished]
        request.seqs = []

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @torch.inference_mode()  # sampling edits the runner's logits (inference tensors) in place
    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns the outputs of the requests that finished in it, and of
        streaming requests that made progress."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        try:
            result = self.runner.run(batch)
        except BaseException:
            # NOTE: blocks registered for this step never got their K/V: unregister them, or a
            # later request with the same prefix would read garbage from the cache.
            self.kv.step_computed(ok=False)
            self.scheduler.requeue(batch.seqs)
            raise
        self.kv.step_computed(ok=True)
        self.stats.steps += 1
        self.stats.computed_tokens += batch.num_tokens
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        for seq, target, logits in result.prompt_logits:
            self._record_prompt_logprobs(seq.request, target, logits)

        seqs, rows = self._expand_forks(result.sample_seqs)
        # NOTE: without forks the rows are all of them, in order: no copy of the [R, vocab] logits.
        logits = result.sample_logits if len(rows) == len(result.sample_seqs) else result.sample_logits[rows]
        want_logprobs = [s.params.logprobs for s in seqs]
        raw_logprobs = logits.log_softmax(dim=-1) if any(k is not None for k in want_logprobs) else None
        constrained = [(row, s.grammar) for row, s in enumerate(seqs) if s.grammar is not None]
        if constrained:
            self.structured.apply(logits, constrained)
        tokens = sample(logits, seqs, self.eos_token_ids).tolist()
        if raw_logprobs is not None:
            chosen = [i for i, k in enumerate(want_logprobs) if k is not None]
            entries = top_logprobs(raw_logprobs[chosen], torch.tensor(tokens)[chosen],
                                   [want_logprobs[i] for i in chosen])
            for i, entry in zip(chosen, entries):
                self._decode_logprob_tokens(entry)
                seqs[i].logprobs.append(entry)

        for seq in seqs:  # before any token is appended, which may finish and free the parent
            if seq.status is Status.FORK_PENDING:
                self._fork(seq)
        for seq, token in zip(seqs, tokens):
            self._append_and_check(seq, token)
        self.scheduler.running = [s for s in self.scheduler.running if not s.finished]

        outputs = []
        for request in {s.request.request_id: s.request for s in seqs}.values():
            if request.stream and not request.finished:
                outputs.append(request.to_output())
            elif request.finished and self.requests.pop(request.request_id, None) is not None:
                outputs.append(request.to_output())
                # NOTE: breaks the request <-> sequence cycle, so that memory (native decoder
                # state included) is freed now rather than at a rare full garbage collection.
                request.seqs = []
                self.stats.requests_finished += 1
                self.stats.prompt_tokens += len(request.prompt_token_ids)
                self.stats.cached_prompt_tokens += request.num_cached_tokens or 0
                self.stats.generated_tokens += sum(len(c.token_ids) for c in outputs[-1].outputs)
        return outputs

    def _expand_forks(self, sample_seqs: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """A prompt that finished for a request with n > 1 samples once for each of its n sequences."""
        seqs, rows = [], []
        for row, seq in enumerate(sample_seqs):
            siblings = seq.request.seqs
            if seq.index == 0 and seq.num_output_tokens == 0 and len(siblings) > 1:
                seqs.extend(siblings)
                rows.extend([row] * len(siblings))
            else:
                seqs.append(seq)
                rows.append(row)
        return seqs, rows

    def _fork(self, child: Sequence) -> None:
        parent = child.request.seqs[0]
        if self.kv.can_fork(parent):
            copy = self.kv.fork(parent, child)
            if copy is not None:
                self.runner.copy_block(*copy)
            self.scheduler.add_running(child)
        else:  # no block free for the copy: recompute the child, mostly from the prefix cache
            child.status = Status.WAITING
            self.scheduler.waiting.appendleft(child)

    def _append_and_check(self, seq: Sequence, token: int) -> None:
        params = seq.params
        piece = seq.append_token(token, self._backend_tokenizer)
        may_stop = seq.num_output_tokens >= params.min_tokens
        if seq.grammar is not None:
            seq.grammar.accept_token(token)
        if seq.grammar is not None and seq.grammar.is_terminated():  # the grammar is complete and closed
            seq.finish("stop")
            if token in self.eos_token_ids and piece:
                seq.text = seq.text[:-len(piece)]
        elif may_stop and (token in params.stop_token_ids
                         or (token in self.eos_token_ids and not params.ignore_eos)):
            seq.finish("stop", token if token in params.stop_token_ids else None)
            if piece and not params.include_stop_str_in_output:  # as vLLM: the stop token's text is left out
                seq.text = seq.text[:-len(piece)]
        elif may_stop and params.stop_strings and piece:
            self._check_stop_strings(seq, len(piece))
        if not seq.finished and (seq.num_output_tokens >= (params.max_tokens or self.max_model_len)
                                 or seq.num_tokens >= seq.request.max_total_tokens):
            seq.finish("length")
        if seq.finished:
            if seq in self.scheduler.waiting:  # a fork that had no block to copy into
                self.scheduler.waiting.remove(seq)
            self.kv.free(seq)

    @staticmethod
    def _check_stop_strings(seq: Sequence, new_chars: int) -> None:
        # A new stop string can only end inside the new text: search just the tail that could hold it.
        end = len(seq.text) - new_chars
        hits = [(pos, s) for s in seq.params.stop_strings if (pos := seq.text.find(s, max(0, end - len(s) + 1))) >= 0]
        if hits:
            pos, stop = min(hits)
            seq.text = seq.text[:pos + len(stop)] if seq.params.include_stop_str_in_output else seq.text[:pos]
            seq.finish("stop", stop)

    def _record_prompt_logprobs(self, request: Request, target: int, logits: torch.Tensor) -> None:
        # After a preemption the prompt is recomputed: keep only rows not recorded before.
        skip = len(request.prompt_logprobs) - target
        if skip >= logits.shape[0]:
            return
        if skip > 0:
            logits, target = logits[skip:], target + skip
        ids = torch.tensor(request.prompt_token_ids[target:target + logits.shape[0]])
        entries = top_logprobs(logits.log_softmax(dim=-1), ids, [request.params.prompt_logprobs] * len(ids))
        for entry in entries:
            self._decode_logprob_tokens(entry)
        request.prompt_logprobs.extend(entries)

    def _decode_logprob_tokens(self, entry: TokenLogprobs) -> None:
        for token_id, logprob in entry.items():
            logprob.decoded_token = self.tokenizer.decode([token_id])
