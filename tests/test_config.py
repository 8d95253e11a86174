from pathlib import Path

import pytest

from rlhf_ray.cli import main
from rlhf_ray.config import ConfigError, RunConfig, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # Each config opens with the command that runs it.
    assert path.read_text().startswith("# rlhf-ray ")


def test_defaults_are_valid():
    assert load_config().validate() == []


def test_dotted_overrides_take_typed_values():
    cfg = load_config(None, ["ppo.kl_coef=0.02", "rollout.num_engines=4", "model.reward=[a, b]",
                             "policy.bf16=true", "scorers.reward_functions=m:f"])
    assert cfg.ppo.kl_coef == 0.02 and isinstance(cfg.ppo.kl_coef, float)
    assert cfg.rollout.num_engines == 4
    assert cfg.model.reward == ["a", "b"]
    assert cfg.policy.bf16 is True
    assert cfg.scorers.reward_functions == ["m:f"]


def test_data_subset_and_split_default_to_no_subset_and_train():
    data = load_config().data
    assert (data.subset, data.split) == ("", "train")
    data = load_config(None, ["data.subset=main", "data.split=test"]).data
    assert (data.subset, data.split) == ("main", "test")


def test_override_beats_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  kl_coef: 0.1\n  iterations: 3\n")
    cfg = load_config(f, ["ppo.kl_coef=0.3"])
    assert cfg.ppo.kl_coef == 0.3 and cfg.ppo.iterations == 3


@pytest.mark.parametrize("override,expected", [
    ("ppo.kl_cof=1", "unknown config key ppo.kl_cof; did you mean ppo.kl_coef?"),
    ("rollot.num_engines=2", "unknown config key rollot; did you mean rollout?"),
    ("ppo.iterations=abc", "ppo.iterations must be an integer"),
    ("ppo.iterations=1.5", "ppo.iterations must be an integer"),
    ("policy.bf16=3", "policy.bf16 must be true or false"),
    ("ppo.advantage_estimator=ppo2", "ppo.advantage_estimator must be one of gae, grpo, rloo, reinforce_pp"),
    ("ppo.clip_eps=1.5", "ppo.clip_eps: must be in (0, 1)"),
    ("ppo.prompts_per_iteration=-4", "ppo.prompts_per_iteration: must be >= 1"),
    ("policy.zero_stage=4", "policy.zero_stage: must be 0, 1, 2 or 3"),
    ("policy.num_ranks=64", "policy.num_ranks: 64 ranks cannot split a minibatch of 32 rows"),
    ("scorers.reward_functions=nocolon", "scorers.reward_functions[0]: 'nocolon' is not of the form"),
    ("policy.offload_params=true", "policy.offload_params: parameter offload needs zero_stage 3"),
    ("ppo.tis_cap=0.5", "ppo.tis_cap: must be 0 (no correction) or >= 1"),
    ("scorers.reference_replicas=0", "scorers.reference_replicas: must be >= 1"),
    ("cluster.placement_timeout_s=-1", "cluster.placement_timeout_s: must be >= 0"),
    ("rollout.engine=hf backend=cuda", "rollout.engine: hf runs on CPU with one worker per engine"),
    ("ppo.dual_clip=0.5", "ppo.dual_clip: must be 0 (off) or > 1"),
    ("ppo.dual_clip=3 ppo.policy_loss=gspo", "ppo.dual_clip: applies to policy_loss=ppo only"),
    ("ppo.policy_loss=trpo", "ppo.policy_loss must be one of ppo, gspo, cispo"),
    ("ppo.advantage_estimator=dr_grpo", "rollout.samples_per_prompt: dr_grpo needs >= 2 samples per prompt"),
    ("ppo.overlong_buffer=100", "ppo.overlong_buffer: must be at most rollout.max_new_tokens=16"),
    ("ppo.reward_clip=0", "ppo.reward_clip: must be > 0"),
    ("ppo.policy_loss=gspo ppo.advantage_estimator=gae", "ppo.policy_loss: gspo weighs whole sequences"),
    ("ppo.is_correction=mis ppo.old_logprobs=rollout", "ppo.is_correction: needs ppo.old_logprobs=learner"),
    ("ppo.is_cap=0.5", "ppo.is_cap: must be >= 1"),
    ("ppo.dynamic_sampling=true", "ppo.dynamic_sampling: drops groups whose samples scored alike"),
    ("ppo.dynamic_sampling=true ppo.advantage_estimator=reinforce_pp", "use advantage_estimator grpo, dr_grpo or rloo"),
    ("ppo.dynamic_sampling=true ppo.advantage_estimator=grpo rollout.samples_per_prompt=4 ppo.overlap=true",
     "ppo.dynamic_sampling: cannot run with ppo.overlap"),
    ("ppo.dynamic_sampling=true ppo.advantage_estimator=reinforce_pp rollout.samples_per_prompt=1",
     "ppo.dynamic_sampling: needs rollout.samples_per_prompt >= 2"),
    ("ppo.dynamic_sampling_rounds=-1", "ppo.dynamic_sampling_rounds: must be >= 0"),
    ("rm.margin=-1", "rm.margin: must be >= 0"),
    ("safeguards.collapse_min_distinct_1=1.5", "safeguards.collapse_min_distinct_1: must be in [0, 1]"),
    ("data.sft_error_rate=2", "data.sft_error_rate: must be in [0, 1]"),
    ("rollout.num_cpus=-1", "rollout.num_cpus: resources must be >= 0"),
    ("rollout.max_model_len=64 data.max_prompt_tokens=60 rollout.max_new_tokens=8",
     ("rollout.max_model_len: 64 cannot hold a prompt of data.max_prompt_tokens=60 and a response of "
      "rollout.max_new_tokens=8: make it at least 68")),
    ("rollout.min_new_tokens=17", "rollout.min_new_tokens: must be in [0, rollout.max_new_tokens=16]"),
    ("rollout.min_new_tokens=-1", "rollout.min_new_tokens: must be in [0, rollout.max_new_tokens=16]"),
    ("rollout.min_new_tokens=4 agent.env=task data.task=multiplication",
     "rollout.min_new_tokens: is not supported with multi-turn rollouts (agent.env)"),
])
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, override.split())
    assert expected in str(e.value)


def test_rollout_logprobs_need_the_full_distribution():
    with pytest.raises(ConfigError, match="ppo.old_logprobs: rollout needs rollout.top_p=1"):
        load_config(None, ["ppo.old_logprobs=rollout", "rollout.top_p=0.9"])
    with pytest.raises(ConfigError, match="ppo.old_logprobs: rollout needs rollout.min_new_tokens=0"):
        load_config(None, ["ppo.old_logprobs=rollout", "rollout.min_new_tokens=4"])
    assert load_config(None, ["ppo.old_logprobs=rollout"]).ppo.old_logprobs == "rollout"


def test_rloo_needs_groups():
    with pytest.raises(ConfigError, match="rollout.samples_per_prompt: rloo needs"):
        load_config(None, ["ppo.advantage_estimator=rloo"])
    cfg = load_config(None, ["ppo.advantage_estimator=rloo", "rollout.samples_per_prompt=4"])
    assert not cfg.uses_critic and cfg.rollout_batch_size == 128


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does-not-exist.yaml does not exist"):
        load_config(tmp_path / "does-not-exist.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    section_as_value = tmp_path / "flat.yaml"
    section_as_value.write_text("ppo: 3\n")
    with pytest.raises(ConfigError, match="ppo must be a mapping"):
        load_config(section_as_value)


def test_cli_show_prints_resolved_config(capsys):
    assert main(["config", "show", "ppo.kl_coef=0.02"]) == 0
    out = capsys.readouterr().out
    assert "kl_coef: 0.02" in out and "num_engines: 2" in out


def test_cli_rejects_typo_with_exit_code(capsys):
    assert main(["config", "check", "ppo.clip=0.1"]) == 2
    assert "did you mean ppo.clip_eps?" in capsys.readouterr().err
