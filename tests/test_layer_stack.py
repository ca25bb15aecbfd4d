"""The decoder layers as one C++ call for a whole step (models/layer_stack.py, kernels/layer_stack.cpp): where it is
built, and that a step through it gives the Python layers' outputs bit for bit (decodes with shared prefixes and
windows, several sequences of different lengths, prompt chunks, drafted tokens, and steps mixing them), for the Llama
family and for Gemma 3 (its local layers' window shorter than the contexts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_gemma3 import COMMON, save_tiny
from transformers import Gemma3TextConfig

from tokenmill import LLM, kernels
from tokenmill.attention import BatchLayout
from tokenmill.attention.cpu_kernel_backend import KernelMetadata
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.engine import Engine
from tokenmill.engine.model_runner import ModelRunner, step_metadata

pytestmark = pytest.mark.skipif(not kernels.int8_dot_available(), reason="no AVX-512 VNNI: no int8 kernels")


def runner_of(model: str | None, quantization: str = "auto") -> ModelRunner:
    engine = Engine(EngineConfig(model=model, dtype="bfloat16", quantization=quantization, kv_cache_memory="256MiB"))
    torch.manual_seed(0)
    engine.runner.kv_cache.normal_()  # contexts of random keys and values: both paths read the same
    return engine.runner


@pytest.fixture(scope="module")
def smol_runner() -> ModelRunner:
    """The default model (SmolLM2-135M Q4_1) in bf16: its blocks on the int8 kernels."""
    return runner_of(None)


def hidden_both_ways(runner: ModelRunner, num_queries: list[int], context_lens: list[int],
                     block_table: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's final hidden states through the stack, then through the Python layers (the stack set aside)."""
    model = runner.model
    layout, positions = BatchLayout.of(torch.tensor(num_queries), torch.tensor(context_lens), torch.tensor(block_table),
                                       runner.block_size)
    metas = step_metadata(model, runner.attention, layout)
    input_ids = torch.randint(3, model.config.vocab_size, (len(positions),), generator=torch.Generator().manual_seed(1))
    stack = model.layer_stack
    assert stack is not None and all(isinstance(meta, KernelMetadata) for meta in metas.values())
    with torch.inference_mode():
        fused = model(input_ids, positions, runner.kv_cache, runner.attention, metas)
        model.layer_stack = None
        try:
            layers = model(input_ids, positions, runner.kv_cache, runner.attention, metas)
        finally:
            model.layer_stack = stack
    return fused, layers


@pytest.mark.parametrize(("context_lens", "block_table"), [
    ([140], [list(range(1, 10))]),
    ([17, 300, 41], [[5, 6, 0], [7, 8, 9], [10, 11, 12]]),  # 300 tokens with a block of 128: 3 blocks
    ([200, 150, 129, 256], [[1, 2], [1, 3], [1, 4], [1, 5]]),  # a first block (128 tokens) shared by all
])
def test_decodes_through_the_stack_are_the_layers_bits(smol_runner: ModelRunner, context_lens: list[int],
                                                       block_table: list[list[int]]) -> None:
    block = smol_runner.block_size
    table = [[b * 128 // block + i for b in row for i in range(128 // block)] for row in block_table]
    fused, layers = hidden_both_ways(smol_runner, [1] * len(context_lens), context_lens, table)
    assert fused.dtype == torch.bfloat16 and torch.equal(fused, layers)


@pytest.mark.parametrize(("num_queries", "context_lens"), [
    ([5, 9], [5, 9]),  # two prompts' first chunks
    ([1, 5], [40, 5]),  # a decode beside a prompt chunk
    ([9, 1, 4], [60, 33, 130]),  # drafted tokens being verified (8 and 3 drafts) beside a decode
])
def test_chunks_through_the_stack_are_the_layers_bits(smol_runner: ModelRunner, num_queries: list[int],
                                                      context_lens: list[int]) -> None:
    table = [[i * 16 + j for j in range(16)] for i in range(len(context_lens))]
    fused, layers = hidden_both_ways(smol_runner, num_queries, context_lens, table)
    assert torch.equal(fused, layers)


def test_windowed_decodes_through_the_stack(tiny_models: dict[str, Path]) -> None:
    """A tiny Mistral, every layer windowed (20 tokens), its weights quantized to Q8_0 at load (int8 activations):
    contexts inside the window (a shared prefix allowed) and past it (each its own window)."""
    runner = runner_of(str(tiny_models["mistral-window-hd64"]), quantization="int8")
    for context_lens in ([12, 9], [40, 25, 300]):
        table = [[i * 32 + j for j in range(32)] for i in range(len(context_lens))]
        fused, layers = hidden_both_ways(runner, [1] * len(context_lens), context_lens, table)
        assert torch.equal(fused, layers), context_lens


def test_built_only_where_it_serves(smol_llm: LLM, smol_runner: ModelRunner) -> None:
    assert smol_runner.model.layer_stack is not None
    assert smol_llm.engine.runner.model.layer_stack is None  # fp32: blocks on quant_linear, torch's elementwise ops


def block_table(num_seqs: int, shared_blocks: int, blocks_each: int) -> list[list[int]]:
    """Each sequence's blocks: the first `shared_blocks` shared by all, then its own."""
    return [list(range(1, shared_blocks + 1)) + [1 + shared_blocks + i * blocks_each + j
                                                  for j in range(blocks_each - shared_blocks)]
            for i in range(num_seqs)]


@pytest.fixture(scope="module")
def gemma_runner(gemma_gguf: Path) -> ModelRunner:
    """Gemma 3 270M Q4_K_M in bf16: every projection on the int8 kernels, local layers under a window of 512."""
    return runner_of(str(gemma_gguf))


@pytest.mark.parametrize(("num_queries", "context_lens", "shared_blocks"), [
    ([1, 1], [40, 700], 0),  # a decode inside the window, one past it
    ([1, 1, 1, 1], [600, 550, 530, 700], 32),  # 512 tokens shared: read once by the global layers; the local ones
    # read each its own window
    ([1, 1, 1], [200, 150, 129], 8),  # inside the window: a prefix shared by every layer
    ([5, 9], [5, 9], 0),  # two prompts' first chunks
    ([64], [640], 0),  # a prompt chunk across the window's edge
    ([1, 5], [600, 5], 0),  # a decode beside a prompt chunk
    ([9, 1, 4], [560, 33, 530], 0),  # drafted tokens being verified (8 and 3 drafts) beside a decode
    ([1, 1, 16], [530, 700, 600], 16),  # decodes sharing a prefix beside a chunk
])
def test_gemma3_steps_through_the_stack_are_the_layers_bits(gemma_runner: ModelRunner, num_queries: list[int],
                                                            context_lens: list[int], shared_blocks: int) -> None:
    table = block_table(len(context_lens), shared_blocks, 48)
    fused, layers = hidden_both_ways(gemma_runner, num_queries, context_lens, table)
    assert fused.dtype == torch.bfloat16 and torch.equal(fused, layers)


@pytest.fixture(scope="module")
def tiny_gemma_with_heads_of_64(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> Path:
    """Local, global, local layers with heads the attention kernels take, a window of 20 (off their tiles), the
    global rope linearly scaled and the query scale not the head_dim's (the q norm's scale carries it)."""
    config = Gemma3TextConfig(**{**COMMON, "head_dim": 64, "sliding_window": 20}, num_hidden_layers=3,
                              query_pre_attn_scalar=48,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                               "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                  "rope_theta": 1000000.0}})
    return save_tiny(config, tmp_path_factory.mktemp("gemma3-hd64"), smol_dir)


def test_tiny_gemma3_through_the_stack(tiny_gemma_with_heads_of_64: Path) -> None:
    """Its weights quantized to Q8_0 at load (int8 activations)."""
    runner = runner_of(str(tiny_gemma_with_heads_of_64), quantization="int8")
    for num_queries, context_lens, shared_blocks in (([1, 1, 1], [18, 20, 17], 1), ([1, 1, 1], [40, 25, 300], 0),
                                                     ([5, 9, 1], [5, 30, 64], 0)):
        fused, layers = hidden_both_ways(runner, num_queries, context_lens,
                                         block_table(len(context_lens), shared_blocks, 20))
        assert torch.equal(fused, layers), context_lens


def test_gemma3_stack_built_only_where_it_serves(gemma_runner: ModelRunner, tiny_gemma_with_heads_of_64: Path) -> None:
    assert gemma_runner.model.layer_stack is not None
    fp32 = Engine(EngineConfig(model=str(tiny_gemma_with_heads_of_64), dtype="float32", kv_cache_memory="16MiB"))
    assert fp32.runner.model.layer_stack is None  # blocks on plain weights, torch's elementwise ops
