"""`tokenmill bench`: throughput measured the way llama.cpp's `llama-batched-bench` does, side by side.

`batched` runs a grid of (prompt length PP, generated length TG, parallel sequences B) on
synthetic prompts with greedy sampling, and prints llama-batched-bench's columns: N_KV, T_PP and
S_PP (prompt processing), T_TG and S_TG (generation), T and S (all). With `--pps` the B sequences
share one prompt. Peers run the same grid with the same thread count in the same run, and the ratios
are printed: llama.cpp's `llama-batched-bench` on a GGUF file (with prompts of its own), OpenVINO GenAI
on a folder that `optimum-cli export openvino` wrote (the very token ids tokenmill ran, through
tokenmill/openvino_peer.py in an interpreter of the user's choice, since OpenVINO's packages are not
tokenmill's), and `transformers` (the same token ids). `--load` adds a table of each engine's cold and
warm start, peak RSS and time to first token (tokenmill/bench_load.py). `job` times a whole batch
file, its tail with it (`--plot`: sequences running and tokens/s over the job's time). The share
of the machine is achieved FLOP/s over a GEMM peak measured in the same run.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill import bench_load
from tokenmill.engine.client import EngineClient, LocalClient, Submission, drive
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.engine import Engine
from tokenmill.models.linear import LINEAR_METHODS, Linear
from tokenmill.models.loader import resolve_model_path
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams


@dataclass
class Row:
    engine: str
    PP: int
    TG: int
    B: int
    N_KV: int
    T_PP: float
    S_PP: float
    T_TG: float
    S_TG: float
    T: float
    S: float


Grid = dict[tuple[int, int, int], list[list[int]]]  # (PP, TG, B) -> the B prompts' token ids


@dataclass
class Peers:
    """The engines run beside tokenmill, on the same grid and threads."""

    llama_batched_bench: str | None = None  # the binary
    gguf: Path | None = None  # the file llama.cpp runs
    openvino: Path | None = None  # a folder `optimum-cli export openvino` wrote
    openvino_python: str = sys.executable  # an interpreter with openvino-genai
    transformers: bool = False


def gemm_peak(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of the best linear method this process has for dtype, on a batched MLP shape (2048x576x1536)."""
    x = torch.randn(2048, 576, dtype=dtype)
    weight = torch.randn(1536, 576, dtype=dtype)
    best = 0.0
    for method in (m(weight, None) for m in LINEAR_METHODS if m.supports(weight)):
        for _ in range(3):
            method.apply(x)
        iters, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            method.apply(x)
            iters += 1
        best = max(best, 2 * 2048 * 576 * 1536 * iters / elapsed)
    return best


def flops_per_token(engine: Engine) -> float:
    """2 x the weights of every linear layer, the lm_head included (the embedding is a lookup)."""
    return 2.0 * sum(m.in_features * m.out_features for m in engine.runner.model.modules() if isinstance(m, Linear))


def _random_prompts(rng: random.Random, vocab: int, pp: int, b: int, shared_prompt: bool) -> list[list[int]]:
    shared = [rng.randrange(3, vocab) for _ in range(pp)]
    return [shared if shared_prompt else [rng.randrange(3, vocab) for _ in range(pp)] for _ in range(b)]


def _row(engine: str, pp: int, tg: int, b: int, shared_prompt: bool, t_pp: float, t_tg: float) -> Row:
    """llama-batched-bench's columns from the two phases' times: N_KV counts every sequence's prompt,
    shared or not, and S_PP a shared prompt once."""
    n_kv, prompt_tokens = b * (pp + tg), pp if shared_prompt else b * pp
    return Row(engine, pp, tg, b, n_kv, t_pp, prompt_tokens / t_pp, t_tg, b * tg / t_tg, t_pp + t_tg,
               n_kv / (t_pp + t_tg))


def run_to_completion(client: EngineClient, requests: list[Submission]) -> dict[str, RequestOutput]:
    """Submits the requests together (so that they are scheduled together) and runs them to their
    end; returns each one's final output."""
    with contextlib.closing(drive(client, iter(requests), window=max(1, len(requests)))) as steps:
        return {o.request_id: o for outputs in steps for o in outputs if o.finished}


def lockstep_requests(client: EngineClient, prompts: dict[str, list[int]], params: SamplingParams) -> list[Submission]:
    """The prompt phase of a decode measurement in lockstep, as llama-batched-bench runs it.

    Runs every prompt to its first token, then returns the decode phase's requests: prompt + that
    token under `params`. Submitted together, they find the prompt's full blocks in the prefix
    cache, so their first step is one step for all of them and they decode together from there.
    """
    config, block = client.frontend.config, client.frontend.config.block_size
    first_step = sum(len(p) % block + 1 for p in prompts.values())
    if len(prompts) > config.max_num_seqs or first_step > config.step_tokens("generate"):
        raise ValueError(f"{len(prompts)} sequences, whose first decode step takes {first_step} tokens, do not fit "
                         f"one step: raise max_num_seqs ({config.max_num_seqs}) or max_num_batched_tokens "
                         f"({config.step_tokens('generate')})")
    if not config.enable_prefix_caching:
        raise ValueError("a lockstep decode measurement needs the prefix cache")
    first = run_to_completion(client, [Submission(i + "-pp", None, p, SamplingParams(temperature=0, max_tokens=1))
                                       for i, p in prompts.items()])
    return [Submission(i, None, p + first[i + "-pp"].outputs[0].token_ids, params) for i, p in prompts.items()]


def check_lockstep(client: EngineClient, prompts: dict[str, list[int]], cached: dict[str, int | None],
                   preemptions: int) -> None:
    """Raises unless every sequence found its prompt's full blocks cached and there was no
    preemption since the count `preemptions` was taken (before the decode phase)."""
    block = client.frontend.config.block_size
    if client.metrics().num_preemptions != preemptions or \
            any((cached[i] or 0) < len(p) // block * block for i, p in prompts.items()):
        raise RuntimeError("the sequences did not decode in lockstep (prompt blocks evicted from the prefix cache "
                           "or sequences preempted): raise kv_cache_memory")


def run_point(client: EngineClient, tg: int, prompt_ids: list[list[int]], shared_prompt: bool) -> Row:
    if tg < 1:
        raise ValueError("TG must be at least 1")
    pp, b = len(prompt_ids[0]), len(prompt_ids)
    prompts = {f"bench-{pp}-{tg}-{b}-{i}": p for i, p in enumerate(prompt_ids)}
    # NOTE: as in llama-batched-bench, every prompt is processed before any sequence decodes, so the
    # B sequences decode TG steps in lockstep. (Run as one job, continuous batching would start
    # decoding the first prompts while later ones are still prefilling, and count those tokens as
    # decode throughput at a smaller batch.)
    start = time.perf_counter()
    decode = lockstep_requests(client, prompts, SamplingParams(temperature=0, max_tokens=tg, ignore_eos=True))
    t_pp = time.perf_counter() - start
    preemptions = client.metrics().num_preemptions
    outputs = run_to_completion(client, decode)
    t_tg = time.perf_counter() - start - t_pp
    check_lockstep(client, prompts, {i: o.num_cached_tokens for i, o in outputs.items()}, preemptions)
    return _row("tokenmill", pp, tg, b, shared_prompt, t_pp, t_tg)


def ttft(client: EngineClient, prompt: list[int]) -> float:
    """Seconds from one request's submission to its first token."""
    start = time.perf_counter()
    run_to_completion(client, [Submission(f"ttft-{len(prompt)}", None, prompt,
                                          SamplingParams(temperature=0, max_tokens=1))])
    return time.perf_counter() - start


def run_llamacpp(binary: str, gguf: Path, npp: list[int], ntg: list[int], npl: list[int], shared_prompt: bool,
                 threads: int) -> list[Row]:
    ctx = max(npl) * (max(npp) + max(ntg)) + 64
    args = [binary, "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512", "-t", str(threads),
            "-npp", ",".join(map(str, npp)), "-ntg", ",".join(map(str, ntg)), "-npl", ",".join(map(str, npl)),
            "--output-format", "jsonl"] + (["-pps"] if shared_prompt else [])
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    rows = []
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows.append(Row("llama.cpp", r["pp"], r["tg"], r["pl"], r["n_kv"], r["t_pp"], r["speed_pp"], r["t_tg"],
                            r["speed_tg"], r["t"], r["speed"]))
    return rows


def transformers_model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' own model of a Hugging Face folder or a GGUF file (dequantized), in eval mode."""
    from transformers import AutoModelForCausalLM

    if path.is_file():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


# Each engine first runs this many prompts of this many tokens in one step (tokenmill's: unless max_num_seqs is 1).
WARMUP_PROMPTS, WARMUP_TOKENS = 2, 16


def openvino_spec(folder: Path, threads: int, points: list[tuple[int, int, int]]) -> dict[str, Any]:
    """The peer script's settings (tokenmill/openvino_peer.py says what each is): a KV cache that holds the
    largest point's B * (PP + TG + 1) tokens with a quarter to spare at 2 bytes a value (OpenVINO's CPU
    cache may take fewer), and every prompt phase in one step, the warm-up's too."""
    config = json.loads((folder / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = 2 * 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim
    tokens = max(b * (pp + tg + 1) for pp, tg, b in points)
    return {"model": str(folder), "threads": threads, "cache_gb": max(1, math.ceil(1.25 * tokens * per_token / 1e9)),
            "max_num_seqs": max(WARMUP_PROMPTS, *(b for _, _, b in points)),
            "max_num_batched_tokens": max(WARMUP_PROMPTS * WARMUP_TOKENS, *(b * pp for pp, _, b in points))}


def check_openvino(python: str, folder: Path) -> None:
    """Raises ValueError, before anything is measured, unless the peer can run."""
    if not (folder / "openvino_model.xml").is_file():
        raise ValueError(f"{folder} is not an OpenVINO model folder (no openvino_model.xml): export one with "
                         "benchmarks/export_openvino.py or `optimum-cli export openvino --weight-format int8`")
    found = subprocess.run([python, "-c", "import openvino_genai"], capture_output=True, text=True)
    if found.returncode != 0:
        raise ValueError(f"{python} cannot import openvino_genai: install it in a venv of its own (python3 -m venv "
                         "OVENV && OVENV/bin/pip install openvino-genai) and pass --openvino-python OVENV/bin/python")


def run_openvino(python: str, spec: dict[str, Any], grid: Grid, ttft_prompts: list[list[int]], warmup: list[int],
                 shared_prompt: bool) -> tuple[list[Row], dict[int, float]]:
    """The grid through OpenVINO GenAI on the same token ids: its rows and its TTFT by PP."""
    points = [{"pp": pp, "tg": tg, "b": b, "prompts": prompts} for (pp, tg, b), prompts in grid.items()]
    measured = bench_load.run_measured([python, str(Path(__file__).with_name("openvino_peer.py"))], json.dumps(
        {**spec, "warmup": warmup, "ttft": ttft_prompts, "grid": points}))
    result = json.loads(measured.stdout)
    rows = [_row("openvino", r["pp"], r["tg"], r["b"], shared_prompt, r["t_pp"], r["t_tg"]) for r in result["rows"]]
    return rows, {len(p): t for p, t in zip(ttft_prompts, result["ttft_s"])}


def run_transformers(engine: Engine, grid: Grid, shared_prompt: bool) -> list[Row]:
    """The same grid through `transformers` generate (greedy, same weights and dtype, same threads):
    T_PP is a generate call of one new token, T_TG what one of TG + 1 new tokens takes beyond it."""
    model = transformers_model(engine.model_path, engine.dtype)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(ids: torch.Tensor, new_tokens: int) -> float:
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        return time.perf_counter() - start

    rows = []
    with torch.inference_mode():
        generate(torch.tensor([[1, 2, 3, 4]]), 2)  # warm-up
        for (pp, tg, b), prompts in grid.items():
            ids = torch.tensor(prompts)
            t_pp = generate(ids, 1)
            rows.append(_row("transformers", pp, tg, b, shared_prompt, t_pp, generate(ids, tg + 1) - t_pp))
    return rows


def markdown(rows: list[Row], share: dict[tuple[int, int, int], float]) -> str:
    lines = ["| engine | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s | TG % of peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pct = share.get((r.PP, r.TG, r.B)) if r.engine == "tokenmill" else None
        lines.append(f"| {r.engine} | {r.PP} | {r.TG} | {r.B} | {r.N_KV} | {r.T_PP:.3f} | {r.S_PP:.1f} | "
                     f"{r.T_TG:.3f} | {r.S_TG:.1f} | {r.T:.3f} | {r.S:.1f} | "
                     f"{'' if pct is None else f'{pct:.1%}'} |")
    return "\n".join(lines)


def ratios(rows: list[Row], peer: str) -> str:
    ours = {(r.PP, r.TG, r.B): r for r in rows if r.engine == "tokenmill"}
    theirs = {(r.PP, r.TG, r.B): r for r in rows if r.engine == peer}
    lines = ["| PP | TG | B | S_PP ratio | S_TG ratio | S ratio |", "|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(ours.keys() & theirs.keys()):
        a, b = ours[key], theirs[key]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {a.S_PP / b.S_PP:.2f}x | {a.S_TG / b.S_TG:.2f}x | "
                     f"{a.S / b.S:.2f}x |")
    return "\n".join(lines)


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'tokenmill[bench]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(rows: list[Row], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for engine in sorted({r.engine for r in rows}):
        for pp in sorted({r.PP for r in rows}):
            points = sorted((r.B, r.S_TG) for r in rows if r.engine == engine and r.PP == pp)
            ax.plot(*zip(*points), marker="o", label=f"{engine}, PP={pp}")
    ax.set_xlabel("parallel sequences (B)")
    ax.set_ylabel("generated tokens/s (S_TG)")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure_loads(config: EngineConfig, npp: list[int], threads: int, peers: Peers,
                  ov_spec: dict[str, Any]) -> list[bench_load.Load]:
    """Every engine's start, in fresh processes, before this process maps any model file (see bench_load).
    The probe's prompt takes ids below 259, which every vocabulary has: the grid's need the model's size."""
    rng = random.Random(1)
    prompt = [rng.randrange(3, 259) for _ in range(npp[0])]
    loads = [bench_load.tokenmill_load(config, resolve_model_path(config.model), threads, prompt)]
    if peers.llama_batched_bench is not None and peers.gguf is not None:
        loads.append(bench_load.llamacpp_load(peers.llama_batched_bench, peers.gguf, threads, npp[0]))
    if peers.openvino is not None:
        loads.append(bench_load.openvino_load(peers.openvino_python, peers.openvino, ov_spec, prompt))
    return loads


def batched(config: EngineConfig, npp: list[int], ntg: list[int], npl: list[int], shared_prompt: bool, threads: int,
            peers: Peers, load: bool, jsonl: Path | None, plot_path: Path | None) -> str:
    """Builds the engine and runs the grid through it and the peers; with `load`, the load table too."""
    if peers.llama_batched_bench is not None and peers.gguf is None:
        raise ValueError("llama.cpp runs a GGUF file: pass --gguf, or a .gguf --model")
    if peers.openvino is not None:
        check_openvino(peers.openvino_python, peers.openvino)
    points = [(pp, tg, b) for pp in npp for tg in ntg for b in npl]
    ov_spec = openvino_spec(peers.openvino, threads, points) if peers.openvino is not None else {}
    loads = measure_loads(config, npp, threads, peers, ov_spec) if load else []
    engine = Engine(config)
    client = LocalClient(engine)
    rng, vocab = random.Random(0), client.frontend.vocab_size
    warmup = _random_prompts(rng, vocab, WARMUP_TOKENS, min(WARMUP_PROMPTS, config.max_num_seqs), shared_prompt)
    grid = {(pp, tg, b): _random_prompts(rng, vocab, pp, b, shared_prompt) for pp, tg, b in points}
    ttft_prompts = [[rng.randrange(3, vocab) for _ in range(pp)] for pp in npp]
    run_point(client, 4, warmup, shared_prompt)
    rows = [run_point(client, tg, prompts, shared_prompt) for (_, tg, _), prompts in grid.items()]
    by_engine = {load.engine: load for load in loads}
    if loads:
        by_engine["tokenmill"].ttft = {len(p): ttft(client, p) for p in ttft_prompts}
    peak = gemm_peak(engine.dtype)
    per_token = flops_per_token(engine)
    share = {(r.PP, r.TG, r.B): r.S_TG * per_token / peak for r in rows}
    if peers.llama_batched_bench is not None and peers.gguf is not None:
        rows += run_llamacpp(peers.llama_batched_bench, peers.gguf, npp, ntg, npl, shared_prompt, threads)
        if loads:  # one request of PP tokens: T_PP at B = 1
            by_engine["llama.cpp"].ttft = {r.PP: r.T_PP for r in run_llamacpp(
                peers.llama_batched_bench, peers.gguf, npp, [1], [1], False, threads)}
    if peers.openvino is not None:
        ov_rows, ov_ttft = run_openvino(peers.openvino_python, ov_spec, grid, ttft_prompts, warmup[0], shared_prompt)
        rows += ov_rows
        if loads:
            by_engine["openvino"].ttft = ov_ttft
    if peers.transformers:
        rows += run_transformers(engine, grid, shared_prompt)
    out = [f"model {client.frontend.model_name}, dtype {str(engine.dtype).removeprefix('torch.')}, {threads} threads, "
           f"{'shared prompt (pps), ' if shared_prompt else ''}GEMM peak {peak / 1e9:.0f} GFLOP/s, "
           f"{per_token / 1e6:.0f} MFLOP/token", "", markdown(rows, share)]
    for peer in ("llama.cpp", "openvino", "transformers"):
        if any(r.engine == peer for r in rows):
            out += ["", f"tokenmill / {peer}:", "", ratios(rows, peer)]
    if loads:
        out += ["", "load (tokenmill/bench_load.py says how each figure is measured):", "",
                bench_load.markdown(loads, npp[0])]
    if jsonl is not None:
        jsonl.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows))
    if plot_path is not None:
        plot(rows, plot_path)
    return "\n".join(out)


def job(engine: Engine, input_path: Path, output: Path, plot_path: Path | None = None) -> dict[str, Any]:
    """The job's summary (its thin-batch time and share: the tail); with plot_path, a PNG of the
    running sequences and output tokens/s over the job's time, sampled every TIMELINE_SECONDS."""
    from tokenmill.batch.runner import BatchJob

    timeline: list[tuple[float, int, int]] = []  # seconds, sequences running, tokens generated so far
    finished = threading.Event()

    def sample() -> None:
        start = time.perf_counter()
        while not finished.wait(TIMELINE_SECONDS):
            metrics = engine.metrics()
            timeline.append((time.perf_counter() - start, metrics.sequences_running, metrics.stats.generated_tokens))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = BatchJob(LocalClient(engine), input_path, output, use_tqdm=False).run(overwrite=True)
    finally:
        finished.set()
        sampler.join()
    if plot_path is not None:
        plot_timeline(timeline, engine.config.max_num_seqs, summary.thin_batch_share or 0.0, plot_path)
    return asdict(summary)


TIMELINE_SECONDS = 0.5


def plot_timeline(timeline: list[tuple[float, int, int]], max_num_seqs: int, thin_share: float, path: Path) -> None:
    plt = pyplot()
    seconds = [t for t, _, _ in timeline]
    rates = [(b[2] - a[2]) / (b[0] - a[0]) for a, b in zip([(0.0, 0, 0), *timeline], timeline)]
    fig, running_axis = plt.subplots(figsize=(8, 4))
    running_axis.plot(seconds, [r for _, r, _ in timeline], color="tab:blue", label="sequences running")
    running_axis.axhline(max_num_seqs / 2, color="tab:blue", linestyle=":", label="half of max_num_seqs")
    running_axis.set_xlabel("seconds into the job")
    running_axis.set_ylabel("sequences running")
    rate_axis = running_axis.twinx()
    rate_axis.plot(seconds, rates, color="tab:orange", alpha=0.8, label="output tokens/s")
    rate_axis.set_ylabel("output tokens/s")
    running_axis.set_title(f"thin batch (under half, none waiting): {thin_share:.0%} of the job")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
