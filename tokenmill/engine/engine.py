"""The engine: one step loop over the scheduler, the KV cache manager and the model runner.

It never knows which face (Python API, batch job, server) it serves: each hands it token ids and
`SamplingParams` and reads back `RequestOutput`s. The scheduler alone changes a sequence's status
(admitted, preempted, finished, aborted); the engine decides *why* a sequence stops and tells it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import psutil
import torch

from tokenmill.engine.config import EngineConfig, resolve_device, resolve_dtype
from tokenmill.engine.gpu_memory import gpu_kv_budget, step_activation_bytes
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.sampler import sample, top_logprobs
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Request, Sequence
from tokenmill.engine.speculation import MAX_DRAFT, Draft, DraftPolicy, propose
from tokenmill.engine.structured import StructuredOutputs
from tokenmill.errors import INTERNAL_ERROR, RequestError
from tokenmill.kv.manager import KVCacheManager, attention_reach, cdiv
from tokenmill.models.loader import load_model
from tokenmill.outputs import RequestOutput, TokenLogprobs
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # top logprobs per token, as vLLM's default and OpenAI's limit


def check_token_ids(token_ids: list[int], vocab_size: int) -> RequestError | None:
    """Why a prompt's token ids cannot run, if they cannot: empty, not integers, or out of the vocabulary."""
    if not token_ids:
        return RequestError("invalid_value", "the prompt is empty", "prompt")
    if not all(type(t) is int for t in token_ids):
        return RequestError("invalid_type", "prompt token ids must be integers", "prompt")
    if min(token_ids) < 0 or max(token_ids) >= vocab_size:
        return RequestError("invalid_value", f"prompt token ids must be in [0, {vocab_size})", "prompt")
    return None


@dataclass
class EngineStats:
    steps: int = 0
    computed_tokens: int = 0  # tokens run through the model, prompts and generated
    requests_finished: int = 0
    prompt_tokens: int = 0  # of finished requests
    cached_prompt_tokens: int = 0  # of those, found in the prefix cache
    generated_tokens: int = 0  # sampled, counted at each step
    requests_failed_internally: int = 0  # failed by an error inside the engine (see RequestError.internal)
    # Time in steps that ran fewer than half of max_num_seqs sequences with none waiting: the machine
    # not full for lack of work (a job's tail, where its longest requests run on alone).
    thin_batch_seconds: float = 0.0
    # Steps that only decoded (one new token per sequence, its drafts beside it; no prompt tokens): their time and
    # the tokens they produced, so that decode speed is told apart from prefill (llama-batched-bench's S_TG).
    decode_seconds: float = 0.0
    decode_tokens: int = 0
    draft_tokens: int = 0  # drafted and verified (speculation.py)
    accepted_draft_tokens: int = 0  # of those, kept

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True)
class EngineMetrics:
    """A snapshot of the engine's counters and gauges, for `/metrics`, batch summaries and benchmarks."""

    stats: EngineStats  # a copy: cumulative since the engine started
    sequences_running: int
    sequences_waiting: int
    kv_cache_usage: float  # share of KV blocks held by sequences
    kv_cache_capacity_tokens: int
    num_preemptions: int


class Engine:
    """Generates. Not thread-safe: one thread drives it (the caller's, or an `EngineThread`'s step loop).

    NOTE: other threads may call `metrics()` (plain counters copied at once; a snapshot taken
    mid-step may mix two steps) and read the attributes set in `__init__` that never change after it:
    config, dtype, model_name, model_path, quantization, tokenizer, eos_token_ids, max_model_len, vocab_size,
    generation_defaults, structured (whose grammar compiler is itself thread-safe). Nothing else.
    """

    task = "generate"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        loaded = load_model(config.model, self.dtype, config.max_model_len, config.quantization, config.tokenizer,
                            config.generation_config, self.device)
        self.model_path = loaded.path
        self.model_name = loaded.name
        self.quantization = loaded.quantization
        logger.info("%s on %s: weights %s, activations %s", self.model_name, self.device, self.quantization, self.dtype)
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.max_model_len = loaded.max_model_len
        self.vocab_size: int = loaded.config.vocab_size
        self.generation_defaults = loaded.generation_defaults
        self._backend_tokenizer = self.tokenizer.backend_tokenizer

        block_bytes = ModelRunner.kv_bytes_per_block(loaded.model, config.block_size, self.dtype)
        step_tokens = config.step_tokens(self.task, self.device)
        budget = config.kv_cache_memory  # normalised by EngineConfig: bytes, or a fraction of the available RAM
        if self.device.type == "cuda" and isinstance(budget, float):
            budget = gpu_kv_budget(self.device, config.gpu_memory_utilization,
                                   step_activation_bytes(loaded.config, step_tokens, config.max_num_seqs))
        elif isinstance(budget, float):
            budget = int(psutil.virtual_memory().available * budget)
        # Never more blocks than max_num_seqs full-length sequences could use.
        useful = config.max_num_seqs * cdiv(self.max_model_len, config.block_size)
        num_blocks = min(budget // block_bytes, useful)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} holds no KV block "
                             f"({block_bytes} bytes each)")
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                 attention_reach(loaded.model.kv_layout.windows))
        self.runner = ModelRunner(loaded.model, num_blocks, config.block_size, self.device)
        self.structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, step_tokens)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self.drafts = DraftPolicy() if config.speculative == "ngram" else None
        logger.info("KV pool: %d blocks of %d tokens (%.0f MiB)", num_blocks, config.block_size,
                    num_blocks * block_bytes / 2**20)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv.pool.num_blocks * self.kv.block_size

    def metrics(self) -> EngineMetrics:
        return EngineMetrics(replace(self.stats), len(self.scheduler.running), len(self.scheduler.waiting),
                             self.kv.usage, self.kv_capacity_tokens, self.scheduler.num_preemptions)

    def add_request(self, request_id: str, prompt: str | None, token_ids: list[int],
                    params: SamplingParams | PoolingParams, priority: int = 0,
                    stream: bool = False) -> RequestOutput | None:
        """Queues a request. Returns a finished output carrying a `RequestError` if it cannot run at all.

        `prompt` is the text the token ids came from, if any; it is only handed back in outputs.
        Lower `priority` values are admitted first. A `stream` request's output is returned after
        every step that adds to it, not only when it finishes. An id already in use raises ValueError.
        """
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            error = RequestError("wrong_task", f"model {self.model_name} generates text; it cannot embed")
            return RequestOutput(request_id, prompt, token_ids, [], finished=True, error=error)
        max_new = self.max_model_len if params.max_tokens is None else params.max_tokens
        max_total = min(self.max_model_len, len(token_ids) + max_new)
        # NOTE: checked before the Request is built: its detokenizer rejects out-of-range ids by raising.
        error = self._check_prompt(token_ids, params, max_total)
        if error is None:
            bad_words, error = self._tokenize_bad_words(params.bad_words or [])
        if error is None:
            request = Request(request_id, prompt, token_ids, params, max_total, priority, stream, bad_words)
            try:
                if params.structured_outputs is not None:
                    for seq in request.seqs:
                        seq.grammar = self.structured.matcher(params.structured_outputs)
            except ValueError as e:
                error = RequestError("invalid_value", str(e), "response_format")
        if error is not None:
            return RequestOutput(request_id, prompt, token_ids, [], finished=True, error=error)
        self.requests[request_id] = request
        self.scheduler.add_request(request)
        return None

    def _check_prompt(self, token_ids: list[int], params: SamplingParams, max_total: int) -> RequestError | None:
        if error := check_token_ids(token_ids, self.vocab_size):
            return error
        prompt_only = params.max_tokens == 0
        if len(token_ids) > self.max_model_len - (not prompt_only):  # room for one generated token
            generated = "" if prompt_only else ", including at least one generated"
            return RequestError("context_length_exceeded",
                                f"the prompt has {len(token_ids)} tokens; the model's context is "
                                f"{self.max_model_len} tokens{generated}", "prompt")
        vocab = self.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ()),
                          ("allowed_token_ids", params.allowed_token_ids or ())):
            if any(t >= vocab for t in ids):
                return RequestError("invalid_value", f"{name} token ids must be in [0, {vocab})", name)
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > MAX_LOGPROBS:
                return RequestError("invalid_value", f"{name} must be <= {MAX_LOGPROBS}", name)
        # Windowed models hold the blocks of their reach only (see KVCacheManager), whatever the length.
        needed = min(max_total, self.kv.max_blocks_held(max_total, self.scheduler.max_num_batched_tokens)
                     * self.kv.block_size)
        if needed > self.kv_capacity_tokens:
            return RequestError("kv_cache_too_small",
                                f"request needs up to {needed} tokens of KV cache but the pool holds "
                                f"{self.kv_capacity_tokens}: raise kv_cache_memory or lower max_tokens", "max_tokens")
        return None

    def _tokenize_bad_words(self, words: list[str]) -> tuple[list[list[int]], RequestError | None]:
        """Each bad word's token ids, as it is and after a space (see SamplingParams.bad_words)."""
        spellings = {tuple(self.tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
                     for word in words for prefix in ("", " ")}
        if any(t >= self.vocab_size for ids in spellings for t in ids):
            return [], RequestError("invalid_value", "bad_words tokenize to ids outside the model's vocabulary",
                                    "bad_words")
        return [list(ids) for ids in spellings if ids], None

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.abort(request)
            request.seqs = []

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @torch.inference_mode()  # sampling edits the runner's logits (inference tensors) in place
    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns the outputs of the requests that finished in it, and of
        streaming requests that made progress.

        An exception inside the step (a bug, an out-of-memory) is logged with its traceback and fails
        the requests of that batch with an internal `RequestError`; the other requests go on.
        """
        self._draft()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        decodes_only = all(s.num_tokens - s.num_computed_tokens == 1 for s in batch.seqs)
        started = time.perf_counter()
        try:
            result = self.runner.run(batch)
            for seq, target, logits in result.prompt_logits:
                self._record_prompt_logprobs(seq.request, target, logits)
            seqs = result.sample_seqs
            # One row per sequence, and one per draft after it (speculation.py).
            rows = [(seq, ahead) for seq in seqs for ahead in range(1 + len(seq.draft_token_ids))]
            tokens = self._sample([seq for seq, _ in rows], result.sample_logits, [ahead for _, ahead in rows])
        except Exception as e:
            # NOTE: blocks registered for this step never got their K/V: unregister them, or a
            # later request with the same prefix would read garbage from the cache.
            self.kv.step_computed(ok=False)
            logger.exception("an engine step failed; its %d sequences' requests fail", len(batch.seqs))
            return self._fail_internally({s.request.request_id for s in batch.seqs}, e)
        except BaseException:  # interrupted: the sequences are recomputed if the engine is used again
            self.kv.step_computed(ok=False)
            self.scheduler.requeue(batch.seqs)
            raise
        self.kv.step_computed(ok=True)
        self.scheduler.advance(batch)
        self.stats.steps += 1
        self.stats.computed_tokens += batch.num_tokens
        now = time.monotonic()
        row, generated_before = 0, self.stats.generated_tokens
        for seq in seqs:
            drafts = seq.draft_token_ids
            sampled = tokens[row:row + 1 + len(drafts)]
            row += len(sampled)
            # Drafts are kept while each equals the sample of the position before it; the first
            # sample that differs (or the one after the last draft) is the step's last token.
            accepted = 0
            while accepted < len(drafts) and sampled[accepted] == drafts[accepted]:
                accepted += 1
            seq.num_computed_tokens += accepted  # those drafts' K/V are the sequence's own now
            seq.draft_token_ids = []
            if drafts:
                self.drafts.observe_drafts(seq.draft_match_class, len(drafts), accepted)
                self.stats.draft_tokens += len(drafts)
                self.stats.accepted_draft_tokens += accepted
            if seq.request.metrics.first_token_time is None:
                seq.request.metrics.first_token_time = now
            for token in sampled[:accepted + 1]:
                self.stats.generated_tokens += 1
                self._append_and_check(seq, token)
                if seq.finished:
                    break
        for seq in result.computed_prompts:  # max_tokens 0: the prompt was all there was to do
            self.scheduler.finish(seq, "length")
        seconds = time.perf_counter() - started
        if decodes_only:
            self.stats.decode_seconds += seconds
            self.stats.decode_tokens += self.stats.generated_tokens - generated_before
            if self.drafts is not None:
                self.drafts.observe_step(batch.num_tokens, seconds)
        if 2 * len(batch.seqs) < self.scheduler.max_num_seqs and not self.scheduler.waiting:
            self.stats.thin_batch_seconds += seconds
        return self._collect_outputs(seqs + result.computed_prompts)

    def _draft(self) -> None:
        """Drafts for the running sequences that decode, as many as the policy gives the batch."""
        if self.drafts is None:
            return
        running = self.scheduler.running
        proposed = [Draft([], 0) for _ in running]  # none also clears what a step the budget cut short left
        if self.drafts.may_draft(len(running)):
            # Room for the step's own token and the drafts within max_tokens and the context.
            proposed = [propose(seq.token_ids, min(MAX_DRAFT, seq.request.max_total_tokens - seq.num_tokens - 1))
                        if seq.params.can_speculate and seq.num_computed_tokens == seq.num_tokens - 1 else Draft([], 0)
                        for seq in running]
            lengths = self.drafts.draft_lengths(len(running), proposed)
            proposed = [Draft(draft.tokens[:length], draft.match_class) for draft, length in zip(proposed, lengths)]
        for seq, draft in zip(running, proposed):
            seq.draft_token_ids, seq.draft_match_class = draft.tokens, draft.match_class

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, ahead: list[int]) -> list[int]:
        """One token per row, of the sequence beside it (`ahead` tokens after its next: sampler.sample);
        records the logprobs asked for."""
        want_logprobs = [s.params.logprobs for s in seqs]
        raw_logprobs = logits.log_softmax(dim=-1) if any(k is not None for k in want_logprobs) else None
        constrained = [(row, s.grammar) for row, s in enumerate(seqs) if s.grammar is not None]
        if constrained:
            self.structured.apply(logits, constrained)
        tokens = sample(logits, seqs, self.eos_token_ids, ahead).tolist()
        if raw_logprobs is not None:
            chosen = [i for i, k in enumerate(want_logprobs) if k is not None]
            entries = top_logprobs(raw_logprobs[chosen], torch.tensor(tokens, device=logits.device)[chosen],
                                   [want_logprobs[i] for i in chosen])
            for i, entry in zip(chosen, entries):
                self._decode_logprob_tokens(entry)
                seqs[i].logprobs.append(entry)
                seqs[i].cumulative_logprob += entry[tokens[i]].logprob
        return tokens

    def _collect_outputs(self, seqs: list[Sequence]) -> list[RequestOutput]:
        outputs = []
        for request in {s.request.request_id: s.request for s in seqs}.values():
            if request.stream and not request.finished:
                outputs.append(request.to_output())
            elif request.finished and self.requests.pop(request.request_id, None) is not None:
                request.metrics.finished_time = time.monotonic()
                outputs.append(request.to_output())
                # NOTE: breaks the request <-> sequence cycle, so that memory (native decoder
                # state included) is freed now rather than at a rare full garbage collection.
                request.seqs = []
                self.stats.requests_finished += 1
                self.stats.prompt_tokens += len(request.prompt_token_ids)
                self.stats.cached_prompt_tokens += request.num_cached_tokens or 0
        return outputs

    def _fail_internally(self, request_ids: set[str], cause: Exception) -> list[RequestOutput]:
        error = RequestError(INTERNAL_ERROR, f"internal engine error ({type(cause).__name__}: {cause}); "
                                             "the request can be retried")
        outputs = []
        for request_id in request_ids:
            request = self.requests[request_id]
            self.abort_request(request_id)
            outputs.append(RequestOutput(request_id, request.prompt, request.prompt_token_ids, [], finished=True,
                                         error=error))
            self.stats.requests_failed_internally += 1
        return outputs

    def _append_and_check(self, seq: Sequence, token: int) -> None:
        params = seq.params
        piece = seq.append_token(token, self._backend_tokenizer)
        may_stop = seq.num_output_tokens >= params.min_tokens
        if seq.grammar is not None:
            seq.grammar.accept_token(token)
        if seq.grammar is not None and seq.grammar.is_terminated():  # the grammar is complete and closed
            if token in self.eos_token_ids and piece:
                seq.text = seq.text[:-len(piece)]
            self.scheduler.finish(seq, "stop")
        elif may_stop and (token in params.stop_token_ids
                           or (token in self.eos_token_ids and not params.ignore_eos)):
            if piece and not params.include_stop_str_in_output:  # as vLLM: the stop token's text is left out
                seq.text = seq.text[:-len(piece)]
            self.scheduler.finish(seq, "stop", token if token in params.stop_token_ids else None)
        elif may_stop and params.stop_strings and piece and (stop := self._find_stop_string(seq, len(piece))):
            self.scheduler.finish(seq, "stop", stop)
        elif seq.num_tokens >= seq.request.max_total_tokens:  # max_tokens, or the context
            self.scheduler.finish(seq, "length")

    @staticmethod
    def _find_stop_string(seq: Sequence, new_chars: int) -> str | None:
        """The stop string the new text completes, if any; cuts seq.text at it."""
        # A new stop string can only end inside the new text: search just the tail that could hold it.
        end = len(seq.text) - new_chars
        hits = [(pos, s) for s in seq.params.stop_strings if (pos := seq.text.find(s, max(0, end - len(s) + 1))) >= 0]
        if not hits:
            return None
        pos, stop = min(hits)
        seq.text = seq.text[:pos + len(stop)] if seq.params.include_stop_str_in_output else seq.text[:pos]
        return stop

    def _record_prompt_logprobs(self, request: Request, target: int, logits: torch.Tensor) -> None:
        # After a preemption the prompt is recomputed: keep only rows not recorded before.
        skip = len(request.prompt_logprobs) - target
        if skip >= logits.shape[0]:
            return
        if skip > 0:
            logits, target = logits[skip:], target + skip
        ids = torch.tensor(request.prompt_token_ids[target:target + logits.shape[0]], device=logits.device)
        entries = top_logprobs(logits.log_softmax(dim=-1), ids, [request.params.prompt_logprobs] * len(ids))
        for entry in entries:
            self._decode_logprob_tokens(entry)
        request.prompt_logprobs.extend(entries)

    def _decode_logprob_tokens(self, entry: TokenLogprobs) -> None:
        for token_id, logprob in entry.items():
            logprob.decoded_token = self.tokenizer.decode([token_id])
