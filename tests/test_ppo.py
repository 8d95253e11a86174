"""End-to-end PPO on the real stack (Ray, vLLM on CPU, DeepSpeed with gloo), tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.sync.parity import WeightSyncParityError
from rlhf_ray.tracking import read_metrics

pytestmark = pytest.mark.slow

REQUIRED_METRICS = [
    "iteration", "reward_mean", "reward_std", "kl_to_ref", "kl_coef", "entropy", "policy_loss", "value_loss",
    "clip_fraction", "approx_kl", "response_length_min", "response_length_mean", "response_length_max", "logprob_gap_vllm_learner",
    "time/generate_s", "time/score_s", "time/train_s", "time/sync_s", "throughput/generate_tokens_per_s",
    "throughput/iteration_tokens_per_s", "gold_score_mean", "diversity/distinct_1",
    "flag/mode_collapse", "flag/over_optimisation", "hacking/verbosity_correlation", "hacking/format_gaming_rate",
]


def _config(tmp_path, *overrides):
    return load_config(None, [
        f"run_dir={tmp_path}", "model.policy=builtin:tiny", "model.tiny_hidden_size=64", "data.task=arithmetic",
        "scorers.use_task_gold_as_reward=false", "scorers.reward_functions=rlhf_ray.tasks.rewards:digit_fraction",
        "rollout.max_new_tokens=8", "rollout.max_model_len=64", "data.max_prompt_tokens=32", "rollout.gpu_memory_utilization=0.05",
        "ppo.prompts_per_iteration=32", "policy.micro_batch_size=16", "critic.micro_batch_size=16",
        *overrides,
    ])


def _fit(cfg):
    """A whole PPO run; the trainer (closed) and its history."""
    from rlhf_ray.stages.ppo import PPOTrainer

    trainer = PPOTrainer(cfg)
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def gae_run(ray_session, tmp_path_factory):
    """2 engines, 2 ZeRO-2 policy ranks and 2 critic ranks, 16 iterations on a dense rule reward.
    The engines are colocated (``rollout.colocate``): engine r in policy rank r's bundle, taking
    the weights from that rank alone through the colocated hand-over."""
    from rlhf_ray.stages.ppo import PPOTrainer

    cfg = _config(tmp_path_factory.mktemp("gae"), "ppo.iterations=16", "ppo.prompts_per_iteration=64", "rollout.num_engines=2",
                  "policy.num_ranks=2", "critic.num_ranks=2", "policy.zero_stage=2", "critic.zero_stage=2",
                  "policy.lr=3e-3", "critic.lr=3e-3", "ppo.epochs=2", "ppo.minibatches=2", "sync.parity_every=1",
                  "ppo.kl_coef=0.01", "rollout.colocate=true")
    trainer = PPOTrainer(cfg)
    history = trainer.fit()
    yield trainer, history
    trainer.close()


def test_gae_run_records_every_metric_finite(gae_run):
    trainer, _history = gae_run
    rows = read_metrics(trainer.run_dir)
    assert [r["iteration"] for r in rows] == list(range(1, 17))
    for row in rows:
        for key in REQUIRED_METRICS:
            assert key in row, key
            assert row[key] is not None and math.isfinite(row[key]), (key, row[key])
        assert "reward/digit_fraction_mean" in row
    # vLLM sampled from the same weights the learner recomputes with: the gap stays small.
    assert max(r["logprob_gap_vllm_learner"] for r in rows) < 1e-2
    assert (trainer.run_dir / "metrics.png").exists()
    assert list((trainer.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    samples = read_metrics(trainer.run_dir, "samples.jsonl")
    assert {s["iteration"] for s in samples} == set(range(1, 17))
    assert {"prompt", "response", "reward", "components", "kl", "truncated"} <= set(samples[0])
    assert (trainer.run_dir / "policy" / "model.safetensors").exists()


def test_gae_run_learns_the_rule_reward(gae_run):
    _, history = gae_run
    first = sum(r["reward_mean"] for r in history[:3]) / 3
    last = sum(r["reward_mean"] for r in history[-3:]) / 3
    # digit_fraction starts near 10/80 for the untrained model; PPO must push it well up.
    assert last > first + 0.15, [round(r["reward_mean"], 3) for r in history]


def test_stale_engine_weights_fail_the_parity_check(gae_run):
    trainer, _ = gae_run
    import ray

    from rlhf_ray.data.batch import RolloutBatch

    gens = trainer._generate(trainer.prompts.next_batch(4))
    batch = RolloutBatch.from_token_lists([g.prompt_ids for g in gens], [g.response_ids for g in gens],
                                          trainer.tokenizer.pad_token_id)
    trainer.check_sync_parity(batch)  # in sync after fit()
    # One more update without a sync leaves the engines stale.
    old_lp = torch.cat([lp for lp, _ in ray.get(
        [a.logprobs.remote(s, 1.0) for a, s in zip(trainer.roles.policy, batch.chunk(2))])])
    stale = batch.with_extras(old_logprobs=old_lp, advantages=torch.ones_like(old_lp) * batch.response_mask,
                              old_values=torch.zeros_like(old_lp), returns=torch.ones_like(old_lp))
    trainer._train(stale, 1.0)
    with pytest.raises(WeightSyncParityError, match="rollout engine 0"):
        trainer.check_sync_parity(batch)


def test_colocated_engines_take_their_weights_from_the_rank_beside_them(gae_run):
    """Engine r lives in policy rank r's bundle (no placement group of its own) and every sync of
    the run went from each rank to its own engine through the two-slot hand-over: the parity check
    after each one passed (the run finished), and each rank sent all 16 syncs itself."""
    import ray

    trainer, history = gae_run
    pool, policy = trainer.roles.rollout, trainer.roles.policy
    assert pool.colocated and not pool.sleeps  # on CPU the engines stay resident
    engines = sorted(pool.engines.values(), key=lambda e: e.bundle)
    assert [e.bundle for e in engines] == [0, 1]
    assert all(e.group.id == trainer.roles.placement_groups[0].id for e in engines)  # the policy's group
    syncs = ray.get([rank.__ray_call__.remote(lambda self: self.ipc_sender.syncs) for rank in policy])
    assert syncs == [len(history), len(history)] == [16, 16]


def test_grpo_with_zero3_runs_and_keeps_parity(short_ppo_run):
    trainer, history = short_ppo_run  # GRPO, ZeRO-3 policy on 2 ranks, parity checked every iteration
    assert trainer.cfg.ppo.advantage_estimator == "grpo" and trainer.cfg.policy.zero_stage == 3
    assert not trainer.roles.critic
    assert trainer.roles.rollout.layout.uses_shm == [True]  # auto, one node: the weights went through shared memory
    assert len(history) == 2 and all(math.isfinite(r["policy_loss"]) for r in history)
    assert "value_loss" not in history[0]
    # ppo.old_logprobs=rollout: no learner scoring pass, so no vLLM-vs-learner gap to log; the
    # engines' log-probs served as pi_old. At iteration 1 policy = reference = sampler, so both the
    # KL to the reference (rollout vs the two reference replicas' shards) and the ratio's approx_kl
    # stay at numerical noise; wrong or misaligned log-probs would put them in whole nats.
    assert "logprob_gap_vllm_learner" not in history[0] and len(trainer.roles.reference) == 2
    assert abs(history[0]["kl_to_ref"]) < 8 * 1e-2 and history[0]["approx_kl"] < 1e-3


def test_lora_gae_syncs_merged_weights_with_parity_and_saves_a_loadable_policy(ray_session, tmp_path, bpe_tokenizer):
    """Policy and critic train LoRA adapters only; vLLM (no LoRA support asked) gets merged weights
    under the base names, and every sync passes the parity check. The reward model and the critic's
    start are sequence-classification checkpoints (Skywork-Reward's format); the reward model is a
    Qwen2 with a byte-level BPE tokenizer, so it scores its own tokenization of the rollouts' text."""
    from rlhf_ray.models.loading import load_causal_lm
    from rlhf_ray.models.tiny import build_tiny_reward_model

    reward_model = build_tiny_reward_model(tmp_path / "qwen-rm", "qwen2", tokenizer=bpe_tokenizer)
    critic_start = build_tiny_reward_model(tmp_path / "llama-rm", "llama")  # the policy's tokenizer
    cfg = _config(tmp_path / "run", "ppo.iterations=2", "ppo.prompts_per_iteration=16", "rollout.num_engines=1",
                  "policy.num_ranks=1", "critic.num_ranks=1", "policy.lr=2e-2", "critic.lr=2e-2",
                  "policy.lora.rank=4", "policy.lora.alpha=8", "critic.lora.rank=4", "sync.parity_every=1",
                  "ppo.dual_clip=3", "ppo.loss_agg=seq-mean-token-sum-norm",  # the value loss takes the norm too
                  f"model.reward=[{reward_model}]", f"model.critic={critic_start}")
    trainer, history = _fit(cfg)
    assert len(history) == 2 and all(math.isfinite(r["value_loss"]) for r in history)
    assert all(math.isfinite(r["reward/rm0_mean"]) for r in history)
    assert max(r["logprob_gap_vllm_learner"] for r in history) < 1e-2
    # policy/ holds the merged model (what eval and later stages load) and the peft adapter.
    policy_dir = trainer.run_dir / "policy"
    assert (policy_dir / "adapter" / "adapter_config.json").exists()
    merged = load_causal_lm(policy_dir).state_dict()
    base = load_causal_lm(trainer.policy_path).state_dict()
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed), changed


def test_overlap_trains_one_update_off_policy_with_tis_while_engines_come_and_go(ray_session, tmp_path, capsys):
    """ppo.overlap: batch k+1 is sampled while batch k trains, so from the second batch on every
    sample comes from the weights one update behind; TIS weights apply and parity still holds.
    With rollout.elastic too: an engine dies while it samples the batch ahead; it retires at the
    sync, a new engine starts at the next boundary, and the batch's prompts it held go to the
    others. (Engines were list positions once: the batch ahead then still named the dead engine's
    position, which the new engine had taken, and the healthy new engine was retired.)"""
    import os
    import signal

    import ray

    from rlhf_ray.stages import checkpoint as ckpt
    from rlhf_ray.stages.ppo import PPOTrainer

    # The transformers engine: the pool's bookkeeping is what is tested, and it starts in seconds.
    cfg = _config(tmp_path, "ppo.iterations=3", "ppo.overlap=true", "ppo.advantage_estimator=grpo",
                  "rollout.samples_per_prompt=4", "ppo.prompts_per_iteration=8", "rollout.num_engines=2",
                  "rollout.elastic=true", "rollout.min_engines=1", "rollout.max_engines=2", "rollout.engine=hf",
                  "policy.num_ranks=1", "policy.lr=3e-3", "sync.parity_every=1", "checkpoint.every=2",
                  "checkpoint.save_final=false", "logging.trackers=[]")
    trainer = PPOTrainer(cfg)
    pids = ray.get([a.__ray_call__.remote(lambda _: os.getpid()) for a in trainer.roles.rollout])
    start, rollouts, sizes = trainer._start_generation, trainer._rollouts, []

    def start_then_kill(iteration):
        pending = start(iteration)
        if iteration == 1:  # batch 2 is out on both engines: engine 1 dies holding its half
            os.kill(pids[1], signal.SIGKILL)
        return pending

    def counting_rollouts():
        out = rollouts()
        sizes.append(len(out[3]))  # generations: every prompt answered, samples_per_prompt times
        return out

    trainer._start_generation, trainer._rollouts = start_then_kill, counting_rollouts
    try:
        history = trainer.fit()
        engine_ids = list(trainer.roles.rollout.engines)
    finally:
        trainer.close()
    out = capsys.readouterr().out
    assert "retired rollout engine(s) [1] (died)" in out and "started rollout engine(s) [2]" in out, out[-3000:]
    assert engine_ids == [0, 2] and "retired rollout engine(s) [2]" not in out
    assert [r["rollout/engines"] for r in history] == [2, 2, 2]
    assert sizes == [32, 32, 32]
    assert [r["policy_version"] for r in history] == [0, 0, 1]
    assert [r["policy_lag"] for r in history] == [0, 1, 1]
    assert [r["prompts_position"] for r in history] == [0, 8, 16]
    for r in history:
        for key in ("policy_loss", "approx_kl", "logprob_gap_vllm_learner", "is/weight_mean", "reward_mean"):
            assert math.isfinite(r[key]), (key, r)
        assert 0 < r["is/weight_mean"] <= 2.0 and 0 <= r["is/affected_fraction"] <= 1
    # The last iteration starts no batch ahead, so it has nothing to wait for.
    assert ["time/overlap_wait_s" in r for r in history] == [True, True, False]
    # Sampled by the weights before the last update: the learner's log-probs have moved away.
    assert history[1]["logprob_gap_vllm_learner"] > 3 * history[0]["logprob_gap_vllm_learner"]
    samples = read_metrics(trainer.run_dir, "samples.jsonl")
    assert {(s["iteration"], s["policy_version"]) for s in samples} == {(1, 0), (2, 0), (3, 1)}
    # The checkpoint after iteration 2 points at the prompts of the batch sampled ahead (not trained).
    state = ckpt.load_trainer_state(ckpt.checkpoint_root(trainer.run_dir) / "iter-000002")
    assert (state["iteration"], state["prompts_position"]) == (2, 16)


def test_hf_rollout_engine_trains_and_keeps_parity(ray_session, tmp_path):
    """rollout.engine=hf: transformers generate in the rollout actor, weights through the same
    sync; the parity check (log-probs and greedy tokens) passes after every sync. The run also
    takes the 2026 algorithm menu through the learners: Dr. GRPO advantages, CISPO with DAPO's
    clip-higher, the length-unbiased aggregation and overlong shaping."""
    cfg = _config(tmp_path, "rollout.engine=hf", "ppo.iterations=2", "ppo.advantage_estimator=dr_grpo",
                  "ppo.policy_loss=cispo", "ppo.clip_eps_high=0.28", "ppo.loss_agg=seq-mean-token-sum-norm",
                  "ppo.overlong_buffer=4", "ppo.overlong_factor=0.5",
                  "rollout.samples_per_prompt=4", "ppo.prompts_per_iteration=8", "rollout.num_engines=1",
                  "policy.num_ranks=1", "policy.lr=3e-3", "sync.parity_every=1", "checkpoint.save_final=false",
                  "logging.trackers=[]", "ppo.dynamic_sampling=true", "ppo.dynamic_sampling_rounds=1")
    _, history = _fit(cfg)
    assert len(history) == 2 and all(math.isfinite(r["policy_loss"]) for r in history)
    # DAPO's dynamic sampling (its selection is tested on its own in test_prepare): the stream moved
    # by every prompt drawn, each batch still holds 8 prompts, of which at most the dropped filled.
    logged = read_metrics(cfg.run_dir, "prompts.jsonl")
    for r, log, next_log in zip(history, logged, [*logged[1:], None]):
        assert 1 <= r["dynamic/rounds"] <= 2 and r["dynamic/filled_groups"] <= r["dynamic/dropped_groups"]
        assert len(log["prompts"]) == 8 and r["dynamic/prompts_drawn"] >= 8
        if next_log:
            assert next_log["position"] - log["position"] == r["dynamic/prompts_drawn"]
    # Same model, same numerics: the sampler's log-probs are the learner's.
    assert max(r["logprob_gap_vllm_learner"] for r in history) < 1e-3
    assert history[0]["generated_tokens"] > 0
    # Iteration 1 samples from the learner's own weights: CISPO's weights are all 1, nothing clipped.
    assert history[0]["clip_fraction"] == 0.0 and history[0]["approx_kl"] < 1e-6
    samples = read_metrics(cfg.run_dir, "samples.jsonl")
    assert all(s["reward"] <= 1.0 for s in samples)  # digit share minus the overlong penalty


def test_multi_turn_ppo_trains_on_the_policys_tokens_through_the_pool_and_keeps_parity(ray_session, tmp_path):
    """agent.env: trajectories of several turns on the pool's engine, the environment's rewards,
    only the policy's tokens counted and trained on; the parity check after every sync runs on
    those rows (observed tokens inside them) and passes. The HF engine starts in seconds; vLLM's
    tokens through the same loop are checked in tests/test_vllm_engine.py."""
    stop = "[" + ",".join(f"'{c}'" for c in "abcdefghijklmnopqrstuvwxyz") + "]"  # short turns: several fit
    cfg = _config(tmp_path, "agent.env=agent_helpers:MoreEnv", "agent.max_turns=3", "agent.max_tokens=30",
                  f"rollout.stop={stop}", "rollout.engine=hf", "ppo.iterations=2", "ppo.advantage_estimator=grpo",
                  "rollout.samples_per_prompt=2", "ppo.prompts_per_iteration=4", "rollout.num_engines=1",
                  "policy.num_ranks=1", "sync.parity_every=1", "checkpoint.save_final=false",
                  "logging.samples_per_iteration=8", "ppo.eval_every=2", "data.num_eval_prompts=4")
    _, history = _fit(cfg)
    assert len(history) == 2 and all(math.isfinite(r["policy_loss"]) for r in history)
    # The held-out evaluation: greedy trajectories before the first iteration and after the last.
    evaluated = [r for r in read_metrics(cfg.run_dir) if "eval/gold" in r]
    assert [r["iteration"] for r in evaluated] == [0, 2] and "eval/gold" not in history[0]
    assert all(0 <= r["eval/gold"] <= 1 and r["eval/turns_mean"] > 1 for r in evaluated)
    for r in history:
        assert r["agent/turns_mean"] > 1 and r["agent/observed_tokens"] > 0
        # The environment rewards every message it sees; only a trajectory whose first turn was cut
        # at the token limit never reached it (the reward function scores that one).
        assert 1 - r.get("agent/finish_max_tokens", 0) - 1e-9 <= r["agent/env_rewarded_fraction"] <= 1
        # The learners' batch counts the policy's tokens only: the observed ones are masked out.
        assert r["generated_tokens"] == r["agent/generated_tokens"]
    samples = read_metrics(cfg.run_dir, "samples.jsonl")
    assert len(samples) == 16 and all(s["turns"][0]["role"] == "assistant" for s in samples)
    assert any(turn["role"] == "user" and turn["text"] == "\nmore\n" for s in samples for turn in s["turns"])
