"""The native GGUF reader: the config, tokenizer and weights transformers reads from the same file,
with no conversion; Hugging Face folders still load, from safetensors or `pytorch_model.bin`."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, LlamaConfig

from tokenmill import LLM, SamplingParams
from tokenmill.models.gguf_file import GGUFFile, hf_name
from tokenmill.models.llama import rope_tables
from tokenmill.models.loader import ModelLoadError, default_model_path, load_model
from tokenmill.models.quantized import QuantizedWeight

TEXTS = ["Hello, world!", "  two leading spaces\tand a tab", "ünïcödé and 日本語 and emoji 🙂",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "def f(x):\n    return x ** 2\n"]


def test_config_and_tokenizer_are_transformers_own(smol_dir: Path) -> None:
    gguf = GGUFFile(default_model_path())
    expected = AutoConfig.from_pretrained(smol_dir).to_dict()
    mine = gguf.config.to_dict()
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        expected.pop(key, None)
        mine.pop(key, None)
    assert mine == expected
    reference, tokenizer = AutoTokenizer.from_pretrained(smol_dir), gguf.tokenizer()
    for text in TEXTS:
        assert tokenizer.encode(text) == reference.encode(text), text
    assert tokenizer.chat_template == reference.chat_template
    assert (tokenizer.eos_token, tokenizer.bos_token) == (reference.eos_token, reference.bos_token)


def test_weights_are_the_files_blocks_dequantized_as_transformers_does(smol_hf: torch.nn.Module) -> None:
    tensors = GGUFFile(default_model_path()).tensors()
    embedding = tensors["model.embed_tokens.weight"]
    assert isinstance(embedding, QuantizedWeight) and embedding.qtype.name == "Q8_0"
    assert isinstance(tensors["model.layers.0.self_attn.q_proj.weight"], QuantizedWeight)  # kept as blocks
    reference = smol_hf.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight",  # q and k: rows unpermuted
                 "model.layers.3.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight",
                 "model.layers.0.input_layernorm.weight"):
        weight = tensors[name]
        values = weight.dequantize() if isinstance(weight, QuantizedWeight) else weight
        assert torch.equal(values, reference[name]), name


def test_names_outside_the_llama_family_are_refused() -> None:
    assert hf_name("blk.7.ffn_up.weight") == "model.layers.7.mlp.up_proj.weight"
    assert hf_name("rope_freqs.weight") is None
    with pytest.raises(ValueError, match="ssm_conv1d"):
        hf_name("blk.0.ssm_conv1d.weight")


def test_a_truncated_gguf_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(default_model_path().read_bytes()[:4096])
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        load_model(broken, torch.float32)


def test_a_folder_of_pytorch_model_bin_loads_as_safetensors_do(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    source = tiny_models["llama"]
    folder = tmp_path / "bin"
    folder.mkdir()
    # transformers 5 writes safetensors only: the old format is written as older versions wrote it.
    torch.save(load_file(source / "model.safetensors"), folder / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    assert list(folder.glob("pytorch_model*.bin")) and not list(folder.glob("*.safetensors"))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = [LLM(str(f), dtype="float32", kv_cache_memory=1 << 26).generate(["Hello there", [5, 6, 7]], params,
                                                                             use_tqdm=False)
               for f in (source, folder)]
    assert [o.outputs[0].token_ids for o in outputs[0]] == [o.outputs[0].token_ids for o in outputs[1]]


def test_llama3_rope_factors_of_a_gguf_give_transformers_llama3_rope() -> None:
    """llama.cpp writes Llama 3.1+'s rope scaling as a tensor of divisors (rope_freqs.weight);
    computed as its converter does, they give the frequencies of transformers' llama3 rope."""
    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    llama3 = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=scaling)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 64, 2).float() / 64))
    factors = []
    for freq in inv_freq.tolist():  # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors
        wavelen = 2 * math.pi / freq
        if wavelen < 64 / 4.0:
            factors.append(1.0)
        elif wavelen > 64 / 1.0:
            factors.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    from_gguf = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0, rope_freq_factors=factors)
    for mine, expected in zip(rope_tables(from_gguf, 4096), rope_tables(llama3, 4096)):
        torch.testing.assert_close(mine, expected, atol=2e-4, rtol=0)
    assert not torch.allclose(rope_tables(from_gguf, 4096)[0], rope_tables(LlamaConfig(
        hidden_size=256, num_attention_heads=4, rope_theta=500000.0), 4096)[0], atol=1e-2)
