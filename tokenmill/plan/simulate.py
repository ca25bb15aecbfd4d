"""A batch job run without the model: the engine's own admission, prefix cache and eviction, with
each step priced by a `CostModel` and each sequence ending after a length drawn from real outputs.

`SimulatedEngine` is an `Engine` whose step does everything the real step does except the model:
the real `Scheduler` and `KVCacheManager` (the loaded engine's pool size, block size and step
budget; the engine's own chained block hashes, reference counts and LRU free queue), requests
checked by the real `add_request`, prompt-only and sampled rows chosen as the model runner chooses
them. Fed by the batch runner's own `LineExecutor` through a `LocalClient`, a simulated job reads,
validates, tokenizes, orders (the window heap, the in-flight window) and writes its error records
exactly as `tokenmill run` does; what differs is only what the model would have said: each
sequence gets placeholder tokens, as many as `OutputLengths` draws for it.

So the prefix-cache figures are the engine's own, given the output lengths: which blocks a request
finds depends on what ran, finished and was evicted before it, and that depends on when sequences
end. The clock is the sum of the priced steps.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass

from tokenmill.engine.engine import Engine, EngineStats
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence
from tokenmill.kv.manager import KVCacheManager
from tokenmill.outputs import RequestOutput
from tokenmill.plan.cost import CostModel, read_batch
from tokenmill.plan.prefixes import SharedPrefixes
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams

# The placeholder every simulated sequence generates. Its value never matters: no prompt continues
# into generated tokens, so the blocks it fills are never found by another request.
PLACEHOLDER_TOKEN = 0
# What the engine's __init__ sets once and never changes (Engine's docstring), shared with the loaded engine.
_FIXED_ENGINE_ATTRIBUTES = ("config", "dtype", "model_name", "model_path", "quantization", "tokenizer",
                            "eos_token_ids", "max_model_len", "vocab_size", "generation_defaults", "structured")


@dataclass(frozen=True)
class Observed:
    """One sequence's real output: its request's max_tokens (None: up to the context) and its length."""

    max_tokens: int | None
    length: int


class OutputLengths:
    """Draws a sequence's output length from real ones, preferring those of requests with the same
    max_tokens (the same kind of line, usually); the same request id and sample always get the same.

    A drawn length is capped by the sequence's own room (its max_tokens, the context). An output
    that was itself cut by a smaller max_tokens is a lower bound of what the model would have said:
    it is used as it is.
    """

    def __init__(self, observed: list[Observed]) -> None:
        self.observed = observed
        self.by_limit: dict[int | None, list[int]] = defaultdict(list)
        for o in observed:
            self.by_limit[o.max_tokens].append(o.length)

    def draw(self, key: str, max_tokens: int | None, room: int) -> int:
        lengths = self.by_limit.get(max_tokens) or [o.length for o in self.observed]
        if not lengths:  # nothing observed: the sequence runs to its limit
            return room
        length = lengths[zlib.crc32(key.encode()) % len(lengths)]
        return max(1, min(length, room))


class SimulatedEngine(Engine):
    """The loaded engine's admission and KV cache with a model that costs `cost` per step and says
    nothing: see the module docstring. Its `clock` is the simulated seconds so far; each finished
    request's full prompt blocks go to `prefixes`. The loaded engine is only read, never stepped,
    and keeps its own pool."""

    def __init__(self, engine: Engine, cost: CostModel, lengths: OutputLengths,
                 prefixes: SharedPrefixes | None = None) -> None:
        # NOTE: Engine.__init__ is not called: it would load the weights again. The attributes that
        # never change after it are the loaded engine's; the mutable state (pool, scheduler,
        # requests, stats) is this simulation's own, so the loaded engine's cache stays valid.
        for name in _FIXED_ENGINE_ATTRIBUTES:
            setattr(self, name, getattr(engine, name))
        self.kv = KVCacheManager(engine.kv.pool.num_blocks, engine.kv.block_size, engine.kv.enable_prefix_caching,
                                 engine.kv.reach)
        self.scheduler = Scheduler(self.kv, self.config.max_num_seqs, self.config.step_tokens(self.task))
        self.requests = {}
        self.stats = EngineStats()
        self.block_bytes = engine.runner.kv_cache.nbytes // engine.kv.pool.num_blocks
        self.cost = cost
        self.lengths = lengths
        self.clock = 0.0
        self.targets: dict[str, list[int]] = {}  # request id -> each sample's output length
        self.peak_blocks_in_use = 0  # held by running sequences
        # NOTE: the pool's memory is committed page by page as blocks are first written, and the
        # free queue hands out never-used blocks in ascending order: the highest block id used so
        # far + 1 is how much of the pool is resident.
        self.blocks_touched = 0
        self.prefixes = prefixes
        # What the accepted requests ask for: n x max_tokens where set, how many set none, and
        # n x the room their max_tokens and the context leave.
        self.requested_output_tokens = self.requests_without_max_tokens = self.context_allowed_output_tokens = 0

    def add_request(self, request_id: str, prompt: str | None, token_ids: list[int],
                    params: SamplingParams | PoolingParams, priority: int = 0,
                    stream: bool = False) -> RequestOutput | None:
        failed = super().add_request(request_id, prompt, token_ids, params, priority, stream)
        if failed is None:
            request = self.requests[request_id]
            room = request.max_total_tokens - len(token_ids)
            n, max_tokens = request.params.n, request.params.max_tokens
            self.targets[request_id] = [self.lengths.draw(f"{request_id}:{i}", max_tokens, room) for i in range(n)]
            if max_tokens is None:
                self.requests_without_max_tokens += 1
            else:
                self.requested_output_tokens += n * max_tokens
            self.context_allowed_output_tokens += n * room
        return failed

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        plan = read_batch(batch, self.kv.block_size)
        self.clock += self.cost.seconds(plan.work)
        self.kv.step_computed(ok=True)
        self.scheduler.advance(batch)
        self.stats.steps += 1
        self.stats.computed_tokens += batch.num_tokens
        self.stats.generated_tokens += len(plan.sampled)
        self._track_memory(batch.seqs)
        for seq in plan.sampled:
            seq.token_ids.append(PLACEHOLDER_TOKEN)
            if (seq.num_output_tokens >= self.targets[seq.request.request_id][seq.index]
                    or seq.num_tokens >= seq.request.max_total_tokens):
                self._finish(seq)
        for seq in plan.computed_prompts:
            self._finish(seq)
        return self._collect_outputs(plan.sampled + plan.computed_prompts)

    def _finish(self, seq: Sequence) -> None:
        if seq.index == 0 and self.prefixes is not None:
            self.prefixes.add(seq.block_hashes[:seq.num_prompt_tokens // self.kv.block_size],
                              seq.token_ids)
        if all(s.finished or s is seq for s in seq.request.seqs):
            del self.targets[seq.request.request_id]
        self.scheduler.finish(seq, "length")

    def _track_memory(self, seqs: list[Sequence]) -> None:
        pool = self.kv.pool
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, pool.num_blocks - pool.num_free)
        for seq in seqs:
            if seq.block_table:
                self.blocks_touched = max(self.blocks_touched, max(seq.block_table) + 1)
