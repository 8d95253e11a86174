"""Local multi-node Ray clusters shaped like the KubeRay deployment (``rlhf-ray cluster up|down``,
``add``/``remove`` to scale a worker group while a run goes on).

``local``: the nodes (``ray start`` processes) and the state file; ``netns``: one network
namespace per node; ``placement``: where Ray put each role; ``cli``: the ``cluster`` commands.
"""

from rlhf_ray.cluster.cli import add_cluster_commands, run_cluster_command
from rlhf_ray.cluster.local import ClusterState, down, read_state, status, up

__all__ = ["ClusterState", "add_cluster_commands", "down", "read_state", "run_cluster_command", "status", "up"]
