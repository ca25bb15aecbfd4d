"""`tokenmill bench batched`: llama-batched-bench's grid and columns, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_batched_runs_transformers_on_the_same_grid(tiny_models: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "batched", "--model", str(tiny_models["llama"]), "--dtype", "float32", "--npp", "16",
            "--ntg", "4", "--npl", "1,2", "--transformers"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| transformers | 16 | 4 | 2 |" in out
    assert "tokenmill / transformers:" in out and "| 16 | 4 | 2 |" in out.split("tokenmill / transformers:")[1]


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
