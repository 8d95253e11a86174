"""KubeRay manifests: schema-valid against the real v1.7.0 CRDs, and consistent with the configs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_ray.config import load_config

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
# The strict KubeRay validator and its CRDs live beside the repository (../shared/), here and in CI.
VALIDATOR = REPO.parent / "shared" / "tools" / "validate_k8s.py"
RAY_VERSION = "2.60.0"
IMAGE_TAG_PART = f"ray{RAY_VERSION}-py311"
RENDERED = {name: K8S / "rendered" / name for name in ("gpu-2x8", "cpu-smoke")}
CONFIG_OF = {"gpu-2x8": REPO / "configs" / "llama8b_2x8gpu_ppo.yaml",
             "cpu-smoke": REPO / "configs" / "cpu_smoke_ppo.yaml"}


def docs_in(folder: Path) -> list[dict]:
    return [d for f in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def cluster_specs(folder: Path) -> list[tuple[str, dict]]:
    """(where, RayCluster spec) for the RayCluster and the RayJob's own cluster in a folder."""
    out = []
    for d in docs_in(folder):
        if d["kind"] == "RayCluster":
            out.append((f"{folder.name}/RayCluster", d["spec"]))
        elif d["kind"] == "RayJob":
            out.append((f"{folder.name}/RayJob", d["spec"]["rayClusterSpec"]))
    return out


ALL_SPECS = [s for folder in (K8S / "base", *RENDERED.values()) for s in cluster_specs(folder)]
SPEC_IDS = [where for where, _ in ALL_SPECS]


def groups(spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def pod_templates(spec: dict):
    yield "head", spec["headGroupSpec"]["template"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]


def custom_resources(group: dict) -> dict:
    raw = group.get("rayStartParams", {}).get("resources")
    return yaml.safe_load(yaml.safe_load(raw)) if raw else {}  # shell-quoted JSON -> dict


# --------------------------------------------------------------------------- validity
def test_every_manifest_passes_the_strict_kuberay_validator():
    assert VALIDATOR.is_file(), f"the KubeRay validator is missing: {VALIDATOR} (../shared/tools/ beside the repository)"
    r = subprocess.run([sys.executable, str(VALIDATOR), "--strict", str(K8S)], check=False, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and "warning" not in r.stdout, r.stdout
    assert r.stdout.count("OK ") >= 11  # base (5) + two rendered overlays (3 each)


def test_rendered_manifests_are_up_to_date():
    spec = importlib.util.spec_from_file_location("launch_render_k8s", REPO / "launch" / "render_k8s.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert render.main(["--check"]) == 0


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("where,spec", ALL_SPECS, ids=SPEC_IDS)
def test_groups_scale_independently(where, spec):
    g = groups(spec)
    assert set(g) == {"rollout", "learner"}
    learner, rollout = g["learner"], g["rollout"]
    assert learner["minReplicas"] == learner["maxReplicas"] == learner["replicas"], "learners are fixed"
    assert rollout["minReplicas"] <= rollout["replicas"] <= rollout["maxReplicas"]
    if where.endswith("RayCluster"):
        assert spec["enableInTreeAutoscaling"] is True and rollout["minReplicas"] < rollout["maxReplicas"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("overlay", RENDERED)
def test_custom_resources_match_the_configs_ray_resources(overlay):
    cfg = load_config(CONFIG_OF[overlay])
    for _, spec in cluster_specs(RENDERED[overlay]):
        g = groups(spec)
        assert set(custom_resources(g["rollout"])) == set(cfg.rollout.ray_resources) == {"rollout"}
        learner_keys = set(custom_resources(g["learner"]))
        assert learner_keys == {"learner"}
        for role in (cfg.policy, cfg.critic, cfg.scorers):
            assert set(role.ray_resources) == learner_keys
        # Each pod advertises enough of its label for every bundle that may land on it.
        assert custom_resources(g["rollout"])["rollout"] >= cfg.rollout.num_engines


@pytest.mark.parametrize("overlay", RENDERED)
def test_cluster_section_matches_the_pods(overlay):
    cfg = load_config(CONFIG_OF[overlay])
    spec = next(s for w, s in cluster_specs(RENDERED[overlay]) if w.endswith("RayJob"))
    workers = spec["workerGroupSpecs"]
    assert cfg.cluster.nodes == sum(g["replicas"] for g in workers)
    for g in workers:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", 0)) == cfg.cluster.gpus_per_node
        assert int(limits["cpu"]) >= cfg.cluster.cpus_per_node


def test_gpu_groups_get_gpus_node_selectors_and_tolerations():
    for _, spec in cluster_specs(RENDERED["gpu-2x8"]):
        for g in spec["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            res = pod["containers"][0]["resources"]
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "8"
            assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head["limits"]
    for _, spec in cluster_specs(RENDERED["cpu-smoke"]):
        for _, tmpl in pod_templates(spec):
            assert "nvidia.com/gpu" not in str(tmpl) and "nodeSelector" not in tmpl["spec"]


@pytest.mark.parametrize("where,spec", ALL_SPECS, ids=SPEC_IDS)
def test_pods_are_non_root_with_shm_checkpoints_and_secrets(where, spec):
    for name, tmpl in pod_templates(spec):
        pod = tmpl["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        c = pod["containers"][0]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"], f"{name}: /dev/shm must be memory-backed"
        assert volumes[mounts["/mnt/rlhf"]]["persistentVolumeClaim"]["claimName"] == "rlhf-ray-checkpoints"
        assert any(e.get("secretRef", {}).get("name") == "rlhf-ray-secrets" for e in c["envFrom"])
        assert "value" not in str([e for e in c.get("env", []) if "TOKEN" in e["name"] or "KEY" in e["name"]])
    assert spec["authOptions"]["mode"] == "token"


def test_gpu_shm_is_sized_for_nccl():
    for _, spec in cluster_specs(RENDERED["gpu-2x8"]):
        for g in spec["workerGroupSpecs"]:
            shm = next(v for v in g["template"]["spec"]["volumes"] if v["name"] == "dshm")
            assert shm["emptyDir"]["sizeLimit"] == "64Gi"


@pytest.mark.parametrize("folder", [K8S / "base", *RENDERED.values()], ids=lambda p: p.name)
def test_one_ray_version_and_one_image_everywhere(folder):
    images = set()
    for d in docs_in(folder):
        if d["kind"] == "RayJob":
            images.add(d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"])
            assert yaml.safe_load(d["spec"]["runtimeEnvYAML"])["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    for _, spec in cluster_specs(folder):
        assert spec["rayVersion"] == RAY_VERSION
        for _, tmpl in pod_templates(spec):
            images |= {c["image"] for c in tmpl["spec"]["containers"]}
    assert len(images) == 1, images
    assert IMAGE_TAG_PART in images.pop()


def test_submitter_ray_matches_the_manifests():
    import ray

    assert ray.__version__ == RAY_VERSION
    assert f"ray[default]=={RAY_VERSION}" in (REPO / "pyproject.toml").read_text()


@pytest.mark.parametrize("folder", [K8S / "base", *RENDERED.values()], ids=lambda p: p.name)
def test_rayjob_brings_the_same_cluster_as_the_raycluster(folder):
    specs = dict(cluster_specs(folder))
    cluster, job = specs[f"{folder.name}/RayCluster"], specs[f"{folder.name}/RayJob"]
    strip = lambda s: {k: v for k, v in s.items() if k != "workerGroupSpecs"}
    assert strip(cluster) == strip(job)
    for name in ("rollout", "learner"):
        a, b = groups(cluster)[name], groups(job)[name]
        assert a["template"] == b["template"] and a["rayStartParams"] == b["rayStartParams"]


@pytest.mark.parametrize("overlay", RENDERED)
def test_rayjob_runs_a_shipped_config_on_the_shared_volume(overlay):
    job = next(d for d in docs_in(RENDERED[overlay]) if d["kind"] == "RayJob")
    words = job["spec"]["entrypoint"].split()
    assert words[:4] == ["python", "-m", "rlhf_ray.cli", "ppo"] and "ray_address=auto" in words
    config = words[words.index("--config") + 1]
    assert config == f"/app/configs/{CONFIG_OF[overlay].name}"  # baked into the image at /app
    cfg = load_config(CONFIG_OF[overlay], [w for w in words[words.index("--config") + 2:]])
    assert cfg.run_dir.startswith("/mnt/rlhf/") and cfg.ray_address == "auto"
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_overlays_only_hold_kustomizations():
    # validate_k8s.py skips kustomization files; anything else in an overlay would be a partial
    # manifest that fails --strict, so patches stay inline.
    for overlay in (K8S / "overlays").iterdir():
        assert sorted(p.name for p in overlay.iterdir()) == ["kustomization.yaml"]
