"""The PPO driver's safeguards, configured: regularise scores, measure hacking and collapse,
decide on early stops. The measures themselves are pure functions in ``rlhf_ray.safeguards``."""

from __future__ import annotations

import math

import torch

from rlhf_ray import safeguards as sg
from rlhf_ray.config import SafeguardsConfig


class RolloutGuards:
    def __init__(self, cfg: SafeguardsConfig):
        self.cfg = cfg
        self.thresholds = sg.CollapseThresholds(
            min_distinct_1=cfg.collapse_min_distinct_1 or None,
            max_pairwise_similarity=cfg.collapse_max_pairwise_similarity if cfg.collapse_max_pairwise_similarity < 1
            else None)
        self.overopt = sg.OverOptimisationMonitor(cfg.overopt_window, cfg.overopt_min_proxy_gain,
                                                  cfg.overopt_max_gold_gain)

    def regularise(self, scores: torch.Tensor, prompts: list[str], responses: list[str],
                   lengths: torch.Tensor) -> torch.Tensor:
        """Applies the configured penalties and bonus to the sequence scores (all off by default)."""
        c = self.cfg
        if c.length_penalty_coef:
            scores = sg.length_penalty(scores, lengths, c.length_penalty_threshold, c.length_penalty_coef)
        if c.repetition_penalty_coef:
            scores = sg.repetition_penalty(scores, responses, c.repetition_penalty_coef, c.repetition_ngram,
                                           c.diversity_unit)
        if c.diversity_bonus:
            scores = scores + torch.tensor(sg.diversity_bonus(responses, prompts, c.diversity_bonus, c.diversity_unit))
        return scores

    def inspect(self, prompts: list[str], responses: list[str], lengths: torch.Tensor, scores: torch.Tensor,
                gold: torch.Tensor | None) -> dict[str, float]:
        """One batch's hacking and diversity measures and flags, for metrics.jsonl."""
        c = self.cfg
        diversity = sg.diversity_metrics(responses, sg.group_by_prompt(prompts, responses), c.diversity_unit)
        out = {
            "hacking/verbosity_correlation": sg.verbosity_correlation(lengths.tolist(), scores.tolist()),
            "hacking/format_gaming_rate": sg.format_gaming_rate(responses),
            **{f"diversity/{k}": v for k, v in diversity.items()},
            "flag/mode_collapse": float(sg.collapse_flag(diversity, self.thresholds)),
        }
        if c.hacking_phrases:
            out["hacking/keyword_stuffing_rate"] = sg.keyword_stuffing_rate(responses, c.hacking_phrases)
        if gold is not None:
            out["gold_score_mean"] = gold.mean().item()
            out["flag/over_optimisation"] = float(self.overopt.update(scores.mean().item(), gold.mean().item()))
        return out

    def stop_reason(self, record: dict) -> str | None:
        if self.cfg.stop_on_overoptimisation and record.get("flag/over_optimisation"):
            gains = self.overopt.gains
            return (f"over-optimisation: proxy reward rose by {gains[0]:.3f} while the gold score changed by "
                    f"{gains[1]:.3f} over the last {self.cfg.overopt_window} iterations")
        kl = record.get("kl_to_ref", 0.0)
        if self.cfg.max_kl and math.isfinite(kl) and kl > self.cfg.max_kl:
            return f"KL to the reference {kl:.3f} exceeds safeguards.max_kl={self.cfg.max_kl}"
        return None

    def state_dict(self) -> dict:
        return {"overopt": self.overopt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.overopt.load_state_dict(state["overopt"])
