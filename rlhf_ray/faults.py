"""What ``faults.*`` limits, and the errors raised when a limit is used up: shared by the rollout
pool (engine replacements) and the driver (non-finite batches, restarts)."""

from __future__ import annotations


class ActorFailureError(RuntimeError):
    """An actor died and the run may not (or may no longer) restart or replace it."""


class NonFiniteError(RuntimeError):
    """Too many batches in a row had non-finite values; the message names the phase."""


class FaultCounter:
    """Non-finite batches (in a row and in all), engine replacements and restarts: what
    ``faults.*`` limits. Checkpointed with the driver's state, except restarts, which count this
    process's recoveries and are not rolled back by a resume."""

    def __init__(self, max_consecutive_nonfinite: int, max_engine_replacements: int):
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.max_engine_replacements = max_engine_replacements
        self.nonfinite_batches = self.consecutive_nonfinite = self.engine_replacements = 0
        self.restarts = 0

    def batch_done(self, nonfinite_phase: str | None, iteration: int) -> None:
        """Counts a batch; raises ``NonFiniteError`` once more than the allowed number in a row had
        non-finite values (``nonfinite_phase`` names where; None for a clean batch)."""
        if nonfinite_phase is None:
            self.consecutive_nonfinite = 0
            return
        self.nonfinite_batches += 1
        self.consecutive_nonfinite += 1
        limit = self.max_consecutive_nonfinite
        if self.consecutive_nonfinite > limit:
            raise NonFiniteError(
                f"training stopped at iteration {iteration}: {self.consecutive_nonfinite} batches in a row had "
                f"non-finite values, the last in the {nonfinite_phase!r} phase "
                f"(faults.max_consecutive_nonfinite={limit})")

    def replacements_left(self, wanted: int) -> bool:
        return self.engine_replacements + wanted <= self.max_engine_replacements

    def take_replacements(self, count: int, iteration: int | None = None) -> None:
        """Counts ``count`` dead engines about to be replaced; refuses past the limit."""
        if not self.replacements_left(count):
            when = f" at iteration {iteration}" if iteration is not None else ""
            raise ActorFailureError(f"{count} rollout engine(s) died{when} and "
                                    f"faults.max_engine_replacements={self.max_engine_replacements} is used up")
        self.engine_replacements += count

    def metrics(self) -> dict[str, int]:
        return {"faults/nonfinite_batches": self.nonfinite_batches,
                "faults/engine_replacements": self.engine_replacements, "faults/restarts": self.restarts}

    def state_dict(self) -> dict[str, int]:
        return {"nonfinite_batches": self.nonfinite_batches, "consecutive_nonfinite": self.consecutive_nonfinite,
                "engine_replacements": self.engine_replacements}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """A checkpoint's counts; replacements never go back (the limit is on replacements made)."""
        self.nonfinite_batches = state["nonfinite_batches"]
        self.consecutive_nonfinite = state["consecutive_nonfinite"]
        self.engine_replacements = max(self.engine_replacements, state["engine_replacements"])
