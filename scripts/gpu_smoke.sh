#!/usr/bin/env bash
# First contact with a CUDA machine: the engines/ layer (DeepSpeed learner steps at ZeRO 0/2/3 in
# bf16, ZeRO-3 sharded loading, scoring passes, the weight-sync receiver, the CUDA IPC hand-over
# between two processes, the bf16 parity gap) on one GPU, without Ray or vLLM; then, where Ray and
# vLLM are installed, three PPO iterations of configs/gpu_smoke_ppo.yaml with the colocated engine
# and, with 2+ GPUs, with an engine on its own GPU over NCCL. Prints one JSON line per check; exits
# non-zero on any failure. About a minute for the first part. See docs/deploy.md, "GPU smoke test".
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
timeout 600 "$PY" -m rlhf_ray.engines.smoke --device cuda "$@"

# A cluster node (Ray and vLLM installed): a few PPO iterations through the whole system, the
# colocated engine on one GPU, then with 2+ GPUs an engine on its own GPU over NCCL.
if ! "$PY" -c "import ray, vllm" 2>/dev/null; then
  echo '{"check": "ppo", "skipped": "Ray or vLLM is not installed: the engines/ layer above is what this machine can prove"}'
  exit 0
fi
runs=${GPU_SMOKE_RUNS:-$(mktemp -d)}
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
modes=("colocated rollout.colocate=true")
if [ "$gpus" -ge 2 ]; then
  modes+=("nccl rollout.colocate=false rollout.num_gpus=1")
fi
for mode in "${modes[@]}"; do
  set -- $mode
  name=$1; shift
  timeout 900 "$PY" -m rlhf_ray.cli ppo --config configs/gpu_smoke_ppo.yaml "run_dir=$runs/$name" "$@"
  echo "{\"check\": \"ppo_$name\", \"ok\": true, \"metrics\": \"$runs/$name/metrics.jsonl\"}"
done
