"""vLLM's LLM(...) arguments (accepted, ignored with one warning, or refused), LLM(seed=...), and the
model's generation_config as the default sampling settings."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.models.loader import ModelLoadError

TINY = {"dtype": "float32", "kv_cache_memory": 1 << 26}
PROMPTS = [[100, 200, 300], [400, 500], [600]]
SAMPLED = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)


def sampled(llm: LLM, prompts: list[list[int]], params: SamplingParams = SAMPLED) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_llm_seed_makes_a_script_reproducible_whatever_the_batching(tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["llama"])
    first = sampled(LLM(model, seed=7, **TINY), PROMPTS)
    # The same requests in the same order, in other batches: request k still gets seed (7, k).
    again = LLM(model, seed=7, max_num_seqs=1, **TINY)
    assert sampled(again, PROMPTS[:1]) + sampled(again, PROMPTS[1:]) == first
    assert sampled(LLM(model, seed=8, **TINY), PROMPTS) != first
    # A request's own seed wins: the same tokens as from an LLM without a seed.
    own = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=3)
    assert sampled(LLM(model, seed=7, **TINY), PROMPTS, own) == sampled(LLM(model, **TINY), PROMPTS, own)


def test_vllm_arguments_that_mean_something_here(tiny_models: dict[str, Path], smol_dir: Path) -> None:
    llm = LLM(model=str(tiny_models["qwen2"]), dtype="float", gpu_memory_utilization=0.05, max_model_len=64,
              max_num_seqs=3, max_num_batched_tokens=32, enable_prefix_caching=False, block_size=32,
              tensor_parallel_size=1, pipeline_parallel_size=1, trust_remote_code=True, revision=None,
              tokenizer=str(smol_dir), tokenizer_mode="auto", quantization=None, runner="generate",
              kv_cache_dtype="auto", seed=None)
    config = llm.engine.config
    assert (config.dtype, config.kv_cache_memory, config.max_num_seqs, config.max_num_batched_tokens,
            config.enable_prefix_caching, config.block_size, config.task) == ("float", 0.05, 3, 32, False, 32,
                                                                              "generate")
    assert llm.engine.max_model_len == 64 and llm.frontend.tokenizer.name_or_path == str(smol_dir)
    assert len(llm.generate("a", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_gpu_tuning_arguments_are_ignored_with_one_warning(tiny_models: dict[str, Path],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tokenmill.llm"):
        LLM(str(tiny_models["llama"]), enforce_eager=True, swap_space=4, cpu_offload_gb=0,
            disable_custom_all_reduce=True, compilation_config={"level": 3}, **TINY)
    warnings = [r.getMessage() for r in caplog.records if r.name == "tokenmill.llm"]
    assert len(warnings) == 1
    assert all(name in warnings[0] for name in ("enforce_eager", "swap_space", "cpu_offload_gb",
                                                  "disable_custom_all_reduce", "compilation_config"))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"not_an_argument": 1}, TypeError, "not_an_argument"),
    ({"max_num_seq": 4}, TypeError, "max_num_seq"),
    ({"tensor_parallel_size": 2}, ValueError, "tensor_parallel_size=2"),
    ({"pipeline_parallel_size": 2}, ValueError, "pipeline_parallel_size=2"),
    ({"revision": "main"}, ValueError, "revision='main'"),
    ({"tokenizer_mode": "mistral"}, ValueError, "tokenizer_mode='mistral'"),
    ({"kv_cache_dtype": "fp8"}, ValueError, "kv_cache_dtype='fp8'"),
    ({"runner": "draft"}, ValueError, "runner='draft'"),
    ({"seed": "x"}, ValueError, "seed"),
    ({"gpu_memory_utilization": 0.5, "kv_cache_memory": "1GiB"}, TypeError, "gpu_memory_utilization"),
    ({"gpu_memory_utilization": 1.5}, ValueError, "gpu_memory_utilization"),
    ({"dtype": "float64"}, ValueError, "dtype"),
])
def test_other_arguments_and_values_are_refused(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        LLM("unused: refused before loading", **kwargs)


def test_missing_tokenizer_folder_is_a_clear_error(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tokenizer not found"):
        LLM(str(tiny_models["llama"]), tokenizer=str(tmp_path / "nowhere"), **TINY)


def with_generation_config(source: Path, folder: Path, config: dict) -> Path:
    shutil.copytree(source, folder)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_generation_config_gives_the_default_sampling_params(tiny_models: dict[str, Path], tmp_path: Path,
                                                             smol_llm: LLM) -> None:
    recommended = {"temperature": 0.6, "top_p": 0.9, "top_k": 1, "min_p": 0.05, "repetition_penalty": 1.1}
    model = with_generation_config(tiny_models["llama"], tmp_path / "model", {**recommended, "eos_token_id": 2})
    llm = LLM(str(model), **TINY)
    assert llm.frontend.generation_defaults == recommended
    defaults = llm.get_default_sampling_params()
    assert {name: getattr(defaults, name) for name in recommended} == recommended
    # generate() without params samples with them: top_k 1 makes every run the greedy one, unseeded.
    greedy = sampled(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.1))
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, use_tqdm=False)] == greedy
    # "vllm" turns them off; a folder gives its own.
    assert LLM(str(model), generation_config="vllm", **TINY).get_default_sampling_params() == SamplingParams()
    other = with_generation_config(tiny_models["llama"], tmp_path / "other", {"temperature": 0.3})
    assert LLM(str(model), generation_config=str(other), **TINY).frontend.generation_defaults == {"temperature": 0.3}
    assert smol_llm.frontend.generation_defaults == {}  # a GGUF has none
    broken = with_generation_config(tiny_models["llama"], tmp_path / "broken", {"top_p": 0.0})
    with pytest.raises(ModelLoadError, match="top_p"):
        LLM(str(broken), **TINY)
