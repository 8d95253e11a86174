"""Controllers for the coefficient of the KL penalty in the shaped PPO reward.

Each exposes ``value``, ``update(observed_kl, n_steps)`` (called once per rollout batch with
the measured KL to the reference policy) and ``state_dict``/``load_state_dict`` so a resumed run
continues with the adapted coefficient instead of the initial one.
"""

from __future__ import annotations

from typing import Any

KL_CONTROLLER_KINDS = ("fixed", "proportional", "step")


class KLController:
    """Holds the current coefficient and its checkpoint state; subclasses define ``update``."""

    def __init__(self, kl_coef: float) -> None:
        self._kl_coef = float(kl_coef)

    @property
    def value(self) -> float:
        return self._kl_coef

    def update(self, observed_kl: float, n_steps: int) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": self._kl_coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._kl_coef = float(state["kl_coef"])


class FixedKLController(KLController):
    """Constant coefficient; ``update`` is a no-op."""

    def update(self, observed_kl: float, n_steps: int) -> None:
        del observed_kl, n_steps


class ProportionalKLController(KLController):
    """Proportional controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
    Preferences"): steers the observed KL towards ``target``.

    error = clip(observed / target - 1, -0.2, 0.2); coef *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target=}, {horizon=}")
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, observed_kl: float, n_steps: int) -> None:
        error = min(max(float(observed_kl) / self.target - 1.0, -0.2), 0.2)
        self._kl_coef *= 1.0 + error * n_steps / self.horizon


class StepKLController(KLController):
    """Step rule: multiply the coefficient by ``factor`` when the KL exceeds factor * target,
    divide by it when the KL is below target / factor, otherwise keep it. A variant of the
    adaptive KL penalty of Schulman et al. 2017 (which uses thresholds at 1.5x and a factor of
    2); here one factor serves as both. ``n_steps`` is ignored.
    """

    def __init__(self, init_kl_coef: float, target: float, factor: float = 1.5) -> None:
        if target <= 0 or factor <= 1:
            raise ValueError(f"target must be > 0 and factor > 1, got {target=}, {factor=}")
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.factor = float(factor)

    def update(self, observed_kl: float, n_steps: int) -> None:
        del n_steps
        observed_kl = float(observed_kl)
        if observed_kl > self.factor * self.target:
            self._kl_coef *= self.factor
        elif observed_kl < self.target / self.factor:
            self._kl_coef /= self.factor


def make_kl_controller(
    kind: str, init_kl_coef: float, target: float, horizon: float
) -> KLController:
    """Build the controller named ``kind`` ("fixed", "proportional" or "step")."""
    if kind == "fixed":
        return FixedKLController(init_kl_coef)
    if kind == "proportional":
        return ProportionalKLController(init_kl_coef, target, horizon)
    if kind == "step":
        return StepKLController(init_kl_coef, target)
    raise ValueError(
        f"unknown KL controller kind {kind!r}; valid kinds: {', '.join(KL_CONTROLLER_KINDS)}"
    )
