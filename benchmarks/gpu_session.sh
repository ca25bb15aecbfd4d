#!/usr/bin/env bash
# Issue 19's checks on a lent GPU (an H200 through the `device` tool), prepared here so that one run does them all:
# a session is lent 15 minutes of device time at most, start included.
#
#   bash benchmarks/gpu_session.sh prepare   # here: the wheels the GPU image lacks and SmolLM2's tokenizer, in .gpu/
#   device run: command "bash benchmarks/gpu_session.sh run", carry [".gpu"], timeout_s 540
#
# `run` installs the wheels, runs the gpu-marked tests (token-exact against transformers on the same GPU, fp32), builds
# the issue's 1B-shaped model from a config there and runs `tokenmill bench batched --device cuda --transformers` on
# it. Its logs and tables land in $OUT (tests.log, bench.md), which the device tool brings back.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
case "${1:-}" in
prepare)
  grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
  rm -rf .gpu && mkdir -p .gpu/wheels .gpu/tokenizer
  .venv/bin/python -c 'from transformers import AutoTokenizer
from tokenmill.models.loader import default_model_path
path = default_model_path()
AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(".gpu/tokenizer")' || exit 1
  # The image has torch, transformers, tokenizers, Triton, pytest, httpx and the like (the device tool's KINDS.md);
  # these are what importing tokenmill, its benchmark and its test fixtures needs beyond them.
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels gguf xgrammar apache-tvm-ffi pydantic pydantic-core annotated-types typing-inspection \
    typing-extensions \
    || exit 1
  du -sh .gpu ;;
run)
  out=${OUT:-/tmp/gpu-session}
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$root" PYTHONUNBUFFERED=1 TOKENMILL_TEST_TOKENIZER="$root/.gpu/tokenizer"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_device.py tests/test_triton_attention.py \
    2>&1 | tee "$out/tests.log"
  python3 benchmarks/make_hf_model.py /tmp/m1b --shape 1b --tokenizer .gpu/tokenizer
  timeout 300 python3 -m tokenmill.cli bench batched --model /tmp/m1b --device cuda --transformers --npp 128 \
    --ntg 128 --npl 1,64,256,1024 --max-num-seqs 1024 --speculative off 2>&1 | tee "$out/bench.md" ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2 ;;
esac
