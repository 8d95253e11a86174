"""Checkpoints and recovery of a PPO run, as the trainer's mixin: skip a batch with non-finite
values, save an atomic checkpoint, resume from the newest complete one, and restart every actor
after a learner or scorer died.
The file mechanics are in :mod:`rlhf_ray.stages.checkpoint`; what a checkpoint holds of the
driver is what ``PPOTrainer._reset_state`` sets up."""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.actors.placement import shutdown_roles
from rlhf_ray.actors.worker_group import get_all
from rlhf_ray.config import config_to_dict, dump_config
from rlhf_ray.faults import ActorFailureError
from rlhf_ray.stages import checkpoint as ckpt
from rlhf_ray.stages import prepare as prep
from rlhf_ray.tracking import PhaseTimer, read_metrics


class Recovery:
    """Needs of its host: ``cfg``, ``run_dir``, ``roles``, ``iteration``, ``prompts``, ``kl_ctl``,
    ``guards``, ``faults``, ``_pending``, the logs and ``trackers``, ``_reset_state``, ``_launch``
    and ``_sync_weights``."""

    def _skip_batch(self, phase: str, position: int, prompts: list[str], timer: PhaseTimer) -> dict:
        """A batch with non-finite values in ``phase`` trains nothing; its prompts are used up and
        the iteration counts, so the data order and the metrics stay those of a clean run."""
        self.faults.batch_done(phase, self.iteration + 1)
        self.iteration += 1
        print(f"ppo: iteration {self.iteration}: non-finite {phase} values, batch skipped "
              f"({self.faults.consecutive_nonfinite} in a row)")
        record = prep.skipped_record(self.iteration, position, phase, timer.seconds, self.faults.metrics())
        self.metrics.write(record)
        self.prompt_log.write({"iteration": self.iteration, "position": position, "prompts": prompts})
        return record

    def save_checkpoint(self) -> Path:
        """Everything a resumed run needs, as one atomic ``checkpoints/iter-N`` folder."""
        def write_learners(tmp: Path) -> None:
            get_all(self.roles.policy.submit_all("save_checkpoint", str(tmp / "policy")).refs
                    + self.roles.critic.submit_all("save_checkpoint", str(tmp / "critic")).refs)

        # A batch sampled ahead (ppo.overlap) is not trained yet: a resumed run samples it again.
        position = self._pending.position if self._pending else self.prompts.position
        state = {"iteration": self.iteration, "prompts_position": position,
                 "kl_controller": self.kl_ctl.state_dict(), "guards": self.guards.state_dict(),
                 "faults": self.faults.state_dict()}
        return ckpt.save_checkpoint(self.run_dir, self.iteration, state, dump_config(self.cfg), write_learners,
                                    self.cfg.checkpoint.keep_last)

    def _resume_point(self, asked: bool = False) -> Path | None:
        """The newest complete checkpoint (incomplete ones are skipped with a warning), checked to
        be resumable by this config; None when there is none. ``asked``: the user asked to resume
        (``--resume``), so a run_dir that holds an earlier run's logs but no checkpoint that loads
        is refused: starting over would cut those logs back to nothing."""
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is not None:
            ckpt.check_resumable(path, config_to_dict(self.cfg))
            return path
        if asked:
            damaged = ckpt.damaged_checkpoints(self.run_dir)
            logged = (Path(self.run_dir) / "metrics.jsonl").is_file() and read_metrics(self.run_dir)
            if damaged or logged:
                why = (f"no checkpoint in {ckpt.checkpoint_root(self.run_dir)} can be resumed ({'; '.join(damaged)})"
                       if damaged else f"{self.run_dir} holds the metrics of an earlier run but no checkpoint")
                raise ckpt.CheckpointError(f"cannot resume: {why}. Nothing was changed: pick a new run_dir, or "
                                           f"remove the checkpoints and logs there to start over")
        return None

    def resume(self, path: Path | None) -> bool:
        """Continues from the checkpoint at ``path`` (from ``_resume_point``), or from iteration 0.
        Logs written after it by a run that died are cut back to it."""
        if path is None:
            print(f"ppo: no complete checkpoint in {self.run_dir}, starting at iteration 0")
            self._restore(None)
            return False
        self._restore(path)
        print(f"ppo: resumed from {path} at iteration {self.iteration}")
        return True

    def _restore(self, path: Path | None) -> None:
        self._reset_state()
        if path is not None:
            get_all(self.roles.policy.submit_all("load_checkpoint", str(path / "policy")).refs
                    + self.roles.critic.submit_all("load_checkpoint", str(path / "critic")).refs)
            state = ckpt.load_trainer_state(path)
            self.iteration = state["iteration"]
            self.prompts.position = state["prompts_position"]
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.guards.load_state_dict(state["guards"])
            self.faults.load_state_dict(state["faults"])
            self._sync_weights()  # the engines started from the initial policy
        for log in (self.metrics, self.samples, self.prompt_log):
            log.rewind(self.iteration)
        self.trackers.rewind(self.iteration)

    def restart_after_failure(self, error: Exception) -> None:
        """A learner or scorer died: every actor is replaced and the run goes on from the newest
        complete checkpoint, at most ``faults.max_restarts`` times."""
        limit = self.cfg.faults.max_restarts
        if self.faults.restarts >= limit:
            raise ActorFailureError(f"an actor died during iteration {self.iteration + 1} and "
                                    f"faults.max_restarts={limit} restarts are used up: {error}") from error
        self.faults.restarts += 1
        print(f"ppo: an actor died during iteration {self.iteration + 1} ({type(error).__name__}); "
              f"restart {self.faults.restarts} of {limit} from the last checkpoint")
        shutdown_roles(self.roles)
        path = self._resume_point()
        self._launch()
        self.resume(path)

