"""`tokenmill bench batched`: llama-batched-bench's grid and columns on a tiny model, the load table, and the
peers (llama.cpp, OpenVINO) where they are installed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.bench import WARMUP_PROMPTS, WARMUP_TOKENS, openvino_spec
from tokenmill.cli import main


@pytest.mark.parametrize("pps", [False, True])
def test_batched_grid_rows_and_plot(pps: bool, tmp_path: Path, tiny_models: dict[str, Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rows_path, plot_path = tmp_path / "rows.jsonl", tmp_path / "plot.png"
    args = ["bench", "batched", "--model", str(tiny_models["llama"]), "--dtype", "float32", "--npp", "8,16",
            "--ntg", "4", "--npl", "1,3", "--jsonl", str(rows_path), "--plot", str(plot_path)]
    assert main(args + (["--pps"] if pps else [])) == 0
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert [(r["PP"], r["TG"], r["B"]) for r in rows] == [(8, 4, 1), (8, 4, 3), (16, 4, 1), (16, 4, 3)]
    for r in rows:
        assert r["N_KV"] == r["B"] * (r["PP"] + r["TG"])
        assert r["S_TG"] == pytest.approx(r["B"] * r["TG"] / r["T_TG"])
        assert r["T"] == pytest.approx(r["T_PP"] + r["T_TG"])
    assert plot_path.read_bytes()[:4] == b"\x89PNG"
    assert "| tokenmill | 16 | 4 | 3 |" in capsys.readouterr().out


def test_job_reports_its_tail_and_plots_it(tmp_path: Path, tiny_models: dict[str, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "m", "prompt": f"line {i}", "max_tokens": 60 if i == 7 else 4, "ignore_eos": True}}
             for i in range(12)]
    input_path = tmp_path / "job.jsonl"
    input_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    plot_path = tmp_path / "tail.png"
    assert main(["bench", "job", str(input_path), "-o", str(tmp_path / "out.jsonl"), "--model",
                 str(tiny_models["llama"]), "--dtype", "float32", "--max-num-seqs", "8", "--plot", str(plot_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["succeeded"] == 12 and summary["completion_tokens"] == 11 * 4 + 60
    assert 0 < summary["thin_batch_seconds"] <= summary["wall_time_s"]
    assert 0 < summary["thin_batch_share"] <= 1
    assert plot_path.read_bytes()[:4] == b"\x89PNG"


def test_batched_runs_transformers_on_the_same_grid(tiny_models: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "batched", "--model", str(tiny_models["llama"]), "--dtype", "float32", "--npp", "16",
            "--ntg", "4", "--npl", "1,2", "--transformers"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| transformers | 16 | 4 | 2 |" in out
    assert "tokenmill / transformers:" in out and "| 16 | 4 | 2 |" in out.split("tokenmill / transformers:")[1]


def test_batched_runs_with_one_sequence_at_a_time(tiny_models: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "batched", "--model", str(tiny_models["llama"]), "--dtype", "float32", "--npp", "16",
            "--ntg", "4", "--npl", "1", "--max-num-seqs", "1"]
    assert main(args) == 0  # the warm-up too fits one sequence
    assert "| tokenmill | 16 | 4 | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--max-num-seqs", "2"], "do not fit one step"),  # 3 sequences cannot decode together
    (["--kv-cache-memory", f"{14 * 4096}B"], "did not decode in lockstep"),  # 14 4-KiB blocks: prompts evicted
])
def test_batched_refuses_points_it_cannot_measure_in_lockstep(extra: list[str], message: str,
                                                              tiny_models: dict[str, Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "batched", "--model", str(tiny_models["llama"]), "--dtype", "float32", "--npp", "64",
            "--ntg", "4", "--npl", "3", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


# The peers are not tokenmill's dependencies: their tests run where these name them, and skip elsewhere (CI).
LLAMA_BATCHED_BENCH = os.environ.get("LLAMA_BATCHED_BENCH") or shutil.which("llama-batched-bench")
LLAMA_QUANTIZE = os.environ.get("LLAMA_QUANTIZE") or shutil.which("llama-quantize")
OPENVINO_PYTHON = os.environ.get("OPENVINO_PYTHON")  # an interpreter with openvino-genai and optimum-intel
BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_table(out: str) -> dict[str, list[str]]:
    """The load table's rows by engine, as cells."""
    table = out.split("load (tokenmill/bench_load.py")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    return {row[0]: row[1:] for row in rows[1:]}


def test_load_measures_a_cold_and_a_warm_start_rss_and_ttft(tiny_models: dict[str, Path],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "batched", "--model", str(tiny_models["llama"]), "--dtype", "float32", "--npp", "8,16",
            "--ntg", "2", "--npl", "1", "--threads", "1", "--load"]
    assert main(args) == 0
    rows = load_table(capsys.readouterr().out)
    assert list(rows) == ["tokenmill"]
    files_mib, load_cold, load_warm, first_cold, first_warm, rss_mib, ttft_8, ttft_16 = map(float, rows["tokenmill"])
    assert files_mib == round(sum(f.stat().st_size for f in tiny_models["llama"].iterdir()) / 2**20)
    assert 0 < load_cold < first_cold and 0 < load_warm < first_warm  # the process also imports and answers
    assert rss_mib > 100  # torch alone
    assert 0 < ttft_8 and 0 < ttft_16 < first_warm


@pytest.mark.parametrize(("make_folder", "python", "message"), [
    (lambda folder: None, sys.executable, "not an OpenVINO model folder"),
    (lambda folder: (folder / "openvino_model.xml").write_text("<net/>"), sys.executable,
     "cannot import openvino_genai"),
], ids=["no openvino_model.xml", "no openvino_genai"])
def test_the_openvino_peer_is_refused_before_anything_runs(make_folder: Callable[[Path], object], python: str,
                                                           message: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    if message == "cannot import openvino_genai" and importlib.util.find_spec("openvino_genai") is not None:
        pytest.skip("this interpreter has openvino_genai")
    make_folder(tmp_path)
    args = ["bench", "batched", "--npp", "16", "--ntg", "4", "--npl", "1", "--openvino", str(tmp_path),
            "--openvino-python", python]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def make_gguf(path: Path, kind: str) -> Path:
    extra = ["--llama-quantize", LLAMA_QUANTIZE] if kind == "q4_k_m" and LLAMA_QUANTIZE else []
    subprocess.run([sys.executable, str(BENCHMARKS / "make_gguf_model.py"), str(path), "--shape", "tiny", "--type",
                    kind, *extra], check=True, capture_output=True)
    return path


@pytest.mark.skipif(LLAMA_QUANTIZE is None, reason="no llama-quantize (set LLAMA_QUANTIZE)")
def test_make_gguf_writes_q4_k_m_through_llama_quantize(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "tiny-q4_k_m.gguf", "q4_k_m")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {kinds["blk.0.ffn_up.weight"], kinds["output.weight"]} == {"Q4_K", "Q6_K"}  # Q4_K_M's mix
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert list(tmp_path.iterdir()) == [path]  # the BF16 intermediate is gone
    outputs = LLM(str(path), kv_cache_memory="64MiB").generate([[1, 2, 3, 4]],
                                                                SamplingParams(max_tokens=4, ignore_eos=True),
                                                                use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 4


@pytest.mark.skipif(LLAMA_BATCHED_BENCH is None, reason="no llama-batched-bench (set LLAMA_BATCHED_BENCH)")
def test_llamacpp_runs_the_same_grid_and_its_start_is_measured(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = make_gguf(tmp_path / "tiny-q8_0.gguf", "q8_0")
    args = ["bench", "batched", "--model", str(path), "--npp", "16", "--ntg", "4", "--npl", "1,2", "--threads", "2",
            "--llama-batched-bench", str(LLAMA_BATCHED_BENCH), "--load"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| llama.cpp | 16 | 4 | 2 |" in out and "tokenmill / llama.cpp:" in out
    llama = load_table(out)["llama.cpp"]
    assert float(llama[0]) == round(path.stat().st_size / 2**20) and all(float(x) > 0 for x in llama)


@pytest.mark.skipif(OPENVINO_PYTHON is None, reason="no interpreter with openvino-genai (set OPENVINO_PYTHON)")
def test_openvino_runs_the_same_token_ids_and_its_start_is_measured(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = make_gguf(tmp_path / "tiny-q8_0.gguf", "q8_0")
    folder = tmp_path / "ov"
    subprocess.run([sys.executable, str(BENCHMARKS / "export_openvino.py"), str(path), str(folder), "--optimum-cli",
                    str(Path(str(OPENVINO_PYTHON)).with_name("optimum-cli"))], check=True, capture_output=True)
    args = ["bench", "batched", "--model", str(path), "--npp", "16", "--ntg", "4", "--npl", "1,3", "--threads", "2",
            "--openvino", str(folder), "--openvino-python", str(OPENVINO_PYTHON), "--load"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| openvino | 16 | 4 | 3 | 60 |" in out and "tokenmill / openvino:" in out
    assert all(float(x) > 0 for x in load_table(out)["openvino"])


def test_openvino_takes_the_warm_up_in_one_step_at_any_grid(tmp_path: Path) -> None:
    # A grid of B = 1 once gave the peer room for one sequence, and its two warm-up prompts then ran one after the
    # other ("a request decoded before every prompt was processed").
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "hidden_size": 64,
                                                      "num_hidden_layers": 2, "num_key_value_heads": 2}))
    spec = openvino_spec(tmp_path, 2, [(8, 4, 1)])
    assert spec["max_num_seqs"] >= WARMUP_PROMPTS and spec["max_num_batched_tokens"] >= WARMUP_PROMPTS * WARMUP_TOKENS
    assert openvino_spec(tmp_path, 2, [(64, 4, 32)])["max_num_batched_tokens"] == 64 * 32
