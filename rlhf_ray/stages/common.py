"""What every stage does before its loop: the run directory, the models, Ray."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from rlhf_ray.config import RunConfig, dump_config
from rlhf_ray.platform import detect

BUILTIN_TINY = "builtin:tiny"
BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"  # a real chat model, converted offline (models.pretrained)


def prepare_run(cfg: RunConfig, pays_rewards: bool = False) -> Path:
    """Checks the model folders, tracker packages and secrets (``check_inputs``) and, for a stage that
    ``pays_rewards``, that the config names a reward; returns the run's folder, which is neither
    created nor written until ``begin``."""
    from rlhf_ray.config import ConfigError, check_config

    check_config(cfg)  # a config built or changed in Python (a loaded one was checked on load)
    if pays_rewards and (problems := cfg.reward_problems()):
        raise ConfigError("\n".join(f"{key}: {msg}" for key, msg in problems))
    check_inputs(cfg)
    return Path(cfg.run_dir).resolve()


def begin(cfg: RunConfig, run_dir: Path, model_path: str | None = None) -> str | None:
    """Every input was checked: creates ``run_dir``, records the config in it (a failed start
    leaves the previous run's untouched), moves a staged ``builtin:tiny`` model (from
    ``resolve_policy_path``) into ``run_dir/base_model`` and joins or starts Ray. Returns where
    ``model_path`` is now."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    if model_path in _STAGED_MODELS:
        from rlhf_ray.models.loading import atomic_dir

        with atomic_dir(run_dir / "base_model") as tmp:
            shutil.move(model_path, tmp)
        shutil.rmtree(Path(model_path).parent, ignore_errors=True)
        model_path = str(run_dir / "base_model")
    init_ray(cfg)
    return model_path


# builtin:tiny models built before the run's folder may be written (their tokenizer reads the data).
_STAGED_MODELS: set[str] = set()


def resolve_policy_path(cfg: RunConfig) -> str:
    """``builtin:tiny`` becomes a tiny model built offline into a staging folder, moved into the
    run directory by ``begin`` once every input is checked (its tokenizer knows the tool-call
    characters when the run or its task uses tools; its context holds ``rollout.max_model_len``).
    ``builtin:smollm2-135m-instruct`` becomes its cached folder (downloaded and converted on first use)."""
    if cfg.model.policy == BUILTIN_SMOLLM2:
        from rlhf_ray.models.pretrained import ensure_smollm2

        return str(ensure_smollm2())
    if cfg.model.policy != BUILTIN_TINY:
        from rlhf_ray.models.loading import check_model_path

        return check_model_path(cfg.model.policy)
    from dataclasses import replace

    from rlhf_ray.models.tiny import TinyModelSpec, build_tiny_model
    from rlhf_ray.tasks import ENVIRONMENTS

    spec = TinyModelSpec.of_width(cfg.model.tiny_hidden_size, cfg.model.tiny_layers, seed=cfg.seed)
    # RoPE has no position weights: a longer context leaves the weights as they are.
    spec = replace(spec, tool_chars=cfg.agent.enabled or cfg.data.task in ENVIRONMENTS,
                   max_positions=max(spec.max_positions, cfg.rollout.max_model_len))
    staging = Path(tempfile.mkdtemp(prefix="rlhf-ray-base-model-"))
    atexit.register(shutil.rmtree, staging, True)  # a start refused after the build leaves nothing
    path = str(build_tiny_model(staging / "base_model", spec))
    _STAGED_MODELS.add(path)
    return path


def check_inputs(cfg: RunConfig) -> None:
    """Model folders, tracker packages, secrets and the agent's environment the run needs, each
    checked before any actor starts; the error names the config key."""
    from rlhf_ray.config import ConfigError
    from rlhf_ray.models.heads import check_score_head
    from rlhf_ray.models.loading import check_model_folder
    from rlhf_ray.tracking import missing_tracker_packages

    paths = [("model.policy", cfg.model.policy if cfg.model.policy not in (BUILTIN_TINY, BUILTIN_SMOLLM2) else ""),
             ("model.critic", cfg.model.critic), *((f"model.reward[{i}]", p) for i, p in enumerate(cfg.model.reward)),
             ("rm.init", cfg.rm.init)]
    for key, path in paths:
        if path:
            try:
                folder = check_model_folder(path)
                if key != "model.policy":  # read as a reward or value model (or its start): one score
                    check_score_head(folder)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{key}: {e}") from None
    if cfg.agent.enabled:  # the environment class loads (a pipeline would find out only at its PPO stage)
        from rlhf_ray.stages.agent_rollout import environment_class

        environment_class(cfg)
    missing = missing_tracker_packages(cfg)
    if missing:
        raise ConfigError(f"logging.trackers: {', '.join(missing)} not installed: pip install 'rlhf-ray[trackers]' "
                          f"(or leave the tracker out of logging.trackers)")
    token = cfg.scorers.http.token_env
    if cfg.scorers.http.urls and token and not os.environ.get(token):
        raise ConfigError(f"scorers.http.token_env: the environment variable {token} (the reward endpoint's "
                          f"token) is not set")


def check_model_fits(cfg: RunConfig, model_path: str) -> None:
    """Rejects a rollout plan the model's shape cannot take, before any actor starts."""
    from rlhf_ray.config import ConfigError
    from rlhf_ray.config.cluster_fit import model_problems, read_model_config

    problems = model_problems(cfg, read_model_config(model_path))
    if problems:
        raise ConfigError("config does not fit the model " + model_path + ":\n"
                          + "\n".join(f"  {key}: {msg}" for key, msg in problems))
    check_lora_targets(cfg, "policy", model_path)
    if cfg.uses_critic:
        check_lora_targets(cfg, "critic", cfg.model.critic or model_path)
    if cfg.uses_critic and cfg.model.critic:
        check_critic_reads_policy_ids(cfg, model_path)


def check_critic_reads_policy_ids(cfg: RunConfig, policy_path: str) -> None:
    """The critic values the policy's token ids as they are: a ``model.critic`` start (say a
    reward model of another family) whose vocabulary gives any of the policy's tokens another id
    is refused. A vocabulary with extra tokens (a reward model's added pad token) reads them alike."""
    from rlhf_ray.config import ConfigError
    from rlhf_ray.models.loading import has_tokenizer, load_tokenizer

    critic = cfg.model.critic
    if not has_tokenizer(critic):
        return
    critic_vocab = load_tokenizer(critic, cfg.model.trust_remote_code).get_vocab()
    policy_vocab = load_tokenizer(policy_path, cfg.model.trust_remote_code).get_vocab()
    moved = [token for token, i in policy_vocab.items() if critic_vocab.get(token) != i]
    if moved:
        raise ConfigError(f"model.critic: the tokenizer of {critic} gives {len(moved)} of the policy's "
                          f"{len(policy_vocab)} tokens another id (e.g. {moved[0]!r}); the critic reads the "
                          f"policy's token ids, so start it from a model with the policy's vocabulary")


def check_lora_targets(cfg: RunConfig, section: str, model_path: str) -> None:
    """Refuses ``<section>.lora.target_modules`` naming no module of the model (GPT-2 has no
    q_proj), before any actor starts; the message lists the model's linear layers."""
    from rlhf_ray.config import ConfigError
    from rlhf_ray.models.lora import missing_target_modules

    lora = getattr(cfg, section).lora
    if not (lora.rank and lora.target_modules):
        return
    missing, linear = missing_target_modules(model_path, lora.target_modules, cfg.model.trust_remote_code)
    if missing:
        raise ConfigError(f"{section}.lora.target_modules: {', '.join(missing)} name no module of {model_path}; "
                          f"its linear layers: {', '.join(linear)} (or leave the list empty: every linear layer)")


def reward_sources(cfg: RunConfig) -> tuple[list, list[float]]:
    """Rule-reward functions and their weights, the task's gold scorer included when the prompts
    are the task's (a run on ``data.prompts`` is scored by its own rewards only)."""
    from rlhf_ray.tasks import GOLD_REWARD

    functions = list(cfg.scorers.reward_functions)
    weights = list(cfg.scorers.reward_function_weights) or [1.0] * len(functions)
    if cfg.data.task and not cfg.data.prompts:
        # With reward models or criteria, the gold scorer is logged beside the proxy reward
        # (weight 0), so over-optimisation of the learned reward shows up in the metrics.
        paid = cfg.scorers.use_task_gold_as_reward and not cfg.model.reward and not cfg.scorers.criteria
        functions.append(GOLD_REWARD[cfg.data.task])
        weights.append(1.0 if paid else 0.0)
    return functions, weights


def check_reward_functions(cfg: RunConfig, prompts: list[str] | None) -> None:
    """Every rule reward (``scorers.reward_functions``, ``module:function`` criteria) imports, takes
    ``(prompts, responses, ...)`` and finds each column it names in every one of ``prompts``' rows
    (``None``: rows not read, columns not checked):
    else ``ConfigError`` naming the key, the function and the columns there are, before any actor
    starts (Ray workers would find out after the engines started)."""
    from rlhf_ray.config import ConfigError
    from rlhf_ray.data.formats import row_columns
    from rlhf_ray.tasks.rewards import signature_problem

    names = dict.fromkeys(name for p in prompts or [] for name in row_columns(p))
    missing = {name: sum(name not in row_columns(p) for p in prompts) for name in names}
    in_every_row = [name for name, n in missing.items() if n == 0]
    specs = [*((f"scorers.reward_functions[{i}]", spec) for i, spec in enumerate(cfg.scorers.reward_functions)),
             *((f"scorers.criteria.{name}", judge) for name, judge in cfg.scorers.criteria.items()
               if not (isinstance(judge, str) and judge.startswith("rm:")))]
    for key, spec in specs:
        if problem := signature_problem(spec, None if prompts is None else in_every_row, missing,
                                        len(prompts or [])):
            raise ConfigError(f"{key}: {problem}")


def check_config_inputs(cfg: RunConfig) -> None:
    """``rlhf-ray config check`` past the config's own values, without models (a plan is checked
    before its models are downloaded or trained): the agent's environment loads, and each rule
    reward imports and finds its columns in the prompt rows it will score (read without a tokenizer)."""
    from rlhf_ray.data.prompts import run_prompts
    from rlhf_ray.stages.eval import held_out_prompts

    if cfg.agent.enabled:
        from rlhf_ray.stages.agent_rollout import environment_class

        environment_class(cfg)
    data = cfg.data
    # A hub dataset is read by the stage that needs it (it may not be reachable where plans are checked).
    local = all(Path(source).exists() for source in (data.prompts, data.eval_prompts) if source)
    if local:
        prompts = run_prompts(data, cfg.seed) if data.prompts or data.task else []
        check_reward_functions(cfg, prompts + held_out_prompts(cfg))
    else:
        check_reward_functions(cfg, None)


QUIET_ENV = {  # engines' start-up chatter hides the progress bars; RLHF_RAY_VERBOSE=1 keeps it
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning",
}


def init_ray(cfg: RunConfig, log_to_driver: bool = True) -> None:
    """Joins the cluster named by ``ray_address`` or starts a local Ray bound to localhost."""
    import ray

    if ray.is_initialized():
        return
    platform = detect(cfg.backend)
    quiet = {} if os.environ.get("RLHF_RAY_VERBOSE") else QUIET_ENV
    env = {**platform.process_env(), **{k: os.environ.get(k, v) for k, v in quiet.items()}}
    os.environ.update(env)
    if cfg.ray_address:
        # A job's driver already runs in the job's runtime env; every actor applies the
        # platform's environment itself (``Platform.apply_env``) before importing its engine.
        ray.init(address=cfg.ray_address, log_to_driver=log_to_driver)
    else:
        protect_ray_token()
        ray.init(include_dashboard=False, dashboard_host="127.0.0.1", runtime_env={"env_vars": env}, log_to_driver=log_to_driver,
                 num_cpus=max(8, os.cpu_count() or 1))  # logical slots: roles mostly wait on each other


def protect_ray_token() -> Path | None:
    """The token file of a local Ray, readable by its owner only; returns its path (None when
    token authentication is off or the token comes from the environment).

    Ray 2.60 turns token authentication on for a local cluster, but writes ``~/.ray/auth_token``
    with the default umask (0644: every user of the machine could read it). Its gRPC servers listen
    on every interface whatever the node address, so the token is what keeps other hosts out:
    it is created here with mode 0600 before Ray writes one, and an existing one is tightened."""
    import secrets

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        path.chmod(0o600)
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # Ray's own generator: 256 random bits, hex
    return path
