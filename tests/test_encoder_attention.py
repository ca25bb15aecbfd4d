"""encoder_attention: bidirectional attention over packed sequences equals torch's SDPA run on each
sequence alone (fp32), reads strided views of a fused QKV projection, and gives a sequence the same
bits whatever else is in its batch and however many threads run it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no AVX-512 (or no compiler): no kernels here")

LENGTHS = [1, 2, 15, 16, 17, 100, 300, 513]


def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                      scale: float) -> torch.Tensor:
    seq_starts = torch.tensor([0, *lengths]).cumsum(0)
    return torch.ops.tokenmill.encoder_attention(q, k, v, seq_starts, scale)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], scale: float) -> torch.Tensor:
    """SDPA in fp32 on each sequence alone."""
    outs = []
    for rows in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True):
        q_i, k_i, v_i = (x.float().transpose(0, 1) for x in rows)  # [heads, n, D]
        outs.append(F.scaled_dot_product_attention(q_i, k_i, v_i, scale=scale).transpose(0, 1))
    return torch.cat(outs)


def fused_qkv(tokens: int, heads: int, head_dim: int, dtype: torch.dtype,
              per_head: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as views into one projection output: [T, 3 * heads * D] split as BERT does (q | k | v),
    or with each head's q, k, v side by side (strides between heads of 3 D)."""
    qkv = torch.randn(tokens, 3 * heads * head_dim).to(dtype)
    if per_head:
        return qkv.view(tokens, heads, 3, head_dim).unbind(2)
    return qkv.view(tokens, 3, heads, head_dim).unbind(1)


@pytest.mark.parametrize("head_dim", [16, 32, 48, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_sdpa_per_sequence(head_dim: int, dtype: torch.dtype) -> None:
    torch.manual_seed(head_dim)
    lengths = [LENGTHS[i] for i in torch.randperm(len(LENGTHS)).tolist()]  # long and short mixed
    q, k, v = fused_qkv(sum(lengths), 3, head_dim, dtype, per_head=head_dim == 64)
    scale = head_dim**-0.5 * (1.5 if head_dim == 32 else 1.0)
    out = encoder_attention(q, k, v, lengths, scale)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    expected = reference(q, k, v, lengths, scale)  # on the same (bf16) inputs
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    else:
        # The output's own rounding (half an ulp: 2^-9 relative) and the probabilities rounded to bf16
        # for the weighted sum (about 2^-9 of the values' size, partly cancelling).
        torch.testing.assert_close(out.float(), expected, rtol=2**-8, atol=2**-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sequence_gets_the_same_bits_in_any_batch(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    heads, head_dim = 12, 32
    lengths = [37, 300, 5, 129, 1, 64]
    q, k, v = fused_qkv(sum(lengths), heads, head_dim, dtype, per_head=False)
    batch = encoder_attention(q, k, v, lengths, head_dim**-0.5)
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        alone = encoder_attention(q[rows], k[rows], v[rows], [n], head_dim**-0.5)
        assert torch.equal(alone, batch[rows])
        start += n
    # ...and whatever else surrounds it, in another order, with empty sequences between.
    order = [3, 0, 5, 2, 4, 1]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    index = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in order])
    shuffled = encoder_attention(q[index], k[index], v[index], [0, *(lengths[i] for i in order), 0], head_dim**-0.5)
    assert torch.equal(shuffled, batch[index])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(encoder_attention(q, k, v, lengths, head_dim**-0.5), batch)
    finally:
        torch.set_num_threads(threads)


def test_no_tokens_gives_an_empty_output() -> None:
    q = torch.zeros(0, 12, 32)
    out = torch.ops.tokenmill.encoder_attention(q, q, q, torch.zeros(1, dtype=torch.long), 1.0)
    assert out.shape == (0, 12, 32)


@pytest.mark.parametrize(("case", "message"), [
    ("starts past T", "from 0 to T"),
    ("decreasing starts", "must not decrease"),
    ("head_dim 40", "multiple of 16"),
    ("mixed dtypes", "dtypes differ"),
    ("float16", "bf16 or fp32"),
    ("strided dims", "contiguous"),
    ("int32 starts", "int64"),
])
def test_bad_input_is_refused_clearly(case: str, message: str) -> None:
    q = torch.randn(10, 2, 32)
    k = v = q
    seq_starts = torch.tensor([0, 4, 10])
    if case == "starts past T":
        seq_starts = torch.tensor([0, 4, 11])
    elif case == "decreasing starts":
        seq_starts = torch.tensor([0, 6, 4, 10])
    elif case == "head_dim 40":
        q = k = v = torch.randn(10, 2, 40)
    elif case == "mixed dtypes":
        k = q.to(torch.bfloat16)
    elif case == "float16":
        q = k = v = q.half()
    elif case == "strided dims":
        q = torch.randn(10, 2, 64)[..., ::2]
    elif case == "int32 starts":
        seq_starts = seq_starts.int()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.tokenmill.encoder_attention(q, k, v, seq_starts, 1.0)
