"""The int8-activation kernels (tokenmill/kernels/int8_dot.cpp) and their linear method (models/int8_dot.py):
each type against gguf's fp32 dequantization times the row-quantized activations (float64), the one rounding to
bf16 the only difference; results independent of the batch, bit for bit; clear errors; and bf16 SmolLM2 on them
against transformers on its fp32 dequantization, teacher-forced over real text."""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from test_quant_kernels import random_blocks
from test_quantized_model import agreement, real_text_windows

from tokenmill import LLM, kernels
from tokenmill.models.int8_dot import Int8DotLinear
from tokenmill.models.linear import select_linear_method
from tokenmill.models.quantized import QuantizedLinear, QuantizedWeight, stack_rows

pytestmark = pytest.mark.skipif(not kernels.int8_dot_available(), reason="no AVX-512 VNNI: no int8 kernels")

Q = gguf.GGMLQuantizationType
TYPES = [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q4_1, Q.Q4_0, Q.Q5_0]
SHAPES = [(1, 16, 256), (3, 37, 512), (300, 33, 256), (64, 100, 768), (28, 64, 512)]  # M, N, K: N past whole groups
# of 16, odd numbers of groups, passes over one group and over two


def int8_linear(x: torch.Tensor, blocks: np.ndarray, qtype: Q) -> torch.Tensor:
    q, sums = torch.ops.tokenmill.quantize_rows(x)
    packed = torch.ops.tokenmill.int8_pack(torch.from_numpy(blocks), qtype, x.shape[1])
    return torch.ops.tokenmill.int8_linear(q, sums, packed, qtype, blocks.shape[0])


def dequantized_rows(x: torch.Tensor) -> torch.Tensor:
    """x as quantize_rows gives it back, in float64: each block's int8 values times its scale."""
    q, sums = torch.ops.tokenmill.quantize_rows(x)
    return (q.double().view(*sums.shape[:2], 32) * sums[..., :1].double()).view(x.shape)


def random_rows(m: int, k: int, seed: int) -> torch.Tensor:
    """bf16 rows of uneven magnitudes (a few outliers per row, as activations have)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator)
    x[:, torch.randint(0, k, (max(1, k // 64),), generator=generator)] *= 20
    return x.to(torch.bfloat16)


# Rows whose blocks end mid-group of 16 (3, 18, 17 blocks a row), one block, many rows (groups across rows and
# threads), and rows apart in memory (a narrowed view: quantized row by row).
QUANTIZE_SHAPES = [(7, 96, 96), (64, 576, 576), (3, 1536, 1536), (1, 32, 32), (70, 544, 544), (9, 576, 640)]


@pytest.mark.parametrize("m,k,width", QUANTIZE_SHAPES, ids=lambda v: str(v))
def test_rows_are_quantized_per_block_of_32(m: int, k: int, width: int) -> None:
    x = random_rows(m, width, m + k)[:, :k]
    x[m // 2, 32:64] = 0  # a block of zeros: d = 0, q = 0
    q, sums = torch.ops.tokenmill.quantize_rows(x)
    blocks = x.float().reshape(m, k // 32, 32)
    d = blocks.abs().amax(-1) / 127
    expected = torch.where(d[..., None] > 0, blocks * (1 / d[..., None]), 0).round().clamp(-127, 127)  # half to even
    assert torch.equal(q.view(m, k // 32, 32).float(), expected)
    assert torch.equal(sums[..., 0], d)
    halves = expected.view(m, k // 32, 2, 16).sum(-1).int()
    assert torch.equal(sums[..., 1], d * halves.sum(-1))
    # The weights' offsets times sum(q), negated, as int32: Q4_0's 8, Q5_0's 16, Q8_0's 128, Q6_K's 32 per half.
    offsets = sums[..., 2:].contiguous().view(torch.int32)
    total = halves.sum(-1, keepdim=True)
    assert torch.equal(offsets, torch.cat((-8 * total, -16 * total, -128 * total, -32 * halves, 0 * total), -1))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_each_type_is_the_exact_product_rounded_once(qtype: Q) -> None:
    for m, n, k in SHAPES:
        blocks = random_blocks(qtype, n, k, seed=m)
        weights = torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).double()
        x = random_rows(m, k, seed=n)
        expected = dequantized_rows(x) @ weights.T
        got = int8_linear(x, blocks, qtype).double()
        # Within half a bf16 ulp of the exact sum, plus the fp32 sums' own error (~1e-6 of the sum of |products|).
        half_ulp = torch.exp2(torch.floor(torch.log2(expected.abs().clamp_min(1e-30))) - 8)
        magnitude = dequantized_rows(x).abs() @ weights.abs().T
        assert ((got - expected).abs() <= half_ulp + 1e-6 * magnitude).all(), (qtype.name, m, n, k)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_a_rows_result_does_not_depend_on_the_batch(qtype: Q) -> None:
    blocks = random_blocks(qtype, 70, 512, seed=1)
    x = random_rows(300, 512, seed=2)
    everything = int8_linear(x, blocks, qtype)
    for rows in ([0], [5], [299], list(range(7, 44)), [3, 250, 17]):
        alone = int8_linear(x[rows].contiguous(), blocks, qtype)
        assert torch.equal(alone.view(torch.int16), everything[rows].view(torch.int16)), rows


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_every_row_count_gives_a_row_the_bits_it_gets_alone(qtype: Q) -> None:
    """Passes of up to 8 rows over one group of 16 features, or up to 6 over two (from 8 or 16 rows of a panel on,
    by type), split as evenly as they go; an odd last group, a partial one: any M from 1 to 70, 128 and 300 gives
    each row the bits it gets alone."""
    k = 256
    for n in (16, 33, 48, 64, 100):  # groups: 1, 3 (the last of 1 feature), 3, 4, 7 (the last of 4)
        blocks = torch.from_numpy(random_blocks(qtype, n, k, seed=n))
        q, sums = torch.ops.tokenmill.quantize_rows(random_rows(300, k, seed=n + 1))
        packed = torch.ops.tokenmill.int8_pack(blocks, qtype, k)
        alone = torch.cat([torch.ops.tokenmill.int8_linear(q[i:i + 1], sums[i:i + 1], packed, qtype, n)
                           for i in range(300)])
        for m in [*range(1, 71), 128, 300]:
            got = torch.ops.tokenmill.int8_linear(q[:m], sums[:m], packed, qtype, n)
            assert torch.equal(got.view(torch.int16), alone[:m].view(torch.int16)), (n, m)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q6_K, Q.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("n", [37, 64])  # rows at any offset (partial groups), and whole 64-byte lines (streamed)
def test_widened_output_is_the_bf16_output_in_fp32(qtype: Q, n: int) -> None:
    """A head's logits: the kernel stores its bf16 results as fp32 itself, the same values bit for bit."""
    k = 512
    blocks = torch.from_numpy(random_blocks(qtype, n, k, seed=4))
    q, sums = torch.ops.tokenmill.quantize_rows(random_rows(20, k, seed=5))
    packed = torch.ops.tokenmill.int8_pack(blocks, qtype, k)
    narrow = torch.ops.tokenmill.int8_linear(q, sums, packed, qtype, n)
    wide = torch.ops.tokenmill.int8_linear(q, sums, packed, qtype, n, True)
    assert wide.dtype == torch.float32 and torch.equal(wide, narrow.float())
    weight = QuantizedWeight(blocks, qtype, k, int8_activations=True)
    x = random_rows(20, k, seed=5)
    assert torch.equal(Int8DotLinear(weight, None).apply_fp32(x), narrow.float())


def test_a_mixed_projection_quantizes_x_once_and_concatenates() -> None:
    k = 512
    parts = [QuantizedWeight(torch.from_numpy(random_blocks(qtype, n, k, seed=n)), qtype, k, int8_activations=True)
             for qtype, n in ((Q.Q4_K, 48), (Q.Q4_K, 16), (Q.Q6_K, 16))]
    stacked = stack_rows(parts)
    assert select_linear_method(stacked) is Int8DotLinear
    x = random_rows(9, k, seed=3)
    got = Int8DotLinear(stacked, None).apply(x)
    expected = torch.cat([int8_linear(x, p.blocks.numpy(), p.qtype) for p in parts], dim=1)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def moe_one_row_at_a_time(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                          gate_up: list[tuple[np.ndarray, Q]], down: list[tuple[np.ndarray, Q]]) -> torch.Tensor:
    """int8_moe's oracle: each (token, expert) pair's row alone through int8_linear, torch's SiLU(gate) * up and
    int8_linear, then the rows weighted and summed as models/moe.py's torch path does."""
    rows = []
    for token, expert in enumerate(experts.flatten().tolist()):
        hidden = int8_linear(x[token // experts.shape[1]][None], *gate_up[expert])
        gate, up = hidden.split(hidden.shape[1] // 2, dim=1)
        rows.append(int8_linear(torch.nn.functional.silu(gate).mul_(up), *down[expert]))
    weighted = torch.cat(rows).view(*experts.shape, -1) * weights.unsqueeze(-1)
    return weighted.float().sum(dim=1).to(torch.bfloat16)


@pytest.mark.parametrize(("gate_up_type", "down_type", "hidden", "intermediate"), [
    (Q.Q4_K, Q.Q6_K, 768, 256), (Q.Q8_0, Q.Q8_0, 96, 160), (Q.Q4_0, Q.Q5_0, 512, 96), (Q.Q4_1, Q.Q4_K, 256, 512)],
    ids=lambda v: v.name if isinstance(v, Q) else str(v))
def test_a_moe_layer_in_one_call_is_each_rows_product(gate_up_type: Q, down_type: Q, hidden: int,
                                                      intermediate: int) -> None:
    """int8_moe, bit for bit each row alone through its expert and the torch sums: odd token counts, idle experts,
    an expert with more rows than a pass (8), top 1, 2 and 4, bf16 (Qwen) and fp32 (Mixtral) routing weights;
    partial runs of groups."""
    num_experts = 6
    gate_up = [(random_blocks(gate_up_type, 2 * intermediate, hidden, seed=e), gate_up_type)
               for e in range(num_experts)]
    down = [(random_blocks(down_type, hidden, intermediate, seed=10 + e), down_type) for e in range(num_experts)]
    packed = [[torch.ops.tokenmill.int8_pack(torch.from_numpy(blocks), qtype, k) for blocks, qtype in projection]
              for projection, k in ((gate_up, hidden), (down, intermediate))]
    generator = torch.Generator().manual_seed(0)
    for tokens, top_k, dtype in ((1, 1, torch.bfloat16), (3, 2, torch.float32), (13, 4, torch.bfloat16),
                                 (7, 2, torch.bfloat16)):
        x = random_rows(tokens, hidden, seed=tokens)
        scores = torch.rand(tokens, num_experts, generator=generator)
        scores[:, 4:] = -1  # experts 4 and 5 idle
        if tokens == 13:
            scores[:, 0] = 2  # expert 0 in every token's choices: 13 rows
        weights, experts = torch.topk(scores.softmax(-1), top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
        got = torch.ops.tokenmill.int8_moe(x, experts, weights, packed[0], gate_up_type, packed[1], down_type,
                                           intermediate)
        expected = moe_one_row_at_a_time(x, experts, weights, gate_up, down)
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), (tokens, top_k, dtype)


def test_only_marked_weights_of_served_types_take_int8_activations() -> None:
    q4_k = QuantizedWeight(torch.from_numpy(random_blocks(Q.Q4_K, 16, 256, 0)), Q.Q4_K, 256)
    q5_k = QuantizedWeight(torch.from_numpy(random_blocks(Q.Q5_K, 16, 256, 0)), Q.Q5_K, 256, int8_activations=True)
    assert select_linear_method(q4_k) is QuantizedLinear  # an fp32 model's (not marked at load)
    assert select_linear_method(q5_k) is QuantizedLinear  # no int8 kernel for Q5_K
    assert select_linear_method(stack_rows([replace(q4_k, int8_activations=True), q5_k])) is QuantizedLinear


def test_bad_input_is_refused_clearly() -> None:
    blocks = torch.from_numpy(random_blocks(Q.Q4_K, 16, 256, 0))
    with pytest.raises(RuntimeError, match="no int8 kernel"):
        torch.ops.tokenmill.int8_pack(blocks, int(Q.Q5_K), 256)
    with pytest.raises(RuntimeError, match="bytes a row"):
        torch.ops.tokenmill.int8_pack(blocks, int(Q.Q4_K), 512)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.tokenmill.quantize_rows(torch.ones(2, 40, dtype=torch.bfloat16))
    q, sums = torch.ops.tokenmill.quantize_rows(torch.ones(2, 256, dtype=torch.bfloat16))
    packed = torch.ops.tokenmill.int8_pack(blocks, int(Q.Q4_K), 256)
    with pytest.raises(RuntimeError, match="packed must be"):
        torch.ops.tokenmill.int8_linear(q, sums, packed, int(Q.Q4_K), 40)
    gate_up, down = (torch.ops.tokenmill.int8_pack(torch.from_numpy(random_blocks(Q.Q4_K, n, 256, 0)), int(Q.Q4_K),
                                                   256) for n in (512, 256))
    x, experts, weights = torch.ones(2, 256, dtype=torch.bfloat16), torch.tensor([[0], [2]]), torch.ones(2, 1)
    with pytest.raises(RuntimeError, match="expert 2 of a layer of 2"):
        torch.ops.tokenmill.int8_moe(x, experts, weights, [gate_up] * 2, int(Q.Q4_K), [down] * 2, int(Q.Q4_K), 256)
    with pytest.raises(RuntimeError, match="each down weight must be"):
        torch.ops.tokenmill.int8_moe(x, experts, weights, [gate_up] * 3, int(Q.Q4_K), [down, down, gate_up],
                                     int(Q.Q4_K), 256)


@pytest.mark.skipif(not kernels.available(), reason="tokenmill's CPU kernels do not run here")
def test_smollm2_in_bf16_runs_on_int8_activations_and_stays_close(smol_hf: torch.nn.Module) -> None:
    # On int8 activations: 94.3% top-1, KL 0.0052 nats (bf16 activations on quant_linear: 96.0-96.4%, ~0.0013;
    # the tied head alone on bf16 ones gains 0.9 points and KL 0.0013). A broken scale or layout falls far below.
    llm = LLM(dtype="bfloat16", kv_cache_memory=1 << 28)
    assert llm.engine.quantization == "Q4_1, Q8_0 with int8 activations"
    model = llm.engine.runner.model
    assert isinstance(model.layers[0].mlp.down_proj.method, Int8DotLinear)
    assert isinstance(model.lm_head.method, Int8DotLinear)  # the tied head; the embedding keeps the file's blocks
    top1, kl = agreement(llm, smol_hf, real_text_windows(llm, 4))  # 2,044 positions
    print(f"int8 activations: top-1 {top1:.4f}, KL {kl:.5f}")
    assert top1 >= 0.935 and kl <= 0.007, (top1, kl)
