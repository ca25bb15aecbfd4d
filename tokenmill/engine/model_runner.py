"""Runs one scheduled batch through the model: flat inputs in, logits for the rows that need them out.

All scheduled tokens of all sequences are concatenated into one ragged row with no padding. The
per-step work is a few tensor ops over per-sequence values: no Python loop over tokens or layers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import math
import mmap
from dataclasses import dataclass
from typing import TypeVar

import torch

from tokenmill.attention import AttentionBackend, AttentionSpec, BatchLayout, select_attention_backend
from tokenmill.engine.config import CPU
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.engine.sequence import Sequence
from tokenmill.models.causal_lm import CausalLM, StepMetadata


@dataclass
class StepLogits:
    sample_seqs: list[Sequence]  # the sequences that reached their last token this step
    # [rows, V] fp32: one row per sequence, in order; a sequence with k drafts has k + 1 (its last
    # token's, then each draft's).
    sample_logits: torch.Tensor
    # Per sequence that wants prompt logprobs: (it, the index of the first prompt token these
    # rows predict, their logits [rows, V]).
    prompt_logits: list[tuple[Sequence, int, torch.Tensor]]
    # Prompt-only sequences (max_tokens 0) whose prompt is now computed: nothing to sample.
    computed_prompts: list[Sequence]


def lazily_committed_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor whose memory is committed page by page, as it is first written.

    Zeroed, as attention reads padding slots, where garbage could be NaN. An anonymous mapping
    rather than numpy's calloc: numpy asks for transparent huge pages on large arrays, and a 2 MiB
    page fault (zeroing, compaction) cost more per KV write than 4 KiB ones (measured at B=64
    decode: 48-114 vs 23 us per layer's K or V write while the pool's pages are first touched).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # where transparent huge pages are on for every mapping
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)


def paged_kv(model: CausalLM, num_blocks: int, block_size: int,
             device: torch.device = CPU) -> tuple[torch.Tensor, AttentionBackend]:
    """The model's KV pool on `device`, one for all layers ([layer, K|V, slot, kv_head, head_dim]), and the
    attention backend chosen for it."""
    kv = model.kv_layout
    shape = (kv.num_layers, 2, num_blocks * block_size, kv.num_kv_heads, kv.head_dim)
    pool = lazily_committed_zeros(shape, model.dtype) if device.type == "cpu" else \
        torch.zeros(shape, dtype=model.dtype, device=device)
    spec = AttentionSpec(kv.num_heads, kv.num_kv_heads, kv.head_dim, block_size, model.dtype, pool.device)
    return pool, select_attention_backend(spec)


def step_metadata(model: CausalLM, attention: AttentionBackend, layout: BatchLayout,
                  device: torch.device = CPU) -> StepMetadata:
    """The step's attention metadata for each window the model's layers use, on `device`.

    NOTE: built on the CPU from the host's lists whatever the device (a few small tensor ops, and the
    backends' shape decisions read their values), then copied to the device once per step: no layer
    waits on a host round trip."""
    metas = {window: attention.build_metadata(layout, window) for window in model.kv_layout.distinct_windows}
    return metas if device.type == "cpu" else {window: to_device(meta, device) for window, meta in metas.items()}


T = TypeVar("T")


def to_device(value: T, device: torch.device) -> T:
    """value with every tensor in it (fields of dataclasses, items of lists and tuples) copied to device."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: to_device(getattr(value, f.name), device)  # type: ignore[misc]
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, list | tuple):
        return type(value)(to_device(item, device) for item in value)  # type: ignore[return-value]
    return value


# glibc's mallopt parameters, and the size up to which a step's tensors are kept in the heap.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
STEP_TENSORS_IN_HEAP = 256 << 20


def keep_step_tensors_in_heap() -> None:
    """Has glibc serve allocations up to STEP_TENSORS_IN_HEAP from its heap and keep what is freed there.

    NOTE: by default glibc maps each allocation over its mmap threshold (dynamic, at most 32 MiB) afresh
    and unmaps it when freed, and hands heap memory back past its trim threshold, so a step's large
    tensors were page-faulted in again every step: a 262,144-token vocabulary's logits at B=64 are 33 MB
    in bf16 and 67 MB in fp32 (Gemma 3 270M, B=64 decode: 15.7k page faults a step, ~10% of its time).
    Set once the weights are loaded (the loader hands its freed copies back first), so the cost is that
    the process keeps the high-water mark of its step tensors.
    """
    if (libc := ctypes.util.find_library("c")) and hasattr(ctypes.CDLL(libc), "mallopt"):
        mallopt = ctypes.CDLL(libc).mallopt
        mallopt(M_MMAP_THRESHOLD, STEP_TENSORS_IN_HEAP)
        mallopt(M_TRIM_THRESHOLD, STEP_TENSORS_IN_HEAP)


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, device: torch.device = CPU) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.kv_cache, self.attention = paged_kv(model, num_blocks, block_size, device)
        if device.type == "cpu":
            keep_step_tensors_in_heap()

    @staticmethod
    def kv_bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
        kv = model.kv_layout
        return kv.num_layers * 2 * kv.num_kv_heads * kv.head_dim * block_size * dtype.itemsize

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepLogits:
        seqs = batch.seqs
        input_ids: list[int] = []
        for seq, n in zip(seqs, batch.num_new_tokens):
            input_ids += seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n]
            if seq.draft_token_ids:  # scheduled whole: the budget trimmed what did not fit
                input_ids += seq.draft_token_ids
        num_new = torch.tensor(batch.num_new_tokens)
        context_len = torch.tensor([s.num_computed_tokens for s in seqs]) + num_new
        max_blocks = max(len(s.block_table) for s in seqs)
        block_table = torch.tensor([s.block_table + [0] * (max_blocks - len(s.block_table)) for s in seqs])
        layout, positions = BatchLayout.of(num_new, context_len, block_table, self.block_size)
        metas = step_metadata(self.model, self.attention, layout, self.device)
        hidden = self.model(torch.tensor(input_ids).to(self.device, non_blocking=True),
                            positions.to(self.device, non_blocking=True), self.kv_cache, self.attention, metas)

        # Logits only where they are used: each finished prompt's or decode's last token, and
        # the prompt rows of requests that asked for prompt logprobs.
        sample_seqs: list[Sequence] = []
        sample_rows: list[int] = []
        computed_prompts: list[Sequence] = []
        prompt_rows: list[int] = []
        prompt_spans: list[tuple[Sequence, int, int, int]] = []  # seq, first row, rows, first target
        for seq, n, first in zip(seqs, batch.num_new_tokens, layout.query_start.tolist()):
            done = seq.num_computed_tokens
            if seq.request.prompt_logprobs is not None and seq.index == 0 and done < seq.num_prompt_tokens - 1:
                count = min(done + n, seq.num_prompt_tokens - 1) - done
                prompt_spans.append((seq, len(prompt_rows), count, done + 1))
                prompt_rows.extend(range(first, first + count))
            drafts = len(seq.draft_token_ids)
            if done + n == seq.num_tokens and seq.params.max_tokens == 0:
                computed_prompts.append(seq)
            elif done + n == seq.num_tokens + drafts:
                sample_seqs.append(seq)
                sample_rows.extend(range(first + n - 1 - drafts, first + n))
        rows = torch.tensor(prompt_rows + sample_rows, dtype=torch.long).to(self.device, non_blocking=True)
        logits = self.model.compute_logits(hidden[rows])
        prompt_logits = [(seq, target, logits[row:row + count]) for seq, row, count, target in prompt_spans]
        return StepLogits(sample_seqs, logits[len(prompt_rows):], prompt_logits, computed_prompts)
