"""The KV cache manager: the narrow interface between the scheduler and the block pool.

The scheduler asks three things: which leading blocks of a new sequence are already cached
(`get_computed_blocks`), whether room can be made for N more tokens of a sequence
(`allocate_slots`), and to give a sequence's blocks back (`free`). A full block is identified by a
hash chained over its parent's hash and its token ids, so equal prefixes map to equal blocks.

When every layer of the model attends within a sliding window, a query at position p reads
positions p - reach + 1 .. p only (`reach`: the largest window, chosen once at start-up). Once a
sequence's computed tokens have passed a block's end by the reach, no future query of it reads that
block: `allocate_slots` gives it back first (a full block keeps its hash, findable and evictable as
any freed cached block), so a sequence holds about reach / block_size + 1 blocks however long it
grows. The leading `num_released_blocks` entries of its block table keep their positions and point
at `RELEASED`, as the model runner's padding does: never written (new tokens go to later blocks),
and what a backend reads there lies before every query's window, masked (the torch backend reads
from the earliest query's window start, the CPU kernels from the multiple of 16 at or below it).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence as Blocks

from tokenmill.engine.sequence import Sequence
from tokenmill.kv.block_pool import BlockPool

RELEASED = 0  # the block-table entry of a block given back out of reach (see the module docstring)


def next_block_hash(parent: bytes, tokens: Blocks[int]) -> bytes:
    """A full block's hash: over its parent's (b"" for the first block) and its token ids, so that
    equal hashes mean equal prefixes up to and including this block."""
    return hashlib.sha256(parent + array("i", tokens).tobytes()).digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def attention_reach(windows: tuple[int | None, ...]) -> int | None:
    """How many tokens back (itself included) a query of the model reads: the largest window when
    every layer has one, None when some layer attends to the whole context."""
    return None if not windows or None in windows else max(w for w in windows if w is not None)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 reach: int | None = None) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.reach = reach  # see the module docstring; None: every block is kept until the sequence ends
        # Blocks made findable for this step, whose K/V the step has yet to compute.
        self.registered_this_step: list[int] = []

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def max_blocks_held(self, num_tokens: int, step_tokens: int) -> int:
        """The most blocks a sequence of num_tokens tokens holds at once, computing at most
        step_tokens of them per step: all of them, unless the reach lets the oldest go."""
        blocks = cdiv(num_tokens, self.block_size)
        if self.reach is None:
            return blocks
        # The blocks from the earliest query's reach (reach - 1 back) to the last new token, which
        # may straddle block boundaries at both ends.
        return min(blocks, (self.reach - 2 + step_tokens) // self.block_size + 2)

    def _hash_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Extends seq.block_hashes over the full blocks among its first num_tokens tokens."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_tokens // bs):
            parent = seq.block_hashes[i - 1] if i else b""
            seq.block_hashes.append(next_block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs]))

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold a prefix of seq's tokens. They are not yet acquired."""
        # NOTE: the sequence that records prompt logprobs computes its whole prompt, for the logits;
        # the request's other samples still find it in the cache.
        if not self.enable_prefix_caching or (seq.request.prompt_logprobs is not None and seq.index == 0):
            return []
        # NOTE: the last token is always computed, so that there are logits to sample from.
        self._hash_full_blocks(seq, seq.num_tokens - 1)
        blocks = []
        for block_hash in seq.block_hashes:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: Blocks[int] = ()) -> bool:
        """Makes room for num_new_tokens after seq's computed (and newly found cached) tokens.

        Blocks out of the sequence's reach are given back (or, found cached, never taken) first, as
        they are of no use to it whatever follows. Returns False, changing nothing else, when the
        pool cannot supply the blocks.
        """
        num_computed = seq.num_computed_tokens + len(computed_blocks) * self.block_size
        num_blocks_needed = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = num_blocks_needed - len(seq.block_table) - len(computed_blocks)
        out_of_reach = 0 if self.reach is None else max(0, num_computed - self.reach + 1) // self.block_size
        if out_of_reach > seq.num_released_blocks and not computed_blocks:
            self._release_out_of_reach(seq, out_of_reach)
        taken = computed_blocks[out_of_reach:]
        # Cached blocks that sit in the free queue stop being free once acquired.
        reclaimed = sum(1 for b in taken if self.pool.is_free(b))
        if num_new_blocks > self.pool.num_free - reclaimed:
            return False
        if computed_blocks:  # only ever for a sequence that holds no blocks yet
            for block in taken:
                self.pool.acquire(block)
            seq.num_released_blocks = len(computed_blocks) - len(taken)
            seq.block_table = [RELEASED] * seq.num_released_blocks + list(taken)
            seq.num_registered_blocks = len(computed_blocks)
            seq.num_computed_tokens = num_computed
        seq.block_table.extend(self.pool.allocate() for _ in range(num_new_blocks))
        if self.enable_prefix_caching:
            # The blocks these tokens fill become findable now: their K/V are computed in this
            # step, before any other sequence could be scheduled onto them.
            # NOTE: drafted tokens (engine/speculation.py) are computed but not the sequence's yet:
            # a block is findable once all its tokens are, from the step after they are accepted.
            known = min(num_computed + num_new_tokens, seq.num_tokens)
            self._hash_full_blocks(seq, known)
            num_full = known // self.block_size
            for i in range(seq.num_registered_blocks, num_full):
                if self.pool.register(seq.block_table[i], seq.block_hashes[i]):
                    self.registered_this_step.append(seq.block_table[i])
            seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)
        return True

    def _release_out_of_reach(self, seq: Sequence, out_of_reach: int) -> None:
        """Gives back seq's blocks before block out_of_reach; all are full, computed and (with prefix
        caching) registered, as the sequence's computed tokens are past them."""
        table = seq.block_table
        for i in range(seq.num_released_blocks, out_of_reach):
            self.pool.release(table[i])
            table[i] = RELEASED
        seq.num_released_blocks = out_of_reach

    def step_computed(self, ok: bool) -> None:
        """Called after each step: if it failed, blocks registered for it hold no valid K/V."""
        if not ok:
            for block in self.registered_this_step:
                self.pool.unregister(block)
        self.registered_this_step = []

    def free(self, seq: Sequence) -> None:
        # NOTE: released tail first, so that a prompt's first blocks, the likeliest to be shared,
        # are the last to be evicted.
        for block in reversed(seq.block_table[seq.num_released_blocks:]):
            self.pool.release(block)
        seq.block_table = []
        seq.num_registered_blocks = 0
        seq.num_released_blocks = 0
