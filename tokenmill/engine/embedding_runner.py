"""Runs one step of embedding requests: whole prompts, packed end to end, in; one pooled vector each out.

No padding: the prompts' tokens lie one after another in one row, and attention keeps each to
its own sequence. Two runners, chosen by the model:
- `EncoderRunner` (BERT family): bidirectional attention over the packed batch (attention/encoder.py).
- `DecoderRunner` (a Llama-family model as an embedder): causal attention through the same paged
  attention backend as generation, over a scratch KV pool that holds one step and is overwritten
  by the next (an embedding request has no decode, so nothing is kept and nothing is cached).
"""

from __future__ import annotations

import itertools

import torch

from tokenmill.attention import BatchLayout
from tokenmill.attention.encoder import seq_starts_of
from tokenmill.engine.model_runner import paged_kv, step_metadata
from tokenmill.kv.manager import cdiv
from tokenmill.models.bert import BertModel
from tokenmill.models.causal_lm import CausalLM
from tokenmill.models.pooling import pool


def packed(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' token ids end to end, [T], and their lengths, [B]."""
    return torch.tensor(list(itertools.chain.from_iterable(prompts))), torch.tensor([len(p) for p in prompts])


class EncoderRunner:
    def __init__(self, model: BertModel, pooling_mode: str) -> None:
        self.model = model
        self.pooling_mode = pooling_mode

    @torch.inference_mode()
    def run(self, prompts: list[list[int]]) -> torch.Tensor:
        """The prompts' pooled last hidden states, [len(prompts), hidden] in fp32."""
        input_ids, lengths = packed(prompts)
        batch = self.model.attention.build(lengths)
        positions = torch.arange(len(input_ids)) - torch.repeat_interleave(batch.seq_starts[:-1], lengths)
        hidden = self.model(input_ids, positions, batch)
        return pool(hidden, batch.seq_starts, self.pooling_mode)


class DecoderRunner:
    def __init__(self, model: CausalLM, pooling_mode: str, max_step_tokens: int, max_step_seqs: int,
                 block_size: int) -> None:
        self.model = model
        self.pooling_mode = pooling_mode
        self.block_size = block_size
        # Enough blocks for any step: each sequence wastes less than one block.
        self.kv_cache, self.attention = paged_kv(model, cdiv(max_step_tokens, block_size) + max_step_seqs, block_size)

    @torch.inference_mode()
    def run(self, prompts: list[list[int]]) -> torch.Tensor:
        input_ids, lengths = packed(prompts)
        blocks = (lengths + self.block_size - 1) // self.block_size
        first_block = blocks.cumsum(0) - blocks
        block_table = first_block[:, None] + torch.arange(int(blocks.max()))  # each sequence's own blocks, in a row
        layout, positions = BatchLayout.of(lengths, lengths, block_table, self.block_size)
        hidden = self.model(input_ids, positions, self.kv_cache, self.attention,
                            step_metadata(self.model, self.attention, layout))
        return pool(hidden, seq_starts_of(lengths), self.pooling_mode)
