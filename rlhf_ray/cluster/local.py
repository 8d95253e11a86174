"""A local multi-node Ray cluster from ``ray start`` processes, shaped like the KubeRay one.

* ``head``: ``--num-cpus 0 --num-gpus 0`` and no custom resources: the driver runs there, no
  actor lands on it (KubeRay's head convention, k8s/base/raycluster.yaml).
* ``rollout-<i>``: ``{"rollout": 100}``; ``learner-<i>``: ``{"learner": 100}``, the worker
  groups' labels (labels, not capacities: each node's ``num_cpus`` bounds what it holds).

Every node is its own ``ray start --block`` process (own process group, own ``--temp-dir``,
which Ray 2.60 takes per node, and its own ports), started detached, so ``up`` returns and
``down`` works from any other process: pids, addresses, temp dirs and the namespaces are kept
in a JSON state file. ``down`` signals only those process groups, then kills anything still
naming the cluster's root directory or running in its namespaces; it never runs ``ray stop``.

Network: ``"netns"`` puts each node in its own network namespace with its own address
(rlhf_ray.cluster.netns; root only), ``"loopback"`` runs every node on 127.0.0.1 with distinct
ports, ``"auto"`` takes namespaces where they can be made.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf_ray.cluster import netns
from rlhf_ray.sync.group import free_ports

ROLE_RESOURCES = {"rollout": {"rollout": 100}, "learner": {"learner": 100}}  # the KubeRay groups' labels
DEFAULT_STATE = Path(os.environ.get("RLHF_RAY_CLUSTER_STATE", Path.home() / ".rlhf-ray" / "cluster.json"))
# Passed from the caller's environment to every node (and so to every actor), when set.
NODE_ENV_KEYS = ("DS_ACCELERATOR", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM",
                 "RAY_DEDUP_LOGS", "HF_HOME", "HF_TOKEN", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")


@dataclass
class NodeState:
    name: str  # head, rollout-0, learner-0, ...
    group: str  # head | rollout | learner
    ip: str
    pid: int  # the `ray start --block` process, leader of its own process group
    temp_dir: str
    log: str
    num_cpus: float
    resources: dict[str, float]
    netns: str | None = None


@dataclass
class ClusterState:
    cluster_id: str
    root: str  # every node's temp dir, logs and the auth token live under it
    mode: str  # netns | loopback
    gcs_address: str  # ip:port, for `ray_address=` and `ray start --address`
    dashboard: str  # http://ip:port, for the Job Submission API (launch/submit.py)
    client_env: dict[str, str]  # what a client needs on top of its environment (auth, RAY_ADDRESS)
    nodes: list[NodeState] = field(default_factory=list)
    network: dict | None = None  # netns.Network as a dict

    @property
    def head(self) -> NodeState:
        return self.nodes[0]

    def exec_prefix(self) -> list[str]:
        """Prefix that runs a command on the head node (in its namespace): drivers go there."""
        return ["ip", "netns", "exec", self.head.netns] if self.head.netns else []

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClusterState:
        d = json.loads(text)
        d["nodes"] = [NodeState(**n) for n in d["nodes"]]
        return cls(**d)


def auth_env(auth: str, directory: str | Path) -> tuple[dict[str, str], str | None]:
    """Client environment for Ray's auth mode; in token mode a fresh token is written (0600) into
    ``directory`` and returned."""
    env = {"RAY_AUTH_MODE": auth}
    if auth != "token":
        return env, None
    token_path = Path(directory) / "auth_token"
    token = secrets.token_hex(32)
    token_path.write_text(token)
    token_path.chmod(0o600)
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    return env, token


def read_state(path: str | Path = DEFAULT_STATE) -> ClusterState:
    return ClusterState.from_json(Path(path).read_text())


def _tail(path: str | Path, n: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _ray_bin() -> str:
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


def _node_ports() -> list[str]:
    # Ports Ray would otherwise take at fixed defaults; picked free so that nodes sharing one
    # network (loopback) never collide. Worker ports 0 = any free port.
    names = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
    ports = free_ports(len(names))
    return [w for name, port in zip(names, ports, strict=True) for w in (name, str(port))] + [
        "--min-worker-port", "0", "--max-worker-port", "0"]


def _spawn(cmd: list[str], env: dict[str, str], log: Path, ns: str | None) -> subprocess.Popen:
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]  # exec's the command: the pid stays ray start's
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)


def _http_ok(url: str, token: str | None) -> bool:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise RuntimeError(f"Ray dashboard at {url} refused the token ({e.code})") from None
        return False
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _alive_nodes(dashboard: str, token: str | None) -> list[dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"{dashboard}/api/v0/nodes?limit=1000&detail=1", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            rows = json.loads(r.read())["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return []
    return [row for row in rows if row.get("state") == "ALIVE"]


def up(rollout_nodes: int = 1, learner_nodes: int = 1, *, rollout_cpus: int = 2, learner_cpus: int = 4,
       network: str = "auto", state_path: str | Path = DEFAULT_STATE, auth: str | None = None,
       object_store_mb: int = 200, env: dict[str, str] | None = None, timeout: float = 180.0,
       log=print) -> ClusterState:
    """Starts the head and the worker nodes, waits until Ray sees every node alive, writes the
    state file and returns the state. On failure everything started is torn down again."""
    state_path = Path(state_path)
    if state_path.exists():
        raise RuntimeError(f"a cluster state file exists at {state_path}: run `rlhf-ray cluster down` first "
                           f"(or pass another --state)")
    if rollout_nodes < 0 or learner_nodes < 0 or rollout_nodes + learner_nodes == 0:
        raise ValueError("ask for at least one rollout or learner node")
    cluster_id = secrets.token_hex(3)
    root = tempfile.mkdtemp(prefix=f"rlc-{cluster_id}-", dir="/tmp")  # short: Ray's socket paths
    names = ["head"] + [f"rollout-{i}" for i in range(rollout_nodes)] + [f"learner-{i}" for i in range(learner_nodes)]

    net = None
    if network in ("auto", "netns"):
        try:
            net = netns.create(cluster_id, names)
        except netns.NetnsUnavailable as e:
            if network == "netns":
                shutil.rmtree(root, ignore_errors=True)
                raise
            log(f"cluster: network namespaces unavailable ({e}); all nodes on loopback")
    elif network != "loopback":
        raise ValueError(f"network must be auto, netns or loopback, not {network!r}")

    auth = (auth or os.environ.get("RAY_AUTH_MODE") or "token").lower()
    client_env, token = auth_env(auth, root)
    ray_bin = _ray_bin()
    node_env = {k: os.environ[k] for k in os.environ if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    node_env.update(client_env)
    node_env["PATH"] = f"{Path(ray_bin).parent}{os.pathsep}{node_env.get('PATH', '')}"  # jobs run this Python
    node_env.setdefault("PYTHONUNBUFFERED", "1")
    if net is not None:
        # gloo (weight sync, DeepSpeed on CPU) picks its interface by hostname otherwise, which
        # resolves to no address inside a namespace and falls back to loopback.
        node_env.setdefault("GLOO_SOCKET_IFNAME", netns.IFNAME)
    node_env.update(env or {})

    state = ClusterState(cluster_id=cluster_id, root=root, mode="netns" if net else "loopback", gcs_address="",
                         dashboard="", client_env=client_env, network=net.to_dict() if net else None)
    procs: list[subprocess.Popen] = []

    def start(name: str, group: str, cpus: float, resources: dict, extra: list[str]) -> None:
        ip = net.addresses[name] if net else "127.0.0.1"
        ns = net.namespaces[name] if net else None
        temp_dir = os.path.join(root, name)
        os.makedirs(temp_dir)
        log_path = os.path.join(root, f"{name}.log")
        cmd = [ray_bin, "start", "--block", "--node-ip-address", ip, "--num-cpus", str(int(cpus)), "--num-gpus", "0",
               "--temp-dir", temp_dir, "--object-store-memory", str(object_store_mb << 20),
               "--disable-usage-stats", *_node_ports(), *extra]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        procs.append(_spawn(cmd, node_env, Path(log_path), ns))
        state.nodes.append(NodeState(name, group, ip, procs[-1].pid, temp_dir, log_path, cpus, resources, ns))

    try:
        gcs_port, dash_port, client_port = free_ports(3)
        head_ip = net.addresses["head"] if net else "127.0.0.1"
        start("head", "head", 0, {}, ["--head", "--port", str(gcs_port), "--dashboard-host", head_ip,
                                      "--dashboard-port", str(dash_port), "--include-dashboard", "true",
                                      "--ray-client-server-port", str(client_port)])
        state.gcs_address = f"{head_ip}:{gcs_port}"
        state.dashboard = f"http://{head_ip}:{dash_port}"
        state.client_env["RAY_ADDRESS"] = state.gcs_address
        _write_state(state_path, state)  # from here on `down` can clean up whatever happens
        deadline = time.monotonic() + timeout
        while not _http_ok(f"{state.dashboard}/api/version", token):
            _check_running(procs, state)
            if time.monotonic() > deadline:
                raise TimeoutError(f"head not up after {timeout:.0f}s:\n{_tail(state.head.log)}")
            time.sleep(0.5)
        log(f"cluster: head up at {state.gcs_address}, dashboard {state.dashboard}")
        for name in names[1:]:
            group = name.rsplit("-", 1)[0]
            start(name, group, rollout_cpus if group == "rollout" else learner_cpus, ROLE_RESOURCES[group],
                  ["--address", state.gcs_address])
        _write_state(state_path, state)
        while True:
            _check_running(procs, state)
            alive = _alive_nodes(state.dashboard, token)
            if len(alive) >= len(names):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} of {len(names)} nodes alive after {timeout:.0f}s")
            time.sleep(1)
    except BaseException:
        down(state_path, log=lambda *_: None) if state_path.exists() else _teardown(state, log=lambda *_: None)
        raise
    log(f"cluster: {len(names)} nodes up ({state.mode}): "
        + ", ".join(f"{n.name} {n.ip}" for n in state.nodes) + f"; state {state_path}")
    return state


def _check_running(procs: list[subprocess.Popen], state: ClusterState) -> None:
    for proc, node in zip(procs, state.nodes):
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start` of {node.name} exited with {proc.returncode}:\n{_tail(node.log)}")


def _write_state(path: Path, state: ClusterState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ours(pid: int, root: str) -> bool:
    """The pid is still the ``ray start`` we started (not a reused pid): its command names our root."""
    return root in _cmdline(pid)


def processes_of(root: str) -> list[int]:
    """Every live process whose command line names the cluster's root directory (nodes' Ray
    processes and workers carry their temp dir, which lies under it)."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me and root in _cmdline(int(entry)):
            pids.append(int(entry))
    return pids


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in pids if running(p)]
        if not pids:
            return
        time.sleep(0.3)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a stopped node whose parent has not reaped it)."""
    return os.path.exists(f"/proc/{pid}") and not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _teardown(state: ClusterState, grace: float = 15.0, log=print) -> list[str]:
    # Workers first, the head last (a worker losing its head waits for it, not the reverse).
    nodes = [n for n in state.nodes if n.group != "head"] + [n for n in state.nodes if n.group == "head"]
    started = [n for n in nodes if _ours(n.pid, state.root)]
    for node in started:  # `ray start --block` stops the processes it started on SIGTERM
        _signal_group(node.pid, signal.SIGTERM)
    _wait_gone([n.pid for n in started], grace)
    for node in started:  # anything left in their process groups
        _signal_group(node.pid, signal.SIGKILL)
    _wait_gone([n.pid for n in started], 5)
    for pid in processes_of(state.root):  # workers that left the group but carry our temp dir
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    problems = netns.destroy(netns.Network.from_dict(state.network)) if state.network else []
    _wait_gone(processes_of(state.root), 5)
    left = processes_of(state.root)
    if left:
        problems.append(f"processes still running: {left}")
    shutil.rmtree(state.root, ignore_errors=True)
    log(f"cluster: {len(started)} node(s) stopped, {state.root} removed"
        + (f", namespaces of {state.cluster_id} removed" if state.network else ""))
    return problems


def down(state_path: str | Path = DEFAULT_STATE, grace: float = 15.0, log=print) -> list[str]:
    """Stops what ``up`` started (by the state file) and removes the state file. Returns problems."""
    state_path = Path(state_path)
    state = read_state(state_path)
    problems = _teardown(state, grace, log)
    state_path.unlink(missing_ok=True)
    return problems


def status(state_path: str | Path = DEFAULT_STATE) -> dict:
    state = read_state(state_path)
    token_path = state.client_env.get("RAY_AUTH_TOKEN_PATH")
    token = Path(token_path).read_text().strip() if token_path and Path(token_path).exists() else None
    alive = _alive_nodes(state.dashboard, token)
    return {"state": asdict(state), "alive_nodes": [{"node_id": a.get("node_id"), "ip": a.get("node_ip"),
                                                     "resources": a.get("resources_total")} for a in alive]}
