"""The pool of KV blocks: reference counts, the prefix-cache hash map and LRU eviction.

A block whose reference count drops to zero stays in the hash map (its K/V are still valid) and
joins the free queue; it is evicted only when a fresh block is needed and it is the least
recently freed. Blocks that hold nothing reusable go to the front of the queue, to be taken first.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        # Free blocks, least recently freed first. Values are unused; OrderedDict gives O(1)
        # removal from the middle when a cached free block is reused.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        self.unregister(block)
        self.ref_counts[block] = 1
        return block

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def acquire(self, block: int) -> None:
        """Takes another reference to a block found in the cache."""
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None
            if self.block_hashes[block] is None:
                self.free.move_to_end(block, last=False)

    def register(self, block: int, block_hash: bytes) -> bool:
        """Makes a full block findable by its hash (unless an equal block already is)."""
        if block_hash in self.cached:
            return False
        self.cached[block_hash] = block
        self.block_hashes[block] = block_hash
        return True

    def unregister(self, block: int) -> None:
        block_hash = self.block_hashes[block]
        if block_hash is not None:
            del self.cached[block_hash]
            self.block_hashes[block] = None

    def is_free(self, block: int) -> bool:
        return self.ref_counts[block] == 0
