"""Engine settings: one keyword-only EngineConfig, checked where it is defined; every face takes
its defaults from it, and `kv_cache_memory` means the same thing from Python and the command."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill import LLM, EngineConfig
from tokenmill.cli import main
from tokenmill.engine.config import parse_memory


@pytest.mark.parametrize(("value", "parsed"), [
    (1, 1),  # an int is bytes, from Python as from anywhere
    (1 << 30, 1 << 30),
    ("4GiB", 4 << 30),
    ("4 gib", 4 << 30),
    ("512MB", 512 * 10**6),
    ("1.5KiB", 1536),
    ("65536B", 65536),
    (0.2, 0.2),
    ("0.2", 0.2),
    ("20%", 0.2),
    ("100%", 1.0),
    (1.0, 1.0),
])
def test_memory_sizes_and_fractions(value: str | int | float, parsed: int | float) -> None:
    result = parse_memory(value)
    assert result == parsed and type(result) is type(parsed)


@pytest.mark.parametrize("value", ["1", "0", "4096", "lots", "4 GB of RAM", "-1GiB", "0.0", "150%", "", 0, -5, 1.5,
                                   0.0, True, None])
def test_ambiguous_or_bad_memory_values_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="kv_cache_memory"):
        parse_memory(value)  # type: ignore[arg-type]


def test_config_is_keyword_only_and_checked() -> None:
    with pytest.raises(TypeError):
        EngineConfig("model", "float32")  # type: ignore[misc]
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="float8")
    assert EngineConfig(kv_cache_memory="2GiB").kv_cache_memory == 2 << 30


def test_llm_names_an_unknown_argument_before_loading_anything() -> None:
    with pytest.raises(TypeError, match="'max_num_seq'.*max_num_seqs"):
        LLM(max_num_seq=4)


@pytest.mark.parametrize("command", [["run", "{input}", "-o", "{output}"], ["serve"], ["bench", "job", "{input}"]])
def test_a_bad_kv_cache_memory_is_one_line_and_exit_2(command: list[str], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    input_path = tmp_path / "in.jsonl"
    input_path.write_text("")
    args = [a.format(input=input_path, output=tmp_path / "out.jsonl") for a in command]
    assert main([*args, "--kv-cache-memory", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tokenmill: error: kv_cache_memory") and "'1'" in err
    assert not (tmp_path / "out.jsonl").exists()
