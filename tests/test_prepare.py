"""Batch preparation between the score and train phases (rlhf_ray.stages.prepare), against
numbers worked out by hand in the test, one config key at a time."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.engines.sampling import Generation
from rlhf_ray.stages.prepare import (
    Scored,
    final_scores,
    iteration_record,
    prepare_batch,
    sample_informative_groups,
)

# Two prompts x two samples; responses of 3, 2, 1 and 3 tokens.
BATCH = RolloutBatch.from_token_lists([[5, 6], [5, 6], [7], [7]], [[1, 2, 3], [4, 5], [6], [7, 8, 9]], pad_id=0)
MASK = BATCH.response_mask


def cfg(*overrides):
    return load_config(None, ["rollout.samples_per_prompt=2", "ppo.prompts_per_iteration=2", *overrides])


def scored(scores, old=None, ref=None, rollout=None, values=None, truncated=(False, False, False, False)):
    zeros = torch.zeros(4, 3)
    return Scored(old_logprobs=zeros if old is None else old, ref_logprobs=zeros if ref is None else ref,
                  rollout_logprobs=zeros if rollout is None else rollout, values=values,
                  scores=torch.tensor(scores, dtype=torch.float32), truncated=torch.tensor(truncated))


def test_scores_are_clipped_then_penalised_for_a_missing_end():
    out = final_scores(torch.tensor([5.0, -5.0, 0.5]), torch.tensor([False, True, True]), reward_clip=2.0,
                       missing_eos_penalty=0.25)
    assert out.tolist() == [2.0, -2.25, 0.25]


def test_grpo_advantages_are_group_normalised_scores_minus_the_kl_penalty():
    old = torch.full((4, 3), -1.0) * MASK
    ref = torch.full((4, 3), -1.5) * MASK  # k1 estimate: old - ref = 0.5 per real token
    c = cfg("ppo.advantage_estimator=grpo", "ppo.kl_coef=0.1", "ppo.kl_estimator=k1", "ppo.whiten_advantages=false")
    p = prepare_batch(BATCH, scored([1.0, 0.0, 2.0, 2.0], old, ref), c, kl_coef=0.1, recomputed=False)
    assert p.kl_per_seq.tolist() == pytest.approx([1.5, 1.0, 0.5, 1.5])
    # Group 1: penalised scores 0.85 and -0.1, (s - mean) / std with std = |0.95| / sqrt(2).
    g1 = (0.85 - 0.375) / (0.95 / math.sqrt(2))
    # Group 2: 1.95 and 1.85.
    g2 = (1.95 - 1.9) / (0.1 / math.sqrt(2))
    per_seq = [g1, -g1, g2, -g2]
    for row in range(4):
        real = MASK[row].bool()
        assert p.advantages[row][real].tolist() == pytest.approx([per_seq[row]] * int(real.sum()), rel=1e-4)
        assert (p.advantages[row][~real] == 0).all()
    assert p.returns is None and "old_values" not in p.batch.extras
    assert set(p.batch.extras) == {"old_logprobs", "advantages", "ref_logprobs"}


def test_gae_with_unit_discount_and_zero_values_credits_every_token_with_the_score():
    c = cfg("ppo.advantage_estimator=gae", "ppo.gamma=1.0", "ppo.lam=1.0", "ppo.whiten_advantages=false",
            "rollout.samples_per_prompt=1", "ppo.prompts_per_iteration=4")
    p = prepare_batch(BATCH, scored([1.0, -2.0, 0.5, 3.0], values=torch.zeros(4, 3)), c, kl_coef=0.0,
                      recomputed=False)
    for row, score in enumerate([1.0, -2.0, 0.5, 3.0]):
        real = MASK[row].bool()
        assert p.advantages[row][real].tolist() == pytest.approx([score] * int(real.sum()))
        assert p.returns[row][real].tolist() == pytest.approx([score] * int(real.sum()))
    assert torch.equal(p.batch.extras["old_values"], torch.zeros(4, 3))


def test_whitening_centres_and_scales_the_real_tokens_only():
    c = cfg("ppo.advantage_estimator=gae", "ppo.whiten_advantages=true", "rollout.samples_per_prompt=1",
            "ppo.prompts_per_iteration=4")
    p = prepare_batch(BATCH, scored([1.0, -2.0, 0.5, 3.0], values=torch.zeros(4, 3)), c, kl_coef=0.0,
                      recomputed=False)
    real = p.advantages[MASK.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.std().item() == pytest.approx(1.0, rel=1e-3)


def test_importance_weights_correct_the_sampler_learner_mismatch():
    old = torch.log(torch.full((4, 3), 0.5)) * MASK
    sampler = torch.log(torch.full((4, 3), 0.1)) * MASK  # ratio 5 on every real token
    sampler[0, 0] = old[0, 0]  # ... but 1 on this one
    s = scored([1.0, 0.0, 2.0, 2.0], old=old, rollout=sampler)
    real = MASK.bool()

    def prepared(*overrides, recomputed=True):
        return prepare_batch(BATCH, s, cfg("ppo.advantage_estimator=grpo", *overrides), 0.0, recomputed=recomputed)

    # ppo.overlap alone: token-level TIS at ppo.tis_cap (the samples are one update behind).
    p = prepared("ppo.overlap=true", "ppo.tis_cap=2.0")
    assert p.batch.extras["is_weights"][real].tolist() == pytest.approx([1.0] + [2.0] * 8)
    assert p.metrics["is/weight_mean"] == pytest.approx((1 + 2 * 8) / 9)
    assert p.metrics["is/affected_fraction"] == pytest.approx(8 / 9) and p.metrics["is/sampler_learner_kl"] > 0
    assert "is_weights" not in prepared("ppo.overlap=true", "ppo.tis_cap=0").batch.extras
    assert "is_weights" not in prepared("ppo.overlap=false").batch.extras  # in step: nothing to correct
    # ppo.is_correction on every run: masked (MIS) tokens over the cap leave the loss.
    p = prepared("ppo.is_correction=mis", "ppo.is_cap=3")
    assert p.batch.extras["is_weights"][real].tolist() == pytest.approx([1.0] + [0.0] * 8)
    # Sequence level: one weight per sequence, the product of its token ratios (5^3, 5^2, 5, 5^3).
    p = prepared("ppo.is_correction=tis", "ppo.is_level=sequence", "ppo.is_cap=10")
    w = p.batch.extras["is_weights"]
    assert [w[i][real[i]].tolist() for i in range(4)] == [[10.0] * 3, [10.0] * 2, [5.0], [10.0] * 3]
    assert p.metrics["is/affected_fraction"] == pytest.approx(3 / 4)
    # The engines' own log-probs as pi_old: no mismatch to correct.
    assert "is_weights" not in prepared("ppo.is_correction=tis", recomputed=False).batch.extras


def test_the_metrics_record_of_an_iteration():
    c = cfg("ppo.advantage_estimator=grpo", "ppo.reward_clip=1.5", "ppo.missing_eos_penalty=0.5")
    s = scored([3.0, 0.0, 1.0, 1.0], truncated=(False, True, False, False),
               rollout=torch.full((4, 3), -0.25) * MASK)
    p = prepare_batch(BATCH, s, c, kl_coef=0.05, recomputed=False)
    rewards = {"score": s.scores, "reward/gold": torch.tensor([1.0, 0.0, 1.0, 0.0])}
    record = iteration_record(7, 12, p, s, rewards, 0.05, {"policy_loss": 0.1}, {"flag/mode_collapse": 0.0},
                              {"generate": 2.0, "train": 1.0}, recomputed=True, extra={"rollout/engines": 2})
    assert record["iteration"] == 7 and record["prompts_position"] == 12
    assert record["reward_mean"] == pytest.approx((1.5 - 0.5 + 1.0 + 1.0) / 4)  # clipped and penalised
    assert record["reward/gold_mean"] == 0.5 and record["kl_coef"] == 0.05 and record["kl_to_ref"] == 0.0
    assert record["truncated_fraction"] == 0.25
    assert record["response_length_mean"] == 2.25 and record["response_length_max"] == 3
    assert record["logprob_gap_vllm_learner"] == pytest.approx(0.25)
    assert record["generated_tokens"] == 9 and record["time/iteration_s"] == 3.0
    assert record["prompt_tokens"] == 6 and record["batch_positions"] == 4 * (2 + 3)
    assert record["throughput/generate_tokens_per_s"] == 4.5
    assert record["policy_loss"] == 0.1 and record["rollout/engines"] == 2 and record["flag/mode_collapse"] == 0.0


def test_overlong_shaping_joins_the_final_scores():
    c = cfg("ppo.advantage_estimator=dr_grpo", "ppo.whiten_advantages=false", "rollout.max_new_tokens=4",
            "ppo.overlong_buffer=2", "ppo.overlong_factor=0.5")
    p = prepare_batch(BATCH, scored([1.0, 1.0, 1.0, 1.0]), c, 0.0, recomputed=False)
    # Lengths 3, 2, 1, 3 against a cap of 4 with a buffer of 2: penalties 0.25, 0, 0, 0.25.
    assert p.scores.tolist() == pytest.approx([0.75, 1.0, 1.0, 0.75])
    # Dr. GRPO: group mean subtracted, no std division.
    assert p.advantages[0, 0].item() == pytest.approx(-0.125) and p.advantages[1, 0].item() == pytest.approx(0.125)


def test_the_policy_loss_the_config_asks_for():
    from rlhf_ray.stages.prepare import policy_loss_spec

    spec = policy_loss_spec(cfg("ppo.policy_loss=cispo", "ppo.clip_eps_high=0.28", "ppo.loss_agg=seq-mean-token-sum-norm",
                                "rollout.max_new_tokens=12"))
    assert (spec.kind, spec.clip_eps_high, spec.dual_clip, spec.agg, spec.norm_len) == (
        "cispo", 0.28, None, "seq-mean-token-sum-norm", 12)
    spec = policy_loss_spec(cfg("ppo.dual_clip=3", "ppo.loss_norm_len=100"))
    assert (spec.kind, spec.clip_eps_high, spec.dual_clip, spec.norm_len) == ("ppo", None, 3.0, 100)


ALIKE = {0, 3, 4, 5, 7}  # prompts whose two samples score the same


@pytest.mark.parametrize("rounds", [3, 1])
def test_dynamic_sampling_keeps_groups_that_scored_differently_and_refills(rounds):
    """Prompts "p<k>", two samples each, scored alike when k is in ALIKE. Each round draws as many
    prompts as groups are still missing. With 3 extra rounds allowed the batch is 4 informative
    groups (4 rounds: p0-p3, p4-p5, p6-p7, p8); with 1 it is topped up with the first groups set aside."""
    stream, drawn = iter(range(100)), []

    def draw(count):
        drawn.append(count)
        return [f"p{next(stream)}" for _ in range(count)]

    def generate(prompts):  # two samples per prompt, prompt-major, as the engines return them
        return [Generation(i, [1, int(p[1:])], [2 + s], [-0.5], "stop") for i, p in enumerate(prompts) for s in range(2)]

    def rewards_of(prompts, generations):
        k = [int(prompts[g.prompt_index][1:]) for g in generations]
        score = [0.0 if n in ALIKE else float(g.response_ids[0]) for n, g in zip(k, generations)]
        return {"score": torch.tensor(score), "reward/prompt": torch.tensor(k, dtype=torch.float32)}

    cfg = load_config(None, ["ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=2",
                             "ppo.dynamic_sampling=true", f"ppo.dynamic_sampling_rounds={rounds}"])
    first = draw(4)
    groups = sample_informative_groups(first, generate(first), cfg, rewards_of, draw, generate)
    prompts, generations, rewards = groups.batch()
    if rounds == 3:
        assert drawn == [4, 2, 2, 1] and prompts == ["p1", "p2", "p6", "p8"]
        assert groups.metrics() == {"dynamic/rounds": 4, "dynamic/prompts_drawn": 9, "dynamic/dropped_groups": 5,
                                    "dynamic/filled_groups": 0}
    else:
        assert drawn == [4, 2] and prompts == ["p1", "p2", "p0", "p3"]
        assert groups.metrics() == {"dynamic/rounds": 2, "dynamic/prompts_drawn": 6, "dynamic/dropped_groups": 4,
                                    "dynamic/filled_groups": 2}
    # Rows stay with their prompt and their rewards, renumbered to the batch's prompts.
    assert [g.prompt_index for g in generations] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(f"p{g.prompt_ids[1]}" == prompts[g.prompt_index] for g in generations)
    assert rewards["reward/prompt"].tolist() == [float(p[1:]) for p in prompts for _ in range(2)]
