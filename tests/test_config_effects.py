"""Config keys that no other test sets, each shown to change what it should, through the code the
config feeds (no Ray: the pieces are plain functions and classes)."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray import algo
from rlhf_ray.config import load_config


def cfg(*overrides):
    return load_config(None, ["data.task=arithmetic", *overrides])


def test_data_shuffle_orders_the_prompt_stream():
    from rlhf_ray.data.prompts import PromptStream, run_prompts

    prompts = run_prompts(cfg("data.num_prompts=20").data, seed=0)
    in_order = PromptStream(prompts, 0, cfg("data.shuffle=false").data.shuffle).next_batch(20)
    shuffled = PromptStream(prompts, 0, cfg("data.shuffle=true").data.shuffle).next_batch(20)
    assert in_order == prompts and shuffled != prompts and sorted(shuffled) == sorted(prompts)


def test_data_prompt_overflow_truncates_from_the_left_or_drops():
    from rlhf_ray.data import formats
    from rlhf_ray.models.tiny import build_tokenizer

    tok = build_tokenizer()
    prompts = ["1+1=", "123456789+987654321="]
    for overflow, want in (("truncate", ["1+1=", "654321="]), ("drop", ["1+1="])):
        c = cfg(f"data.prompt_overflow={overflow}", "data.max_prompt_tokens=7").data
        assert formats.apply_prompt_limit(prompts, tok, c.max_prompt_tokens, c.prompt_overflow) == want


def test_data_sft_error_rate_is_the_share_of_wrong_demonstrations():
    from rlhf_ray.data import formats
    from rlhf_ray.tasks import get_task

    task = get_task("arithmetic", 0)
    for rate in (0.0, 0.5):
        examples = formats.task_sft(task, 400, cfg(f"data.sft_error_rate={rate}").data.sft_error_rate)
        wrong = sum(task.gold_score(e.prompt, e.response) < 1 for e in examples) / len(examples)
        assert wrong == pytest.approx(rate, abs=0.08)


def test_reward_function_weights_weigh_each_rule():
    from rlhf_ray.actors.scorers import RewardActor
    from rlhf_ray.data.batch import RolloutBatch

    c = cfg("scorers.reward_functions=[rlhf_ray.tasks.rewards:digit_fraction,rlhf_ray.tasks.rewards:digit_fraction]",
            "scorers.reward_function_weights=[2.0,0.5]", "data.task=")
    actor = RewardActor([], "mean", c.scorers.reward_functions, c.scorers.reward_function_weights, "cpu", 8)
    batch = RolloutBatch.from_token_lists([[1], [1]], [[2], [3]], pad_id=0)
    out = actor.score(batch, ["q", "q"], ["12ab", "xy"])
    assert out["score"].tolist() == pytest.approx([2.5 * 0.5, 0.0])


def test_reward_combine_takes_the_mean_or_the_worst_member(tiny_model_dir, tmp_path):
    """Two real reward models (tiny backbone, differently seeded heads) scored by the reward actor."""
    from rlhf_ray.actors.scorers import RewardActor
    from rlhf_ray.data.batch import RolloutBatch
    from rlhf_ray.models.heads import RewardModel

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = tmp_path / f"rm{seed}"
        RewardModel.from_base(tiny_model_dir).save_pretrained(path)
        paths.append(str(path))
    batch = RolloutBatch.from_token_lists([[5, 6], [7]], [[8, 9], [10, 11, 12]], pad_id=0)
    scores = {}
    for combine in ("mean", "min"):
        c = cfg(f"model.reward_combine={combine}", f"model.reward=[{paths[0]},{paths[1]}]", "data.task=")
        out = RewardActor(c.model.reward, c.model.reward_combine, [], [], "cpu", 8).score(batch, ["", ""], ["", ""])
        scores[combine] = out["score"]
        members = torch.stack([out["reward/rm0"], out["reward/rm1"]])
    assert torch.allclose(scores["mean"], members.mean(0)) and torch.allclose(scores["min"], members.min(0).values)
    assert not torch.allclose(scores["mean"], scores["min"])


def test_entropy_and_value_clip_coefficients_reach_their_losses():
    """ppo.entropy_coef subtracts the entropy bonus the learner computes; ppo.value_clip_eps bounds
    how far the critic's new values may move before the clipped term takes over."""
    values, old, returns, mask = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[3.0]]), torch.ones(1, 1)
    for eps, want in ((cfg("ppo.value_clip_eps=0.5").ppo.value_clip_eps, 0.5 * 2.5 ** 2),
                      (cfg("ppo.value_clip_eps=5").ppo.value_clip_eps, 0.5 * 1.0 ** 2)):
        assert algo.ppo_value_loss(values, old, returns, mask, eps, "token-mean").loss.item() == pytest.approx(want)
    assert cfg("ppo.entropy_coef=0.01").ppo.entropy_coef == 0.01  # PolicyLearnerActor.train_step: loss - coef * H


def test_proportional_kl_controller_follows_kl_target_and_horizon():
    c = cfg("ppo.kl_controller=proportional", "ppo.kl_coef=0.1", "ppo.kl_target=2.0", "ppo.kl_horizon=100").ppo
    ctl = algo.make_kl_controller(c.kl_controller, c.kl_coef, c.kl_target, c.kl_horizon)
    ctl.update(4.0, n_steps=10)  # KL twice the target: error clipped to 0.2, times 10/100
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    slow = algo.make_kl_controller(c.kl_controller, c.kl_coef, c.kl_target, 1000)
    slow.update(4.0, n_steps=10)
    assert 0.1 < slow.value < ctl.value


def test_parity_atol_is_the_largest_gap_the_check_accepts():
    from rlhf_ray.sync.parity import WeightSyncParityError, check_parity, parity_tolerance

    def tolerance(*overrides):
        c = cfg(*overrides)
        return parity_tolerance(c.model.dtype, c.sync.parity_atol, c.sync.parity_mean_atol,
                                c.sync.parity_greedy_agreement)

    learner, engine = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -2.004]])
    check_parity(learner, engine, atol=tolerance("sync.parity_atol=0.01").max_abs)
    with pytest.raises(WeightSyncParityError, match="tolerance 0.001"):
        check_parity(learner, engine, atol=tolerance().max_abs)  # float32's default
    assert tolerance("model.dtype=bfloat16").max_abs == 1.0
    assert tolerance("model.dtype=bfloat16", "sync.parity_mean_atol=0.2").mean_abs == 0.2
    assert tolerance("sync.parity_greedy_agreement=0.75").greedy_agreement == 0.75


def test_diversity_unit_counts_words_or_characters():
    from rlhf_ray.stages.guards import RolloutGuards

    prompts, responses, lengths = ["a", "a"], ["12 12", "21 21"], torch.tensor([5, 5])
    words = RolloutGuards(cfg("safeguards.diversity_unit=word").safeguards).inspect(
        prompts, responses, lengths, torch.zeros(2), None)
    chars = RolloutGuards(cfg("safeguards.diversity_unit=char").safeguards).inspect(
        prompts, responses, lengths, torch.zeros(2), None)
    # Words: "12" and "21" are 2 distinct of 4; characters: "1", "2", " " are 3 distinct of 10.
    assert words["diversity/distinct_1"] == pytest.approx(2 / 4)
    assert chars["diversity/distinct_1"] == pytest.approx(3 / 10)


def test_learner_weight_decay_and_grad_clip_reach_deepspeed():
    from rlhf_ray.actors.placement import learner_spec
    from rlhf_ray.engines.deepspeed_strategy import DeepSpeedStrategy

    c = cfg("policy.weight_decay=0.1", "policy.grad_clip=0.5", "critic.weight_decay=0.2", "critic.grad_clip=0")
    for section in (c.policy, c.critic):
        spec = learner_spec(c, section, "unused")
        ds = DeepSpeedStrategy(zero_stage=spec.zero_stage, lr=spec.lr, weight_decay=spec.weight_decay,
                               grad_clip=spec.grad_clip, backend="cpu").ds_config()
        assert ds["optimizer"]["params"]["weight_decay"] == section.weight_decay
        assert ds["gradient_clipping"] == section.grad_clip


def test_prefix_caching_and_engine_choice_reach_every_engine():
    from rlhf_ray.actors.rollout_pool import engine_options

    on = engine_options(cfg("rollout.enable_prefix_caching=true"), "m")
    off = engine_options(cfg("rollout.enable_prefix_caching=false", "rollout.engine=hf"), "m")
    assert (on["enable_prefix_caching"], on["engine"]) == (True, "vllm")
    assert (off["enable_prefix_caching"], off["engine"]) == (False, "hf")


def test_collect_min_score_gap_and_eval_limits_are_checked():
    with pytest.raises(Exception, match="collect.min_score_gap: must be >= 0"):
        cfg("collect.min_score_gap=-1")
    with pytest.raises(Exception, match="eval.max_reference_texts: must be >= 1"):
        cfg("eval.max_reference_texts=0")


def test_rollout_stop_strings_become_stop_tokens_and_longer_ones_are_refused():
    from rlhf_ray.data.tokenize import stop_token_ids
    from rlhf_ray.errors import BadInputError
    from rlhf_ray.models.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})  # a chat template's end of turn
    ids = stop_token_ids(tok, cfg("rollout.stop=['<|im_end|>', '=']").rollout.stop)
    assert ids == (tok.eos_token_id, *tok.convert_tokens_to_ids(["<|im_end|>", "="]))
    assert stop_token_ids(tok, cfg().rollout.stop) == (tok.eos_token_id,)
    with pytest.raises(BadInputError, match=r"rollout\.stop: '<end>' is 5 tokens"):
        stop_token_ids(tok, cfg("rollout.stop=[<end>]").rollout.stop)


def test_model_dtype_reaches_every_role_and_the_reward_model_scores_in_it(tiny_model_dir, tmp_path):
    """model.dtype: the engines, the learners (``LearnerSpec``) and both scorers load in it; a
    bf16 reward model scores close to its fp32 self."""
    from rlhf_ray.actors.placement import learner_spec
    from rlhf_ray.actors.rollout_pool import engine_options
    from rlhf_ray.actors.scorers import ReferenceActor, RewardActor
    from rlhf_ray.data.batch import RolloutBatch
    from rlhf_ray.models.heads import RewardModel

    c = cfg("model.dtype=bfloat16")
    assert engine_options(c, tiny_model_dir)["dtype"] == "bfloat16"
    assert learner_spec(c, c.policy, tiny_model_dir).dtype == learner_spec(c, c.critic, tiny_model_dir).dtype == "bfloat16"
    assert next(ReferenceActor(tiny_model_dir, c.model.dtype, "cpu", 8).model.parameters()).dtype == torch.bfloat16
    torch.manual_seed(0)
    RewardModel.from_base(tiny_model_dir).save_pretrained(tmp_path / "rm")
    batch = RolloutBatch.from_token_lists([[5, 6], [7]], [[8, 9], [10, 11, 12]], pad_id=0)
    scores = {}
    for dtype in ("float32", "bfloat16"):
        actor = RewardActor([str(tmp_path / "rm")], "mean", [], [], "cpu", 8, dtype=cfg(f"model.dtype={dtype}").model.dtype)
        assert {p.dtype for p in actor.models[0].model.parameters()} == {getattr(torch, dtype)}
        scores[dtype] = actor.score(batch, ["", ""], ["", ""])["score"]
    assert scores["bfloat16"].dtype == torch.float32 and torch.allclose(scores["bfloat16"], scores["float32"], atol=0.05)


def test_learner_sections_reach_the_learner_spec():
    """policy.* and critic.* (zero stage, offload, bf16, checkpointing) become each group's
    ``LearnerSpec``; the two sections stay apart."""
    from rlhf_ray.actors.placement import learner_spec

    c = cfg("critic.offload_params=true", "critic.zero_stage=3", "critic.bf16=true", "critic.gradient_checkpointing=true",
            "policy.offload_optimizer=true")
    critic, policy = learner_spec(c, c.critic, "m"), learner_spec(c, c.policy, "m")
    assert (critic.offload_params, critic.zero_stage, critic.bf16, critic.gradient_checkpointing) == (True, 3, True, True)
    assert (policy.offload_params, policy.bf16, policy.gradient_checkpointing) == (False, False, False)
    assert policy.offload_optimizer and not critic.offload_optimizer
