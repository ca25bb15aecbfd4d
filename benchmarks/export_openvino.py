"""Exports a GGUF file to an OpenVINO model folder with int8 weights, for `tokenmill bench batched --openvino`.

    .venv/bin/python benchmarks/export_openvino.py MODEL.gguf OUTDIR [--optimum-cli /work/ovenv/bin/optimum-cli]

Two steps: `transformers` (this interpreter, which needs `gguf`) dequantizes the GGUF into an HF folder
(bf16 safetensors, tokenizer, chat template) in OUTDIR/hf; then `optimum-cli export openvino --weight-format
int8 --task text-generation-with-past` (optimum-intel, which should live in its own venv: its packages are
not tokenmill's) writes the OpenVINO IR and tokenizer models into OUTDIR. OpenVINO then runs on weights
requantized from the GGUF's, not on the GGUF's own blocks: int8 per output channel, asymmetric, as
`--weight-format int8` makes them. OUTDIR/hf may be deleted afterwards. Never commit the folders it writes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig


def gguf_to_hf(gguf: Path, folder: Path) -> None:
    """Writes the GGUF's model, dequantized to bf16, and its tokenizer as an HF folder."""
    # NOTE: dequantize=True, since a model whose weights transformers keeps in GGUF blocks cannot be saved.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(folder)
    del model  # frees the dequantized copy before the export loads the folder
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--optimum-cli", default=shutil.which("optimum-cli") or "/work/ovenv/bin/optimum-cli",
                        help="optimum-intel's optimum-cli (default: the one on PATH, else %(default)s)")
    args = parser.parse_args()
    if not args.gguf.is_file():
        raise SystemExit(f"no such GGUF file: {args.gguf}")
    if not Path(args.optimum_cli).is_file():
        raise SystemExit(f"no optimum-cli at {args.optimum_cli}: python3 -m venv /work/ovenv && "
                         "/work/ovenv/bin/pip install openvino-genai 'optimum-intel[openvino]'")
    hf = args.outdir / "hf"
    gguf_to_hf(args.gguf, hf)
    subprocess.run([args.optimum_cli, "export", "openvino", "-m", str(hf), "--task", "text-generation-with-past",
                    "--weight-format", "int8", str(args.outdir)], check=True)
    size = sum(f.stat().st_size for f in args.outdir.glob("openvino_model.*"))
    print(f"wrote {args.outdir} (openvino_model.xml/.bin: {size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
