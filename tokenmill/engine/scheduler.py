"""Decides, each step, how many new tokens each sequence computes.

There are no prefill and decode phases: a sequence simply has `num_computed_tokens` behind
`num_tokens`. Under one token budget, running sequences are served first (a decode is one token,
a long prompt is cut into chunks), then waiting ones are admitted while KV blocks last. When blocks
run out, the newest running sequence of the lowest priority is preempted: its blocks are freed
and it is recomputed later (cheaply, since its full blocks usually stay in the prefix cache).
Waiting sequences are admitted by priority (interactive requests before batch jobs), then in
arrival order.

The scheduler alone changes a sequence's status: it queues a request's sequences, admits them,
preempts, requeues after a failed step, finishes and aborts them, and gives their KV blocks back.
The n samples of a request are n sequences queued together; the later ones find the prompt in the
prefix cache (computed by the first in the same or an earlier step) and compute only its last
partial block, so the prompt is computed once without any fork or block copy.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tokenmill.engine.sequence import Request, Sequence, Status
from tokenmill.kv.manager import KVCacheManager


class WaitQueue:
    """Waiting sequences: lower priority values first, first come first served within one."""

    def __init__(self) -> None:
        self.queues: dict[int, deque[Sequence]] = {}

    def _queue(self, seq: Sequence) -> deque[Sequence]:
        priority = seq.request.priority
        if priority not in self.queues:
            self.queues = dict(sorted({**self.queues, priority: deque()}.items()))
        return self.queues[priority]

    def append(self, seq: Sequence) -> None:
        self._queue(seq).append(seq)

    def appendleft(self, seq: Sequence) -> None:
        self._queue(seq).appendleft(seq)

    def peek(self) -> Sequence:
        return next(q[0] for q in self.queues.values() if q)

    def popleft(self) -> Sequence:
        return next(q for q in self.queues.values() if q).popleft()

    def remove(self, seq: Sequence) -> None:
        self._queue(seq).remove(seq)

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self._queue(seq)

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting = WaitQueue()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        for seq in request.seqs:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        priorities = {s.request.priority for s in self.running} | {q for q, d in self.waiting.queues.items() if d}
        if len(priorities) > 1:
            # NOTE: mixed with lower-priority (batch) work, interactive requests would wait on long
            # steps full of batch prefill chunks; shorter steps keep their time to first token low.
            budget = min(budget, max(budget // 4, 2 * len(self.running)))

        # A waiting request never waits for a sequence slot behind lower-priority work.
        while self.waiting and self.running and len(self.running) >= self.max_num_seqs:
            victim = self._lowest_priority()
            if self.running[victim].request.priority <= self.waiting.peek().request.priority:
                break
            self._preempt(self.running.pop(victim))

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            pending = seq.num_tokens - seq.num_computed_tokens
            num_new = min(pending + len(seq.draft_token_ids), budget)
            del seq.draft_token_ids[max(0, num_new - pending):]  # the drafts the budget leaves room for
            while not self.kv.allocate_slots(seq, num_new):
                victim = self._pick_victim(first=i)
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.peek()
            computed = self.kv.get_computed_blocks(seq)
            num_cached = len(computed) * self.kv.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(seq, num_new, computed):
                break
            if seq.index == 0 and seq.num_output_tokens == 0 and seq.request.num_cached_tokens is None:
                seq.request.num_cached_tokens = num_cached
                seq.request.metrics.first_scheduled_time = time.monotonic()
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def _pick_victim(self, first: int) -> Sequence:
        """Among running[first:] (not yet scheduled this step), the newest of the lowest priority."""
        return self.running.pop(self._lowest_priority(first))

    def _lowest_priority(self, first: int = 0) -> int:
        return max(range(first, len(self.running)), key=lambda i: (self.running[i].request.priority, i))

    def advance(self, batch: ScheduledBatch) -> None:
        """The batch's step ran: its tokens' K/V are in the pool (a drafted token's counts only once
        its sample agrees with it: the engine sets those)."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n - len(seq.draft_token_ids)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Ends a running sequence; its blocks go back to the pool (full ones stay in the prefix cache)."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.finish(reason, stop_reason)

    def abort(self, request: Request) -> None:
        for seq in request.seqs:
            if seq.status is Status.RUNNING:
                self.running.remove(seq)
                self.kv.free(seq)
            elif seq.status is Status.WAITING:
                self.waiting.remove(seq)
            seq.finish("abort")

    def requeue(self, seqs: list[Sequence]) -> None:
        """Puts sequences back to be recomputed from scratch (their step failed)."""
        self.running = [s for s in self.running if s not in seqs]
        for seq in reversed(seqs):
            self._preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.draft_token_ids.clear()
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
