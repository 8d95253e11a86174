"""``rlhf-ray cluster up|down|status|exec|add|remove|dashboard``: a local multi-node Ray cluster
for laptops and tests.

Hook into rlhf_ray/cli.py (two lines, next to the studio commands)::

    from rlhf_ray.cluster.cli import add_cluster_commands   # in _parser(), then add_cluster_commands(sub)
    if args.command == "cluster": return run_cluster_command(args)   # first thing in main()

Imports nothing heavy (no Ray, torch or vLLM) until a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys


def add_cluster_commands(subparsers) -> None:
    from rlhf_ray.cluster.local import DEFAULT_STATE

    cluster = subparsers.add_parser("cluster", help="a local multi-node Ray cluster (up, down, status, exec, add, "
                                                    "remove)")
    sub = cluster.add_subparsers(dest="cluster_action", required=True)

    def with_state(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state", default=str(DEFAULT_STATE),
                       help=f"state file (default $RLHF_RAY_CLUSTER_STATE or {DEFAULT_STATE})")

    up = sub.add_parser("up", help="start a head (no work of its own), rollout nodes and learner nodes")
    up.add_argument("--rollout-nodes", type=int, default=1, help="nodes with the `rollout` resource (default 1)")
    up.add_argument("--learner-nodes", type=int, default=1, help="nodes with the `learner` resource (default 1)")
    up.add_argument("--rollout-cpus", type=int, default=2, help="logical CPUs per rollout node (default 2)")
    up.add_argument("--learner-cpus", type=int, default=4, help="logical CPUs per learner node (default 4)")
    up.add_argument("--network", choices=("auto", "netns", "loopback"), default="auto",
                    help="netns: a network namespace and address per node (root); loopback: all on "
                         "127.0.0.1; auto (default): namespaces where they can be made")
    up.add_argument("--object-store-mb", type=int, default=200, help="object store per node (default 200)")
    up.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env for every node")
    up.add_argument("--timeout", type=float, default=180, help="seconds to wait for every node (default 180)")
    with_state(up)
    down = sub.add_parser("down", help="stop what `cluster up` started (by its state file)")
    with_state(down)
    st = sub.add_parser("status", help="the state file, the nodes Ray sees alive and where actors run, as JSON")
    with_state(st)
    add = sub.add_parser("add", help="one more worker node joins the running cluster (a worker group scaling up)")
    add.add_argument("--group", choices=("rollout", "learner"), default="rollout", help="its group (default rollout)")
    add.add_argument("--cpus", type=int, default=None,
                     help="its logical CPUs (default: 2 for rollout, 4 for learner, as `up`)")
    with_state(add)
    rm = sub.add_parser("remove", help="take a worker node away: drain it (`ray drain-node`, preemption) and stop "
                                       "it once idle or at the deadline, or kill its raylet outright")
    rm.add_argument("node", help="the node's name, e.g. rollout-1 (`cluster status` lists them)")
    rm.add_argument("--kill", action="store_true", help="no drain: kill its raylet, as when a machine dies")
    rm.add_argument("--deadline", type=int, default=120, help="seconds the drain may take (default 120)")
    with_state(rm)
    dash = sub.add_parser("dashboard", help="serve the head's Ray dashboard on 127.0.0.1 (like kubectl port-forward)")
    dash.add_argument("--port", type=int, default=8265, help="local port (default 8265)")
    with_state(dash)
    ex = sub.add_parser("exec", help="run a command on the head node (its namespace) with RAY_ADDRESS and "
                                     "auth set, e.g. `rlhf-ray cluster exec -- rlhf-ray ppo --config F "
                                     "ray_address=auto`")
    with_state(ex)
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")


def run_cluster_command(args: argparse.Namespace) -> int:
    from rlhf_ray.cluster import local

    action = args.cluster_action
    try:
        if action == "up":
            env = {}
            for item in args.env:
                key, sep, value = item.partition("=")
                if not sep or not key:
                    print(f"rlhf-ray cluster up: --env {item!r} must look like KEY=VALUE", file=sys.stderr)
                    return 2
                env[key] = value
            state = local.up(args.rollout_nodes, args.learner_nodes, rollout_cpus=args.rollout_cpus,
                             learner_cpus=args.learner_cpus, network=args.network, state_path=args.state,
                             object_store_mb=args.object_store_mb, env=env, timeout=args.timeout)
            exports = " ".join(f"{k}={v}" for k, v in state.client_env.items())
            print(f"cluster: submit jobs with `{exports} python launch/submit.py --address {state.dashboard} ...`")
            print(f"cluster: or run a driver on the head: `rlhf-ray cluster exec -- rlhf-ray ppo --config F "
                  f"ray_address=auto` (state {args.state})")
            print("cluster: `rlhf-ray cluster dashboard` serves the dashboard on http://127.0.0.1:8265")
            return 0
        if action == "down":
            problems = local.down(args.state)
            for p in problems:
                print(f"cluster down: {p}", file=sys.stderr)
            return 1 if problems else 0
        if action == "status":
            print(json.dumps(local.status(args.state), indent=2))
            return 0
        if action == "add":
            cpus = args.cpus if args.cpus is not None else (2 if args.group == "rollout" else 4)
            local.add_node(args.group, cpus, args.state)
            return 0
        if action == "remove":
            local.remove_node(args.node, args.state, drain=not args.kill, deadline_s=args.deadline)
            return 0
        if action == "dashboard":
            with contextlib.suppress(KeyboardInterrupt):
                local.forward_dashboard(local.read_state(args.state), args.port)
            return 0
        if action == "exec":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                print("rlhf-ray cluster exec: give the command after --", file=sys.stderr)
                return 2
            state = local.read_state(args.state)
            env = {**os.environ, **state.client_env}
            if state.mode == "netns":
                env.setdefault("GLOO_SOCKET_IFNAME", "eth0")
            full = [*state.exec_prefix(), *cmd]
            os.execvpe(full[0], full, env)
    except FileNotFoundError as e:
        print(f"rlhf-ray cluster {action}: no cluster state ({e.filename}); is a cluster up?", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError, ValueError) as e:
        print(f"rlhf-ray cluster {action}: {e}", file=sys.stderr)
        return 1
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-ray")
    add_cluster_commands(parser.add_subparsers(dest="command", required=True))
    return run_cluster_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
