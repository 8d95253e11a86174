"""One network namespace per Ray node: a bridge on the host, a veth pair per namespace.

Each namespace gets its own address on a private /24 (the host keeps ``.1`` on the bridge, so
it reaches every node, e.g. the head's dashboard), loopback up, and a default route through the
bridge. Inside every namespace the node's interface is called ``eth0``, like a pod's, so one
``GLOO_SOCKET_IFNAME=eth0`` / ``NCCL_SOCKET_IFNAME=eth0`` serves every node.

Needs root (CAP_NET_ADMIN) and iproute2's ``ip``. Names carry a short cluster id, so several
clusters (and other users' namespaces) live side by side; teardown removes only the names it made.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
from dataclasses import asdict, dataclass, field

IFNAME = "eth0"  # the node's interface inside its namespace


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no iproute2, no kernel support)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Network:
    cluster_id: str
    subnet: str  # e.g. 10.213.7.0/24
    bridge: str
    host_ip: str
    namespaces: dict[str, str] = field(default_factory=dict)  # node name -> namespace
    addresses: dict[str, str] = field(default_factory=dict)  # node name -> address in its namespace
    host_veths: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Network:
        return cls(**d)


def probe() -> str | None:
    """None when namespaces can be made here, else why not (a skip reason)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    name = f"rlhfprobe{os.getpid()}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    r = _ip("-4", "-o", "addr", "show", check=False)
    nets = []
    for line in r.stdout.splitlines():
        words = line.split()
        if "inet" in words:
            nets.append(ipaddress.ip_interface(words[words.index("inet") + 1]).network)
    return nets


def pick_subnet(cluster_id: str) -> ipaddress.IPv4Network:
    """A free 10.213.X.0/24 (X from the id, then onwards) that overlaps nothing on the host."""
    used = _used_networks()
    start = int(cluster_id, 16) % 250
    for k in range(250):
        net = ipaddress.ip_network(f"10.213.{(start + k) % 250 + 1}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetnsUnavailable("no free 10.213.X.0/24 subnet on this host")


def create(cluster_id: str, node_names: list[str]) -> Network:
    """Bridge + one namespace per node; on any failure removes what it made and raises."""
    why = probe()
    if why:
        raise NetnsUnavailable(why)
    subnet = pick_subnet(cluster_id)
    net = Network(cluster_id=cluster_id, subnet=str(subnet), bridge=f"rlbr{cluster_id}",
                  host_ip=str(next(subnet.hosts())))
    try:
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.host_ip}/{subnet.prefixlen}", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for name in node_names:
            _attach(net, name)
    except subprocess.CalledProcessError as e:
        destroy(net)
        raise NetnsUnavailable(f"{' '.join(e.cmd)}: {e.stderr.strip()}") from None
    return net


def _attach(net: Network, name: str) -> None:
    """A namespace for node ``name`` on the bridge, with the lowest address not yet handed out."""
    subnet = ipaddress.ip_network(net.subnet)
    taken = {net.host_ip, *net.addresses.values()}
    i, addr = next((i, str(a)) for i, a in enumerate(subnet.hosts()) if str(a) not in taken)
    ns, veth = f"rlhf-{net.cluster_id}-{name}", f"rlv{net.cluster_id}{i}"
    _ip("netns", "add", ns)
    net.namespaces[name] = ns
    _ip("link", "add", veth, "type", "veth", "peer", "name", IFNAME, "netns", ns)
    net.host_veths.append(veth)
    _ip("link", "set", veth, "master", net.bridge, "up")
    _ip("-n", ns, "addr", "add", f"{addr}/{subnet.prefixlen}", "dev", IFNAME)
    _ip("-n", ns, "link", "set", IFNAME, "up")
    _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", ns, "route", "add", "default", "via", net.host_ip)
    net.addresses[name] = addr


def add_node(net: Network, name: str) -> None:
    """One more namespace on an existing cluster's bridge (a node joining later)."""
    try:
        _attach(net, name)
    except subprocess.CalledProcessError as e:
        remove_node(net, name)
        raise NetnsUnavailable(f"{' '.join(e.cmd)}: {e.stderr.strip()}") from None


def remove_node(net: Network, name: str) -> list[str]:
    """Kills whatever runs in the node's namespace and removes it (its veth goes with it)."""
    ns = net.namespaces.pop(name, None)
    net.addresses.pop(name, None)
    return _remove_namespace(ns) if ns else []


def _remove_namespace(ns: str) -> list[str]:
    for pid in pids_in(ns):  # everything in our namespace is ours
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    r = _ip("netns", "del", ns, check=False)
    if r.returncode != 0 and "No such file" not in r.stderr:
        return [f"netns del {ns}: {r.stderr.strip()}"]
    return []


def pids_in(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def destroy(net: Network) -> list[str]:
    """Kills whatever still runs in the namespaces, removes them, the veths and the bridge.
    Returns the problems met (empty when all went)."""
    problems = [p for ns in net.namespaces.values() for p in _remove_namespace(ns)]
    for veth in net.host_veths:  # gone with their namespace's end; left over only if that failed
        _ip("link", "del", veth, check=False)
    r = _ip("link", "del", net.bridge, check=False)
    if r.returncode != 0 and "Cannot find device" not in r.stderr:
        problems.append(f"link del {net.bridge}: {r.stderr.strip()}")
    return problems


def leftovers(cluster_id: str) -> list[str]:
    """Namespaces or links of this cluster that still exist (for tests and ``down``)."""
    found = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines()
             if line.startswith(f"rlhf-{cluster_id}-")]
    links = _ip("-o", "link", "show", check=False).stdout
    found += [name for name in (f"rlbr{cluster_id}",) if f" {name}:" in links or f" {name}@" in links]
    return found
