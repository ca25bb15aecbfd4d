"""How much of a GPU the KV pool gets: vLLM's rule, without its profiling run.

The engine may fill `gpu_memory_utilization` of the card's memory. What is already in use when the pool is
sized (the weights, the CUDA context, other processes) and a reserve for one step's activations come off
it; the rest is the pool. The reserve is an upper estimate from the model's shape, so that a full step never
meets an out-of-memory error mid-job.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

FP32_BYTES = 4


def step_activation_bytes(config: PretrainedConfig, step_tokens: int, max_num_seqs: int) -> int:
    """A step's activations, at most: every token's hidden state and MLP intermediates in fp32 while one layer
    runs (x, the residual, q/k/v, gate and up), and the logits of the rows it samples (fp32: the logits,
    their probabilities and the sampling noise), a sequence's drafts included."""
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = (8 * hidden + 3 * intermediate) * FP32_BYTES
    sampled_rows = min(step_tokens, 2 * max_num_seqs)
    return step_tokens * per_token + 3 * sampled_rows * config.vocab_size * FP32_BYTES


def gpu_kv_budget(device: torch.device, utilization: float, reserve: int) -> int:
    """Bytes for the KV pool on `device`: utilization of its memory, less what is in use now and `reserve`."""
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * utilization) - (total - free) - reserve
    if budget <= 0:
        raise ValueError(f"gpu_memory_utilization={utilization} of {total / 2**30:.1f} GiB leaves no room for the KV "
                         f"cache: {(total - free) / 2**30:.1f} GiB are in use (the weights among them) and a step "
                         f"needs up to {reserve / 2**30:.1f} GiB; raise it, or lower max_num_batched_tokens")
    return budget
