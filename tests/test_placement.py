"""Placement that cannot succeed fails with the roles and numbers named, and reserves nothing."""

from __future__ import annotations

import pytest

from rlhf_ray.actors.placement import PlacementTimeoutError, launch_roles, learner_placement_group
from rlhf_ray.config import load_config


def _live_groups(ray) -> list[str]:
    return [pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"]


@pytest.mark.slow
def test_a_plan_ray_cannot_place_times_out_naming_the_role(ray_session):
    ray = ray_session
    before = set(_live_groups(ray))
    cfg = load_config(None, ["rollout.num_engines=2", "rollout.num_cpus=1000", "cluster.placement_timeout_s=1"])
    with pytest.raises(PlacementTimeoutError) as err:
        launch_roles(cfg, "unused", "unused", [], [], [], pad_id=0)
    msg = str(err.value)
    assert "rollout engine 0 [{'CPU': 1000.0}]" in msg and "rollout engine 1" in msg
    assert "policy" not in msg.split(" within ")[0]  # the learners' group fits: not blamed
    assert "cluster.placement_timeout_s=1" in msg and "'CPU': " in msg.split("free now: ")[1]
    assert set(_live_groups(ray)) == before  # every group of the plan was removed, placed or not


@pytest.mark.slow
def test_a_learner_group_that_cannot_be_placed_times_out(ray_session):
    cfg = load_config(None, ["policy.num_ranks=3", "policy.num_cpus=100"])
    with pytest.raises(PlacementTimeoutError, match=r"learners \[\{'CPU': 100.0\}, \{'CPU': 100.0\}, \{'CPU': 100.0\}\]"):
        learner_placement_group(cfg.policy, timeout_s=0.5)
