#!/usr/bin/env bash
# First contact with a CUDA machine: the engines/ layer (DeepSpeed learner steps at ZeRO 0/2/3 in
# bf16, ZeRO-3 sharded loading, scoring passes, the weight-sync receiver, the bf16 parity gap) on
# one GPU, in one process, without Ray or vLLM. Prints one JSON line per check; exits 1 on any
# failure. About a minute on one GPU. See docs/deploy.md, "GPU smoke test".
#
#   scripts/gpu_smoke.sh [--hidden 512 --layers 8 --steps 5]
#
# Needs torch with CUDA, transformers, peft and DeepSpeed. A machine without network takes
# DeepSpeed (pure Python) and its small dependencies from wheels/ when they are there
# (`pip wheel deepspeed hjson py-cpuinfo ninja msgpack --no-deps -w wheels/` on a machine that has
# a network).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import deepspeed" 2>/dev/null && compgen -G "wheels/*.whl" >/dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 600 "$PY" -m rlhf_ray.engines.smoke --device cuda "$@"
