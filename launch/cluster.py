#!/usr/bin/env python3
"""Bring a local multi-node Ray cluster up or down (the same as ``rlhf-ray cluster ...``).

    .venv/bin/python launch/cluster.py up --rollout-nodes 2 --learner-nodes 1
    .venv/bin/python launch/cluster.py exec -- .venv/bin/python -m rlhf_ray.cli ppo \
        --config configs/cpu_smoke_ppo.yaml ray_address=auto
    .venv/bin/python launch/cluster.py down

A head with no work of its own (num-cpus 0), rollout nodes with the ``rollout`` resource and
learner nodes with the ``learner`` resource, like the KubeRay worker groups; as root, each node in
its own network namespace with its own address. See docs/deploy.md, "laptop route".
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rlhf_ray.cluster.cli import main

if __name__ == "__main__":
    sys.exit(main(["cluster", *sys.argv[1:]]))
