"""The prompt prefixes a job's lines share, counted on the engine's own chained block hashes.

Every prompt's full blocks are hashed by the KV cache manager as the simulated job runs (a block's
hash covers its parent's, so equal hashes mean equal prefixes up to that block). Counting how many
prompts reach each block gives a tree of shared prefixes; a shared prefix worth naming is a block
reached by two or more prompts none of whose children is reached by all of them (where the
sharing stops growing).

Memory: one small entry per distinct block, at most `max_blocks` of them; past that, the blocks
seen by a single prompt are forgotten (a prefix shared later then counts from its second prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

MAX_BLOCKS = 2_000_000  # ~32 M prompt tokens of distinct blocks; ~200 bytes each
PREVIEW_TOKENS = 24


@dataclass
class _Block:
    prompts: int
    depth: int  # blocks from the start, this one included
    parent: bytes | None


@dataclass(frozen=True)
class SharedPrefix:
    tokens: int  # the prefix's length (whole blocks)
    prompts: int  # prompts that start with it
    saved_tokens: int  # (prompts - 1) * tokens: what computing it once saves at most
    starts_with: str  # its first tokens, decoded


class SharedPrefixes:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, block_size: int, max_blocks: int = MAX_BLOCKS) -> None:
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.blocks: dict[bytes, _Block] = {}
        self.previews: dict[bytes, str] = {}  # first block -> its text, once two prompts share it

    def add(self, block_hashes: list[bytes], token_ids: list[int]) -> None:
        """One prompt: its full blocks' hashes, in order, and its token ids (for a preview)."""
        parent = None
        for depth, block_hash in enumerate(block_hashes, 1):
            block = self.blocks.get(block_hash)
            if block is None:
                self.blocks[block_hash] = _Block(1, depth, parent)
            else:
                block.prompts += 1
                if depth == 1 and block_hash not in self.previews:
                    self.previews[block_hash] = self.tokenizer.decode(token_ids[:PREVIEW_TOKENS])
            parent = block_hash
        if len(self.blocks) > self.max_blocks:
            self.blocks = {h: b for h, b in self.blocks.items() if b.prompts > 1}

    def largest(self, count: int) -> list[SharedPrefix]:
        """The `count` shared prefixes that save the most prompt tokens."""
        stops_growing = {h for h, b in self.blocks.items() if b.prompts > 1}
        for block in self.blocks.values():
            parent = self.blocks.get(block.parent) if block.parent is not None else None
            if parent is not None and parent.prompts == block.prompts:
                stops_growing.discard(block.parent)
        ranked = sorted(stops_growing, key=lambda h: (-(self.blocks[h].prompts - 1) * self.blocks[h].depth, h))
        return [self._describe(h) for h in ranked[:count]]

    def _describe(self, block_hash: bytes) -> SharedPrefix:
        block = self.blocks[block_hash]
        tokens = block.depth * self.block_size
        first = block_hash
        while self.blocks[first].parent is not None and self.blocks[first].parent in self.blocks:
            first = self.blocks[first].parent  # type: ignore[assignment]
        return SharedPrefix(tokens, block.prompts, (block.prompts - 1) * tokens, self.previews.get(first, ""))
