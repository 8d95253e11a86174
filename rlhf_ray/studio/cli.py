"""``rlhf-ray annotate serve|add-annotator|stats|export`` and ``rlhf-ray view RUN_DIR``.

Hooked into ``rlhf_ray.cli`` by two calls: ``add_studio_commands(sub)`` where the sub-commands are
made, and ``return run_studio_command(args)`` for ``args.command in STUDIO_COMMANDS`` (before any
config is loaded). Also runnable alone: ``python -m rlhf_ray.studio annotate serve ...``.
"""

from __future__ import annotations

import argparse
import json
import sys

from rlhf_ray.studio.server import DEFAULT_CRITERIA, MAX_BODY

STUDIO_COMMANDS = ("annotate", "view")


def _net(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only unless --allow-remote)")
    p.add_argument("--port", type=int, default=port, help="port (0: any free port)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding a non-loopback address (no TLS: tokens travel in clear)")


def add_studio_commands(subparsers) -> None:
    """Adds ``annotate`` and ``view`` to an argparse sub-parser group."""
    ann = subparsers.add_parser("annotate", help="label preference pairs in the browser; agreement; export")
    acts = ann.add_subparsers(dest="studio_action", required=True)

    serve = acts.add_parser("serve", help="serve the labelling page")
    serve.add_argument("--db", required=True, help="SQLite database (made if missing; WAL mode)")
    serve.add_argument("--pairs", action="append", default=[],
                       help="items to add: what `rlhf-ray collect` writes ({prompt, responses: [...]}) or a "
                            "preference dataset ({prompt, chosen, rejected}); may repeat; re-adding is a no-op")
    serve.add_argument("--pairing", choices=("adjacent", "all"), default="adjacent",
                       help="responses 1..n of one prompt -> pairs (1,2),(2,3).. (adjacent) or every pair (all)")
    serve.add_argument("--gold", action="append", default=[],
                       help="preference dataset whose chosen is known better: gold items every annotator sees")
    serve.add_argument("--overlap", type=float, default=0.2,
                       help="share of new items shown to --overlap-k annotators for agreement (default 0.2)")
    serve.add_argument("--overlap-k", type=int, default=2, help="annotators per overlap item (default 2)")
    serve.add_argument("--annotators", default="", help="comma-separated names to create (links are printed)")
    serve.add_argument("--guidelines", help="Markdown file shown one click away on the page")
    serve.add_argument("--criteria", help=f"comma-separated rating criteria (default {','.join(DEFAULT_CRITERIA)}; "
                                          "'' for none)")
    serve.add_argument("--config", help="YAML file whose studio.criteria lists the rating criteria")
    serve.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    serve.add_argument("--seed", type=int, default=0, help="seed of the overlap draw")
    serve.add_argument("--max-body", type=int, default=MAX_BODY, help="largest request body in bytes")
    serve.add_argument("--verbose", action="store_true", help="log every request")
    _net(serve, 8000)
    serve.set_defaults(studio_fn=_serve)

    add = acts.add_parser("add-annotator", help="create annotators and print their links")
    add.add_argument("--db", required=True)
    add.add_argument("names", nargs="+")
    add.add_argument("--base-url", default="http://127.0.0.1:8000", help="where the server is reached")
    add.set_defaults(studio_fn=_add_annotators)

    stats = acts.add_parser("stats", help="agreement statistics of a database")
    stats.add_argument("--db", required=True)
    stats.add_argument("--json", action="store_true", help="print the statistics as JSON")
    stats.set_defaults(studio_fn=_stats)

    exp = acts.add_parser("export", help="write the labels as a preference dataset for `rlhf-ray rm`")
    exp.add_argument("--db", required=True)
    exp.add_argument("--out", required=True, help="JSONL file to write")
    exp.add_argument("--min-agreement", type=float, default=0.0,
                     help="leave out pairs whose winning label has a smaller share of the votes")
    exp.add_argument("--min-votes", type=int, default=1, help="leave out pairs with fewer votes")
    exp.add_argument("--no-gold", action="store_true", help="leave gold items out")
    exp.set_defaults(studio_fn=_export)

    view = subparsers.add_parser("view", help="look inside a PPO run (metrics, samples) in the browser")
    view.add_argument("run_dir", help="the run directory (metrics.jsonl, samples.jsonl)")
    view.add_argument("--db", help="annotation database that chosen samples are sent to")
    view.add_argument("--verbose", action="store_true", help="log every request")
    _net(view, 8001)
    view.set_defaults(studio_fn=_view)


def run_studio_command(args: argparse.Namespace) -> int:
    try:
        return args.studio_fn(args)
    except (ValueError, FileNotFoundError, OSError) as e:  # DataError is a ValueError
        print(f"rlhf-ray: {e}", file=sys.stderr)
        return 2


def _criteria(args) -> tuple[str, ...]:
    if args.criteria is not None:
        return tuple(c.strip() for c in args.criteria.split(",") if c.strip())
    if args.config:
        import yaml

        with open(args.config, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
        crit = (cfg.get("studio") or {}).get("criteria")
        if crit is not None:
            if not isinstance(crit, list) or not all(isinstance(c, str) for c in crit):
                raise ValueError(f"{args.config}: studio.criteria must be a list of names")
            return tuple(crit)
    return DEFAULT_CRITERIA


def _serve(args) -> int:
    from rlhf_ray.studio.db import Store
    from rlhf_ray.studio.pairs import load_gold, load_pairs
    from rlhf_ray.studio.server import StudioApp, check_listen_address, make_server, read_guidelines, url_of

    # Every argument and file is checked before the database is made or written.
    if not 0 <= args.overlap <= 1:
        raise ValueError("--overlap must be between 0 and 1")
    if args.overlap_k < 2:
        raise ValueError(f"--overlap-k must be at least 2 (annotators who see an overlap item); got {args.overlap_k}")
    if args.max_body < 1:
        raise ValueError(f"--max-body must be a positive number of bytes; got {args.max_body}")
    check_listen_address(args.host, args.port, args.allow_remote)
    criteria = _criteria(args)
    guidelines = read_guidelines(args.guidelines)
    sources = [(source, *load_pairs(source, pairing=args.pairing, on_bad_row=args.on_bad_row))
               for source in args.pairs]
    gold = [(source, load_gold(source, on_bad_row=args.on_bad_row)) for source in args.gold]
    store = Store(args.db)
    for _, pairs, report in sources:
        added = store.add_items(pairs, overlap=args.overlap, overlap_k=args.overlap_k, seed=args.seed)
        print(f"{report.summary()}; {len(pairs)} pairs ({args.pairing}), {added} new", flush=True)
    for source, items in gold:
        added = store.add_items(items)
        print(f"{source}: {added} new gold items", flush=True)
    existing = {a["name"] for a in store.annotators()}
    new_links = {name: store.add_annotator(name) for name in filter(None, (n.strip() for n in args.annotators.split(",")))
                 if name not in existing}
    if not store.items():
        raise ValueError("the database has no items yet: pass --pairs")
    app = StudioApp(store=store, criteria=criteria, guidelines=guidelines, max_body=args.max_body)
    server = make_server(app, args.host, args.port, allow_remote=args.allow_remote, quiet=not args.verbose)
    print(f"listening on {url_of(server)} (database {args.db}, {len(store.items())} items)", flush=True)
    for a in store.annotators():
        # Only a token's hash is stored: links are shown once, when the annotator is made.
        shown = url_of(server, "/", new_links[a["name"]]) if a["name"] in new_links else \
            "(link given when added; annotate add-annotator NAME makes a new one)"
        print(f"  {a['name']}: {shown}", flush=True)
    if not store.annotators():
        print("  no annotators yet: rlhf-ray annotate add-annotator --db D NAME", flush=True)
    print(f"  stats: {url_of(server, '/stats', app.admin_token)}", flush=True)
    return _run(server, store)


def _run(server, store=None) -> int:
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if store is not None:
            store.close()
    return 0


def _add_annotators(args) -> int:
    from rlhf_ray.studio.db import Store

    store = Store(args.db, create=False)
    for name in args.names:
        print(f"{name}: {args.base_url.rstrip('/')}/?token={store.add_annotator(name)}")
    return 0


def _stats(args) -> int:
    from rlhf_ray.studio.db import Store
    from rlhf_ray.studio.stats import compute_stats, format_stats

    s = compute_stats(Store(args.db, create=False))
    print(json.dumps(s, indent=2) if args.json else format_stats(s))
    return 0


def _export(args) -> int:
    from rlhf_ray.studio.db import Store
    from rlhf_ray.studio.stats import export_preferences

    if not 0 <= args.min_agreement <= 1:
        raise ValueError(f"--min-agreement must be a share between 0 and 1; got {args.min_agreement}")
    if args.min_votes < 1:
        raise ValueError(f"--min-votes must be at least 1; got {args.min_votes}")
    r = export_preferences(Store(args.db, create=False), args.out, min_agreement=args.min_agreement, min_votes=args.min_votes,
                           include_gold=not args.no_gold)
    left = ", ".join(f"{n} {why}" for why, n in sorted(r["left_out"].items())) or "none"
    print(f"wrote {r['written']} preference pairs to {r['out']}; left out: {left}")
    return 0


def _view(args) -> int:
    from pathlib import Path

    from rlhf_ray.studio.db import Store
    from rlhf_ray.studio.server import StudioApp, check_listen_address, make_server, url_of

    run = Path(args.run_dir)
    if not (run / "metrics.jsonl").is_file() and not (run / "samples.jsonl").is_file():
        raise FileNotFoundError(f"{run} has neither metrics.jsonl nor samples.jsonl")
    check_listen_address(args.host, args.port, args.allow_remote)
    store = Store(args.db, create=False) if args.db else None
    app = StudioApp(store=store, run_dir=str(run))
    server = make_server(app, args.host, args.port, allow_remote=args.allow_remote, quiet=not args.verbose)
    print(f"run viewer: {url_of(server, '/view', app.admin_token)}", flush=True)
    return _run(server, store)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.studio")
    add_studio_commands(parser.add_subparsers(dest="command", required=True))
    return run_studio_command(parser.parse_args(argv))
