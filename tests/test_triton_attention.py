"""The Triton attention backend against the torch backend (in fp32, the reference): on CPU tensors under Triton's
interpreter (tiny random steps: decodes, prompt chunks, both, GQA, windows, blocks anywhere in the pool), and on
a CUDA device at realistic sizes (gpu-marked).

NOTE: TRITON_INTERPRET must be set before `triton.jit` wraps the kernel, i.e. before anything imports
tokenmill.attention, which pytest's collection of the other test modules already did. So the interpreted cases
run in one child process started with it set (this file run as a script), which saves each case's outputs;
the tests here compare them."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tokenmill.attention import (
    AttentionSpec,
    BatchLayout,
    TorchAttentionBackend,
    TritonAttentionBackend,
    select_attention_backend,
    triton_backend,
)
from tokenmill.attention.torch_backend import window_start


@dataclass(frozen=True)
class Case:
    num_queries: list[int]  # per request: 1 for a decode, more for a prompt chunk
    context_lens: list[int]  # per request, its new tokens included
    kv_heads: int
    group: int  # query heads per KV head
    head_dim: int
    dtype: torch.dtype
    block_size: int = 16
    window: int | None = None


DECODES = dict(num_queries=[1] * 6, context_lens=[1, 7, 16, 17, 90, 150])
CHUNKS = dict(num_queries=[2, 5, 30, 70], context_lens=[2, 40, 47, 150])
MIXED = dict(num_queries=[1, 1, 1, 1, 3, 25, 70], context_lens=[1, 33, 64, 100, 3, 60, 131])

INTERPRETED_CASES = {
    "decodes-mha-fp32": Case(**DECODES, kv_heads=2, group=1, head_dim=64, dtype=torch.float32),
    "decodes-gqa4-bf16": Case(**DECODES, kv_heads=2, group=4, head_dim=64, dtype=torch.bfloat16),
    "chunks-gqa3-fp32": Case(**CHUNKS, kv_heads=2, group=3, head_dim=64, dtype=torch.float32),
    "chunks-gqa4-bf16": Case(**CHUNKS, kv_heads=1, group=4, head_dim=128, dtype=torch.bfloat16),
    "mixed-gqa3-bf16": Case(**MIXED, kv_heads=2, group=3, head_dim=64, dtype=torch.bfloat16),
    "mixed-gqa4-fp16-head256": Case(**MIXED, kv_heads=1, group=4, head_dim=256, dtype=torch.float16),
    "mixed-mha-fp32-head80-blocks5": Case(**MIXED, kv_heads=2, group=1, head_dim=80, dtype=torch.float32,
                                          block_size=5),
    "mixed-gqa3-fp32-window13": Case(**MIXED, kv_heads=2, group=3, head_dim=64, dtype=torch.float32, window=13),
    "mixed-gqa4-bf16-window40": Case(**MIXED, kv_heads=2, group=4, head_dim=64, dtype=torch.bfloat16, window=40),
    "mixed-gqa4-bf16-window1": Case(**MIXED, kv_heads=1, group=4, head_dim=64, dtype=torch.bfloat16, window=1),
}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def random_step(case: Case, device: str, seed: int) -> tuple[AttentionSpec, BatchLayout, torch.Tensor, torch.Tensor]:
    """The case's step over a random pool: every request's blocks at random places in it (not in order, not
    next to each other), the slots no query may read NaN. Returns the spec, layout, queries and pool."""
    generator = torch.Generator().manual_seed(seed)
    num_queries, context_lens = torch.tensor(case.num_queries), torch.tensor(case.context_lens)
    blocks_per_request = (context_lens + case.block_size - 1) // case.block_size
    max_blocks = int(blocks_per_request.max())
    num_blocks = len(case.context_lens) * max_blocks + 3
    placement = torch.randperm(num_blocks, generator=generator)[:len(case.context_lens) * max_blocks]
    block_table = placement.view(len(case.context_lens), max_blocks)
    block_table = torch.where(torch.arange(max_blocks) < blocks_per_request[:, None], block_table, 0)  # padding
    batch, _ = BatchLayout.of(num_queries, context_lens, block_table, case.block_size)
    shape = (num_blocks * case.block_size, case.kv_heads, case.head_dim)
    pool = torch.full((2, *shape), float("nan"))
    first_seen = window_start(context_lens, num_queries, case.window)
    for request, (first, end) in enumerate(zip(first_seen.tolist(), case.context_lens)):
        pos = torch.arange(first, end)
        slots = block_table[request, pos // case.block_size] * case.block_size + pos % case.block_size
        pool[:, slots] = torch.randn(2, len(slots), *shape[1:], generator=generator)
    q = torch.randn(int(num_queries.sum()), case.kv_heads * case.group, case.head_dim, generator=generator)
    spec = AttentionSpec(case.kv_heads * case.group, case.kv_heads, case.head_dim, case.block_size, case.dtype,
                         torch.device(device))
    return spec, batch, q.to(device, case.dtype), pool.to(device, case.dtype)


def run_case(case: Case, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backend's output, and the torch backend's over the same values in fp32 on the CPU (NaNs
    zeroed: it gathers padded contexts, whose masked slots it multiplies by 0); both on the CPU."""
    spec, batch, q, pool = random_step(case, device, seed)
    backend = TritonAttentionBackend(spec)
    out = backend.forward(q, pool, backend.build_metadata(batch, case.window)).cpu()
    reference = TorchAttentionBackend(AttentionSpec(spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                                    spec.block_size, torch.float32, torch.device("cpu")))
    q, pool = q.cpu().float(), pool.cpu().float().nan_to_num()
    return out, reference.forward(q, pool, reference.build_metadata(batch, case.window))


def widen_bf16_dots_in_the_interpreter() -> None:
    """NOTE: Triton's interpreter holds bf16 as its uint16 bits and its tl.dot multiplies those bits
    (triton-lang/triton#11584: bf16 is not supported there). A GPU's bf16 MMA multiplies the values, each
    product exact in fp32, and sums in fp32: the same as an fp32 dot of the widened operands, which this does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widened(handle: interpreter.TensorHandle) -> interpreter.TensorHandle:
        if handle.dtype != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_widened_dot(self: interpreter.InterpreterBuilder, a: interpreter.TensorHandle,
                           b: interpreter.TensorHandle, *args: object) -> interpreter.TensorHandle:
        return create_dot(self, widened(a), widened(b), *args)

    interpreter.InterpreterBuilder.create_dot = create_widened_dot


@pytest.fixture(scope="module")
def interpreted_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    triton = pytest.importorskip("triton")
    # NOTE: Triton 3.6's interpreter gives a scalar load as a 1-element array, which numpy 2 refuses as a
    # range bound (the kernel's key loop); 3.9's is what these cases were checked with.
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run the kernel's loop")
    path = tmp_path_factory.mktemp("triton") / "outputs.pt"
    subprocess.run([sys.executable, __file__, str(path)], env={**os.environ, "TRITON_INTERPRET": "1"}, check=True,
                   timeout=600)
    return torch.load(path)


@pytest.mark.parametrize("name", INTERPRETED_CASES)
def test_the_interpreted_kernel_equals_the_torch_backend(
        name: str, interpreted_outputs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    out, expected = interpreted_outputs[name]
    case = INTERPRETED_CASES[name]
    assert out.dtype == case.dtype and out.shape == expected.shape
    tolerance = TOLERANCE[case.dtype]
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


def test_the_triton_backend_is_chosen_on_cuda_only() -> None:
    for dtype, head_dim, group, fits in [(torch.bfloat16, 64, 4, True), (torch.float32, 256, 1, True),
                                         (torch.float16, 80, 3, True), (torch.bfloat16, 512, 1, False),
                                         (torch.bfloat16, 128, 128, False), (torch.float64, 64, 1, False)]:
        spec = AttentionSpec(2 * group, 2, head_dim, 16, dtype, torch.device("cuda"))
        assert TritonAttentionBackend.supports(spec) == (fits and triton_backend.triton is not None)
    cpu = AttentionSpec(8, 2, 64, 16, torch.bfloat16, torch.device("cpu"))
    assert not TritonAttentionBackend.supports(cpu)
    assert type(select_attention_backend(cpu)) is not TritonAttentionBackend


# Llama-3.2-1B's heads: 64 decodes beside prompt chunks of 512 and 300 tokens, contexts up to 2,000.
LLAMA_1B_STEP = dict(num_queries=[1] * 64 + [512, 300], context_lens=[100 + 29 * i for i in range(64)] + [512, 1800],
                     kv_heads=8, group=4, head_dim=64)
GPU_CASES = {
    "llama-1b-bf16": Case(**LLAMA_1B_STEP, dtype=torch.bfloat16),
    "llama-1b-fp32": Case(**LLAMA_1B_STEP, dtype=torch.float32),
    "head128-fp16": Case(num_queries=[1] * 32 + [256], context_lens=[1 + 61 * i for i in range(32)] + [1000],
                         kv_heads=4, group=8, head_dim=128, dtype=torch.float16),
    # Gemma 3's: 256-dim heads, a 512-token window (its local layers') over longer contexts.
    "gemma3-bf16-window": Case(num_queries=[1] * 32 + [400], context_lens=[1 + 61 * i for i in range(32)] + [1500],
                               kv_heads=1, group=4, head_dim=256, dtype=torch.bfloat16, window=512),
    "gemma3-fp32-window": Case(num_queries=[1] * 32 + [400], context_lens=[1 + 61 * i for i in range(32)] + [1500],
                               kv_heads=1, group=4, head_dim=256, dtype=torch.float32, window=512),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", GPU_CASES)
def test_the_kernel_on_a_gpu_equals_the_torch_backend(name: str) -> None:
    case = GPU_CASES[name]
    spec = AttentionSpec(case.kv_heads * case.group, case.kv_heads, case.head_dim, case.block_size, case.dtype,
                         torch.device("cuda"))
    assert type(select_attention_backend(spec)) is TritonAttentionBackend
    out, expected = run_case(case, "cuda")
    tolerance = TOLERANCE[case.dtype] * (10 if case.dtype == torch.float32 else 1)  # fp32: longer sums on the GPU
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


if __name__ == "__main__":  # the child process of `interpreted_outputs`, TRITON_INTERPRET=1 set
    assert type(triton_backend.paged_attention_kernel).__name__ == "InterpretedFunction"
    widen_bf16_dots_in_the_interpreter()
    torch.save({name: run_case(case, "cpu") for name, case in INTERPRETED_CASES.items()}, Path(sys.argv[1]))
