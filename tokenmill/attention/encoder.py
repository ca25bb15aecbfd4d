"""Bidirectional attention over a packed batch, for encoders: no KV cache, no padding in the batch.

The sequences of a step lie one after another in one row of T tokens; each token attends to every
token of its own sequence. An `EncoderAttention` is chosen once per model (`select_encoder_attention`),
builds its per-step metadata once (`build`), and every layer calls `forward(q, k, v, batch)`.
- `KernelEncoderAttention`: tokenmill's kernel (kernels/encoder_attention.cpp) on the packed rows;
  a sequence's result depends on its own rows alone.
- `TorchEncoderAttention`, everywhere else: the sequences padded to the longest one of the step and
  run through torch's SDPA with a key mask, as transformers runs BERT.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill import kernels


@dataclass
class EncoderBatch:
    seq_starts: torch.Tensor  # [B + 1] int64: sequence i is rows seq_starts[i] .. seq_starts[i + 1] - 1
    # The torch path's: for each (sequence, position < longest) its row in the packed batch (T: padding),
    # the key mask [B, 1, 1, longest], and where each packed row lies in the padded [B * longest].
    padded_rows: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    unpadded_rows: torch.Tensor | None = None


class EncoderAttention(ABC):
    def __init__(self, num_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        self.scale = head_dim ** -0.5

    @classmethod
    @abstractmethod
    def supports(cls, num_heads: int, head_dim: int, dtype: torch.dtype) -> bool: ...

    @abstractmethod
    def build(self, seq_lens: torch.Tensor) -> EncoderBatch:
        """Once per step, from the sequences' lengths [B] (int64)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        """q, k, v: [T, heads, D] (views of one fused projection: only the last dim need be contiguous).
        Returns [T, heads, D]."""


def seq_starts_of(seq_lens: torch.Tensor) -> torch.Tensor:
    """[B + 1]: where each sequence of a packed batch starts, then T."""
    return torch.cat((torch.zeros(1, dtype=torch.long), seq_lens.cumsum(0)))


class KernelEncoderAttention(EncoderAttention):
    @classmethod
    def supports(cls, num_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
        return (dtype in kernels.ENCODER_ATTENTION_DTYPES
                and head_dim % kernels.ENCODER_ATTENTION_HEAD_DIM_MULTIPLE == 0 and kernels.available())

    def build(self, seq_lens: torch.Tensor) -> EncoderBatch:
        return EncoderBatch(seq_starts_of(seq_lens))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        return torch.ops.tokenmill.encoder_attention(q, k, v, batch.seq_starts, self.scale)


class TorchEncoderAttention(EncoderAttention):
    @classmethod
    def supports(cls, num_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
        return True

    def build(self, seq_lens: torch.Tensor) -> EncoderBatch:
        starts = seq_starts_of(seq_lens)
        longest = int(seq_lens.max())
        offsets = torch.arange(longest)
        valid = offsets < seq_lens[:, None]  # [B, longest]
        padded_rows = torch.where(valid, starts[:-1, None] + offsets, starts[-1])
        return EncoderBatch(starts, padded_rows, valid[:, None, None, :], valid.flatten().nonzero().squeeze(1))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        assert batch.padded_rows is not None and batch.unpadded_rows is not None
        num_seqs, longest = batch.padded_rows.shape

        def padded(x: torch.Tensor) -> torch.Tensor:  # [B, heads, longest, D], padding rows zero
            rows = torch.cat((x, x.new_zeros(1, *x.shape[1:])))
            return rows[batch.padded_rows].transpose(1, 2)

        out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=batch.key_mask,
                                             scale=self.scale)
        out = out.transpose(1, 2).reshape(num_seqs * longest, self.num_heads, self.head_dim)
        return out[batch.unpadded_rows]


# In order of preference; the torch version runs everywhere.
ENCODER_ATTENTIONS: tuple[type[EncoderAttention], ...] = (KernelEncoderAttention, TorchEncoderAttention)


def select_encoder_attention(num_heads: int, head_dim: int, dtype: torch.dtype) -> EncoderAttention:
    chosen = next(a for a in ENCODER_ATTENTIONS if a.supports(num_heads, head_dim, dtype))
    return chosen(num_heads, head_dim, dtype)
