"""benchmarks/make_gguf_model.py writes a Llama-shaped random GGUF that tokenmill and transformers
read alike: the files issue 12's benchmarks run on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import torch
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "make_gguf_model.py"


def test_the_random_gguf_loads_and_generates_as_in_transformers(tmp_path: Path) -> None:
    path = tmp_path / "tiny-q8_0.gguf"
    subprocess.run([sys.executable, str(SCRIPT), str(path), "--shape", "tiny", "--type", "q8_0"], check=True,
                   capture_output=True)
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.1.ffn_norm.weight"] == gguf.GGMLQuantizationType.F32

    llm = LLM(str(path), dtype="float32", quantization="none", kv_cache_memory="64MiB")
    outputs = llm.generate(["Hello there, how are", [1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_tokens=8),
                           use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    for output in outputs:
        ids = torch.tensor([output.prompt_token_ids])
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                   do_sample=False, pad_token_id=2)[0, ids.shape[1]:].tolist()
        assert output.outputs[0].token_ids == expected
