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

import fcntl
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf_ray.cluster import netns
from rlhf_ray.ports import free_ports

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
    node_env: dict[str, str] = field(default_factory=dict)  # `up --env` extras, for nodes added later too
    object_store_mb: int = 200  # per node

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


def _node_env(client_env: dict[str, str], namespaces: bool, extra: dict[str, str]) -> dict[str, str]:
    """A node's environment: the caller's (less its Ray address and token), the cluster's auth, this
    Python's bin first on PATH (jobs run this Python), then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(client_env)
    env["PATH"] = f"{Path(_ray_bin()).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if namespaces:
        # gloo (weight sync, DeepSpeed on CPU) picks its interface by hostname otherwise, which
        # resolves to no address inside a namespace and falls back to loopback.
        env.setdefault("GLOO_SOCKET_IFNAME", netns.IFNAME)
    env.update(extra)
    return env


def _start_node(state: ClusterState, name: str, group: str, cpus: float, resources: dict,
                extra_args: list[str]) -> subprocess.Popen:
    """``ray start --block`` for one node (in its namespace, if the cluster has them); records it in
    ``state``. ``--node-name`` is the node's name, so Ray's node table names it too."""
    net = netns.Network.from_dict(state.network) if state.network else None
    ip = net.addresses[name] if net else "127.0.0.1"
    ns = net.namespaces[name] if net else None
    temp_dir = os.path.join(state.root, name)
    os.makedirs(temp_dir)
    log_path = os.path.join(state.root, f"{name}.log")
    cmd = [_ray_bin(), "start", "--block", "--node-ip-address", ip, "--node-name", name, "--num-cpus",
           str(int(cpus)), "--num-gpus", "0", "--temp-dir", temp_dir, "--object-store-memory",
           str(state.object_store_mb << 20), "--disable-usage-stats", *_node_ports(), *extra_args]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    env = _node_env({k: v for k, v in state.client_env.items() if k != "RAY_ADDRESS"}, net is not None,
                    state.node_env)
    proc = _spawn(cmd, env, Path(log_path), ns)
    state.nodes.append(NodeState(name, group, ip, proc.pid, temp_dir, log_path, cpus, resources, ns))
    return proc


def _token(state: ClusterState) -> str | None:
    path = state.client_env.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).read_text().strip() if path and Path(path).exists() else None


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
    state = ClusterState(cluster_id=cluster_id, root=root, mode="netns" if net else "loopback", gcs_address="",
                         dashboard="", client_env=client_env, network=net.to_dict() if net else None,
                         node_env=dict(env or {}), object_store_mb=object_store_mb)
    procs: list[subprocess.Popen] = []

    def start(name: str, group: str, cpus: float, resources: dict, extra: list[str]) -> None:
        procs.append(_start_node(state, name, group, cpus, resources, extra))

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
            _check_running(procs, state.nodes)
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
            _check_running(procs, state.nodes)
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


@contextmanager
def _state_locked(state_path: Path):
    """Serialises read-modify-write of the state file (nodes added and removed from other processes)."""
    with open(state_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _check_running(procs: list[subprocess.Popen], nodes: list[NodeState]) -> None:
    for proc, node in zip(procs, nodes):
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


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first found by their parent pid in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


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
    state_path.with_suffix(".lock").unlink(missing_ok=True)
    return problems


def status(state_path: str | Path = DEFAULT_STATE) -> dict:
    """The state file, the nodes Ray sees alive and the live actors (class, node) from Ray's state API."""
    state = read_state(state_path)
    alive = _alive_nodes(state.dashboard, _token(state))
    return {"state": asdict(state),
            "alive_nodes": [{"node_id": a.get("node_id"), "name": a.get("node_name"), "ip": a.get("node_ip"),
                             "resources": a.get("resources_total")} for a in alive],
            "actors": alive_actors(state)}


def alive_actors(state: ClusterState) -> list[dict]:
    """Every live actor as {class_name, node_id, pid}, from the dashboard's state API."""
    headers = {"Authorization": f"Bearer {t}"} if (t := _token(state)) else {}
    req = urllib.request.Request(f"{state.dashboard}/api/v0/actors?limit=10000&detail=1&filter_keys=state"
                                 f"&filter_predicates=%3D&filter_values=ALIVE", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            rows = json.loads(r.read())["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return []
    return [{"class_name": a.get("class_name"), "node_id": a.get("node_id"), "pid": a.get("pid")} for a in rows]


def node_ids(state: ClusterState) -> dict[str, str]:
    """Node name -> Ray node id of every node Ray sees alive."""
    return {a["node_name"]: a["node_id"] for a in _alive_nodes(state.dashboard, _token(state))}


def add_node(group: str, cpus: int, state_path: str | Path = DEFAULT_STATE, timeout: float = 120.0,
             log=print) -> NodeState:
    """One more ``rollout`` or ``learner`` node joining the running cluster (what a KubeRay worker
    group scaling up does); returns once Ray sees it alive."""
    if group not in ROLE_RESOURCES:
        raise ValueError(f"group must be one of {', '.join(ROLE_RESOURCES)}, not {group!r}")
    state_path = Path(state_path)
    with _state_locked(state_path):
        state = read_state(state_path)
        taken = {n.name for n in state.nodes} | set((state.network or {}).get("namespaces", {}))
        name = next(f"{group}-{i}" for i in range(1000) if f"{group}-{i}" not in taken)
        if state.network:
            net = netns.Network.from_dict(state.network)
            netns.add_node(net, name)
            state.network = net.to_dict()
        proc = _start_node(state, name, group, cpus, ROLE_RESOURCES[group], ["--address", state.gcs_address])
        _write_state(state_path, state)
    deadline = time.monotonic() + timeout
    while name not in node_ids(state):
        _check_running([proc], state.nodes[-1:])
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not alive after {timeout:.0f}s:\n{_tail(state.nodes[-1].log)}")
        time.sleep(0.5)
    log(f"cluster: {name} joined at {state.nodes[-1].ip}")
    return state.nodes[-1]


def request_drain(state: ClusterState, name: str, deadline_s: int = 120) -> None:
    """``ray drain-node`` with the preemption reason (a request the raylet cannot refuse, unlike an
    idle-termination one): the GCS lists the node as draining, schedules nothing new on it, and
    its raylet exits on its own once idle. ``deadline_s`` tells drivers when it will be killed."""
    ids = node_ids(state)
    if name not in ids:
        raise ValueError(f"Ray sees no live node named {name!r} (alive: {', '.join(sorted(ids))})")
    r = subprocess.run([_ray_bin(), "drain-node", "--address", state.gcs_address, "--node-id", ids[name],
                        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                        f"rlhf-ray cluster remove {name}", "--deadline-remaining-seconds", str(deadline_s)],
                       env={**os.environ, **state.client_env}, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"ray drain-node {name} failed: {r.stderr.strip()[-2000:]}")


def remove_node(name: str, state_path: str | Path = DEFAULT_STATE, *, drain: bool = True, deadline_s: int = 120,
                log=print) -> None:
    """Takes one worker node away. ``drain``: ``request_drain`` (what a preemption notice or the
    autoscaler sends; drivers see the node in the GCS's draining set), then wait until the raylet
    leaves on its own once idle, at most ``deadline_s``; else (or then) the node's raylet is killed
    outright, as when its pod or machine dies. Then its processes and namespace go."""
    state_path = Path(state_path)
    state = read_state(state_path)
    node = next((n for n in state.nodes if n.name == name), None)
    if node is None or node.group == "head":
        raise ValueError(f"no worker node {name!r} in {state_path} (nodes: "
                         f"{', '.join(n.name for n in state.nodes if n.group != 'head')})")
    if drain and name in node_ids(state):
        request_drain(state, name, deadline_s)
        log(f"cluster: {name} draining (deadline {deadline_s}s)")
        until = time.monotonic() + deadline_s
        while name in node_ids(state) and time.monotonic() < until:
            time.sleep(1)
    ours = node.temp_dir + os.sep  # rollout-1/ is not rollout-10/
    # The node dies at once, as a machine does: raylet and workers (whose titles no longer name
    # the temp dir: Ray renames them ray::<Actor>), every process under its `ray start`.
    for pid in [*_descendants(node.pid), *processes_of(ours)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _signal_group(node.pid, signal.SIGKILL)
    _wait_gone([node.pid], 10)
    for pid in processes_of(ours):
        os.kill(pid, signal.SIGKILL)
    with _state_locked(state_path):
        state = read_state(state_path)  # another add/remove may have written it meanwhile
        if state.network and name in state.network["namespaces"]:
            net = netns.Network.from_dict(state.network)
            netns.remove_node(net, name)
            state.network = net.to_dict()
        state.nodes = [n for n in state.nodes if n.name != name]
        _write_state(state_path, state)
    shutil.rmtree(node.temp_dir, ignore_errors=True)
    log(f"cluster: {name} removed" + (" after draining" if drain else " (raylet killed)"))


def forward_dashboard(state: ClusterState, port: int = 8265, ready=print) -> None:
    """Serves the head's dashboard on 127.0.0.1:``port`` until interrupted (``kubectl
    port-forward`` for the local cluster): with namespaces the head listens on its own address,
    reachable from this host only, and the browser gets a loopback URL like on a laptop."""
    import socket
    import threading
    from urllib.parse import urlparse

    target = urlparse(state.dashboard)

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    with socket.create_server(("127.0.0.1", port)) as server:
        ready(f"cluster: dashboard {state.dashboard} on http://127.0.0.1:{port} (Ctrl-C stops)")
        while True:
            client, _ = server.accept()
            try:
                upstream = socket.create_connection((target.hostname, target.port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()
