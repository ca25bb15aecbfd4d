"""Mixture-of-experts models from GGUF files, their experts in the file's blocks; quantization="int8" on experts.

Each tiny MoE family of conftest, as llama.cpp runs it (every layer sparse; Qwen3-MoE's top-k renormalised,
Qwen2-MoE's not, Mixtral without a window: llama.cpp's graphs fix these, its files carry no key for them), is
written as llama.cpp's converter writes it (benchmarks/bench_moe.py's write_gguf: architectures qwen3moe,
qwen2moe, and llama with an expert count for Mixtral; ffn_*_exps stacked [E, rows, cols]).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import bench_moe
import gguf
import numpy as np
import pytest
import torch
from conftest import TOKENIZER_FILES, _tiny_config, hf_greedy
from safetensors.torch import load_file, save_file
from test_moe import MOE_ARCHS, stacked_checkpoint
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams, kernels
from tokenmill.models.gguf_file import GGUFFile, hf_name
from tokenmill.models.int8_dot import Int8DotLinear
from tokenmill.models.loader import ModelLoadError, load_model
from tokenmill.models.moe import SparseMoeBlock
from tokenmill.models.quantized import QuantizedLinear

Q = gguf.GGMLQuantizationType
LLAMA_CPP_ROUTING = {"qwen3-moe": {"norm_topk_prob": True, "mlp_only_layers": []},
                     "qwen2-moe": {"norm_topk_prob": False}, "mixtral": {"sliding_window": None}}
PROMPTS = [[(37 * i + 11 * j) % 49000 + 3 for j in range(n)] for i, n in enumerate((1, 7, 23, 40))]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="quantized weights need tokenmill's kernels")


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> dict[str, dict[str, Path]]:
    """Per family: its HF folder, and the folder written as an F32 and a Q8_0 GGUF."""
    root = tmp_path_factory.mktemp("moe-gguf")
    files = {}
    for arch in MOE_ARCHS:
        config = _tiny_config(arch)
        for key, value in LLAMA_CPP_ROUTING[arch].items():
            setattr(config, key, value)
        torch.manual_seed(0)
        folder = root / arch
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        for name in TOKENIZER_FILES:
            if (smol_dir / name).exists():
                shutil.copy(smol_dir / name, folder / name)
        files[arch] = {"folder": folder, "f32": root / f"{arch}-f32.gguf", "q8_0": root / f"{arch}-q8_0.gguf"}
        bench_moe.write_gguf(folder, files[arch]["f32"], Q.F32)
        bench_moe.write_gguf(folder, files[arch]["q8_0"], Q.Q8_0)
    return files


def greedy(model: Path, quantization: str) -> list[list[int]]:
    outputs = LLM(str(model), dtype="float32", quantization=quantization, kv_cache_memory=1 << 24).generate(
        PROMPTS, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def sparse_blocks(model: torch.nn.Module) -> list[SparseMoeBlock]:
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoeBlock)]


def test_llama_cpps_expert_names() -> None:
    assert hf_name("blk.2.ffn_gate_inp.weight") == "model.layers.2.mlp.gate.weight"
    assert hf_name("blk.2.ffn_down_exps.weight") == "model.layers.2.mlp.experts.down_proj"
    assert hf_name("blk.2.ffn_gate_inp_shexp.weight", "qwen2moe") == "model.layers.2.mlp.shared_expert_gate.weight"


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_an_f32_file_generates_as_transformers_on_the_folder(arch: str, moe_files: dict[str, dict[str, Path]]) -> None:
    """fp32, quantization="none": greedy tokens equal transformers' on the HF folder the file was written from."""
    files = moe_files[arch]
    config = GGUFFile(files["f32"]).config
    expected = AutoModelForCausalLM.from_pretrained(files["folder"], dtype=torch.float32).eval()
    assert config.architectures == expected.config.architectures
    for key in ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size", "norm_topk_prob", "sliding_window"):
        assert getattr(config, key, None) == getattr(expected.config, key, None), key
    assert greedy(files["f32"], "none") == [hf_greedy(expected, p, GREEDY.max_tokens) for p in PROMPTS]


def q8_0_rounded(folder: Path, out: Path) -> Path:
    """A copy of the folder whose weights are what its Q8_0 file holds: every matrix write_gguf quantizes (rows of
    whole blocks, the routers left out) rounded through gguf's Q8_0 (Mixtral's q/k row order does not matter: a
    block lies within a row)."""
    shutil.copytree(folder, out)
    tensors = load_file(folder / "model.safetensors")
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and tensor.shape[1] % 32 == 0 and not name.endswith(".gate.weight"):
            rounded = gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), Q.Q8_0), Q.Q8_0)
            tensors[name] = torch.from_numpy(rounded.reshape(tensor.shape))
    save_file(tensors, out / "model.safetensors")
    return out


@needs_kernels
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_a_q8_0_file_keeps_its_experts_in_blocks(arch: str, moe_files: dict[str, dict[str, Path]],
                                                 tmp_path: Path) -> None:
    """Every expert runs on the file's Q8_0 blocks, each expert's down projection a view of the layer's stacked
    blocks (one storage, no copy). fp32: greedy tokens equal transformers' on the folder's weights rounded as the
    file holds them. Against the F32 file: each prompt's first greedy token is among the F32 run's 3 likeliest
    (the tiny random models' next-token distributions are nearly flat, so Q8_0's rounding, and the expert choices
    it flips, reorders near ties)."""
    files = moe_files[arch]
    model = load_model(files["q8_0"], torch.float32).model
    for block in sparse_blocks(model):
        methods = [m for e in block.experts for m in (e.gate_up_proj.method, e.down_proj.method)]
        assert all(isinstance(m, QuantizedLinear) and [p.qtype for p in m.parts] == [Q.Q8_0] for m in methods)
        assert len({e.down_proj.method.parts[0].blocks.untyped_storage().data_ptr() for e in block.experts}) == 1
    oracle = AutoModelForCausalLM.from_pretrained(q8_0_rounded(files["folder"], tmp_path / arch),
                                                  dtype=torch.float32).eval()
    quantized = greedy(files["q8_0"], "auto")
    assert quantized == [hf_greedy(oracle, p, GREEDY.max_tokens) for p in PROMPTS]
    exact = LLM(str(files["f32"]), dtype="float32", quantization="none", kv_cache_memory=1 << 24).generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=1, logprobs=3), use_tqdm=False)
    assert all(q[0] in e.outputs[0].logprobs[0] for q, e in zip(quantized, exact))


@pytest.mark.skipif(not kernels.int8_dot_available(), reason="int8 activations need tokenmill's VNNI kernels")
def test_a_bf16_models_experts_run_on_int8_activations(moe_files: dict[str, dict[str, Path]]) -> None:
    """In bf16 the experts' blocks, views of the stacked tensor, keep the int8 mark the loader gave it."""
    for block in sparse_blocks(load_model(moe_files["qwen3-moe"]["q8_0"], torch.bfloat16).model):
        methods = [m for e in block.experts for m in (e.gate_up_proj.method, e.down_proj.method)]
        assert all(isinstance(m, Int8DotLinear) for m in methods)


@pytest.mark.skipif(not kernels.int8_dot_available(), reason="int8 activations need tokenmill's VNNI kernels")
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_grouped_experts_give_an_expert_at_a_times_bits(arch: str, moe_files: dict[str, dict[str, Path]]) -> None:
    """A bf16 model's int8 experts run grouped, two kernel calls a layer, with the bits of one expert at a time: 1 to
    40 tokens (experts with no rows, with one, with many). fp32 models keep an expert at a time."""
    assert all(b.grouped_experts is None for b in sparse_blocks(load_model(moe_files[arch]["q8_0"],
                                                                           torch.float32).model))
    blocks = sparse_blocks(load_model(moe_files[arch]["q8_0"], torch.bfloat16).model)
    generator = torch.Generator().manual_seed(0)
    for block in blocks:
        assert block.grouped_experts is not None
        for tokens in (1, 3, 40):
            x = torch.randn(tokens, block.gate.in_features, generator=generator).to(torch.bfloat16)
            grouped = block(x)
            grouped_experts, block.grouped_experts = block.grouped_experts, None
            one_at_a_time = block(x)
            block.grouped_experts = grouped_experts
            assert torch.equal(grouped.view(torch.int16), one_at_a_time.view(torch.int16)), (tokens,)


@needs_kernels
@pytest.mark.parametrize("layout", ["per expert", "stacked"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_int8_quantizes_the_experts(arch: str, layout: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """quantization="int8" on an HF folder: every expert (Mixtral's w1/w2/w3, transformers 5's stacked
    gate_up_proj/down_proj) runs on Q8_0 blocks, and the model generates the first token fp32 does."""
    folder = tiny_models[arch]
    if layout == "stacked":
        folder = tmp_path / arch
        stacked_checkpoint(tiny_models[arch], folder)
    loaded = load_model(folder, torch.float32, quantization="int8")
    for block in sparse_blocks(loaded.model):
        methods = [m for e in block.experts for m in (e.gate_up_proj.method, e.down_proj.method)]
        assert all(isinstance(m, QuantizedLinear) and [p.qtype for p in m.parts] == [Q.Q8_0] for m in methods)
    quantized, exact = greedy(folder, "int8"), greedy(folder, "none")
    assert [len(q) for q in quantized] == [GREEDY.max_tokens] * len(PROMPTS)
    assert [q[0] for q in quantized] == [e[0] for e in exact]


@needs_kernels
def test_int8_on_a_files_plain_experts_gives_the_q8_0_files_blocks(moe_files: dict[str, dict[str, Path]]) -> None:
    """quantization="int8" on the F32 file's stacked experts: each expert's blocks are byte for byte the Q8_0
    file's (gguf's quantization)."""
    quantized = sparse_blocks(load_model(moe_files["qwen2-moe"]["f32"], torch.float32, quantization="int8").model)
    expected = sparse_blocks(load_model(moe_files["qwen2-moe"]["q8_0"], torch.float32).model)
    for block, expected_block in zip(quantized, expected, strict=True):
        for expert, expected_expert in zip(block.experts, expected_block.experts, strict=True):
            for linear in ("gate_up_proj", "down_proj"):
                ours, theirs = (getattr(e, linear).method.parts for e in (expert, expected_expert))
                assert [p.qtype for p in ours] == [Q.Q8_0] and torch.equal(ours[0].blocks, theirs[0].blocks)


@pytest.mark.parametrize(("architecture", "keys", "error"), [
    ("qwen2", {"add_expert_count": 8}, "GGUF architecture 'qwen2' with experts is not supported"),
    ("qwen3moe", {"add_expert_count": 8, "add_expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID},
     "expert routing .* is not qwen3_moe's softmax top-k"),
])
def test_experts_tokenmill_cannot_route_are_refused_clearly(architecture: str, keys: dict[str, object], error: str,
                                                             tmp_path: Path) -> None:
    path = tmp_path / "moe.gguf"
    writer = gguf.GGUFWriter(str(path), architecture)
    for method, value in keys.items():
        getattr(writer, method)(value)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=error):
        load_model(path, torch.float32)
