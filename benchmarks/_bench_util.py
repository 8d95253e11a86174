"""Helpers shared by the benchmark scripts: machine facts, command lines, tables, result files and
their charts, memory sampling, this machine's limits.

Not a benchmark itself (the leading underscore keeps it apart from the scripts).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHARED_NOTE = (
    "figures from a shared machine (other engineers' tests may run at the same time): "
    "expect noise of tens of percent between runs"
)


def machine_facts() -> dict:
    facts = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "note": SHARED_NOTE,
    }
    try:
        import psutil

        facts["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return facts


def announce(bench: str) -> dict:
    """Prints a benchmark's first line (machine, load, date, the shared-machine caveat) and
    returns the machine facts for its result file."""
    facts = machine_facts()
    print(f"{bench} on {facts['cpus']} CPUs, load {facts['load_avg_at_start'][0]:.2f}, {facts['date']}; "
          f"{SHARED_NOTE}", flush=True)
    return facts


# ------------------------------------------------------------------------------------------------
# Command lines and result files: the flags and the output every benchmark shares
# ------------------------------------------------------------------------------------------------
def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring as help, the shared-machine note, and the flags
    of its result files (``--no-json``; ``--replot``, read by ``replot_requested``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SHARED_NOTE)
    results = parser.add_argument_group("result files")  # listed after the benchmark's own flags
    results.add_argument("--no-json", action="store_true",
                         help="do not write benchmarks/results/*.json (nor the chart)")
    results.add_argument("--replot", metavar="JSON", help="only draw the PNG of an existing results JSON")
    return parser


def add_model_shape(parser: argparse.ArgumentParser, hidden: int = 512, layers: int = 6, *,
                    intermediate: str | None = None, dtype: str | None = None, seed: bool = True) -> None:
    """The tiny Llama's shape flags: ``--hidden`` and ``--layers``; ``--intermediate`` (MLP width)
    where the benchmark builds the model itself, ``intermediate`` saying what its 0 means;
    ``--dtype`` where both sides of a comparison run in one dtype, ``dtype`` being its help;
    ``--seed`` of the weights and the prompts."""
    parser.add_argument("--hidden", type=int, default=hidden,
                        help="hidden size (a multiple of 32: heads of 32)")
    parser.add_argument("--layers", type=int, default=layers)
    if intermediate:
        parser.add_argument("--intermediate", type=int, default=0, help=f"MLP width; 0 = {intermediate}")
    if dtype:
        parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help=dtype)
    if seed:
        parser.add_argument("--seed", type=int, default=0)


def add_config_overrides(parser: argparse.ArgumentParser, dest: str = "overrides",
                         help: str = "extra config override (repeatable)") -> None:
    """``--set KEY=VALUE`` (repeatable): rlhf_ray config overrides on top of the benchmark's job."""
    parser.add_argument("--set", dest=dest, action="append", default=[], metavar="KEY=VALUE", help=help)


def replot_requested(args, chart) -> bool:
    """With ``--replot JSON``, draws that results file's chart again (``chart(json_path, payload)``,
    the function that drew it first) and says so: the benchmark then runs nothing."""
    if not args.replot:
        return False
    path = Path(args.replot)
    print(f"chart: {chart(path, json.loads(path.read_text()))}")
    return True


def publish(bench: str, payload: dict, chart, no_json: bool = False) -> None:
    """Ends a benchmark's printout: the shared-machine note, then (unless ``no_json``) its results
    file ``benchmarks/results/<bench>-<time>.json`` and the chart ``chart(json_path, payload)``
    draws next to it. Charts read only the payload, so ``--replot`` draws the same one later."""
    print(f"\n{SHARED_NOTE}")
    if no_json:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{bench}-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"results: {path}")
    print(f"chart: {chart(path, payload)}")


def tiny_model_dir(bench: str, spec) -> str:
    """The offline tiny Llama of ``spec`` (a ``TinyModelSpec``), built once per shape in the temp
    directory and reused by later runs of the same benchmark."""
    from rlhf_ray.models.tiny import build_tiny_model

    shape = f"h{spec.hidden_size}_l{spec.num_layers}_i{spec.intermediate_size}"
    return str(build_tiny_model(Path(tempfile.gettempdir()) / f"rlhf_ray_{bench}" / shape, spec))


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def print_table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """Prints a plain fixed-width table and returns it as text."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1e6 or (value and abs(value) < 1e-3):
            return f"{value:.3g}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class TreeMemorySampler:
    """Samples the memory of a process and all its descendants in a background thread.

    Keeps the peak of the summed RSS (what ``ps`` shows; pages shared between processes, such as
    libraries and Ray's object store, count once per process) and of the summed PSS (shared pages
    split between the processes that map them: the fairer sum, read from /proc/<pid>/smaps_rollup).
    Only descendants of ``root_pid`` count, so other people's Ray clusters on the same machine are
    never included.
    """

    def __init__(self, root_pid: int | None = None, interval_s: float = 0.5, pss: bool = True):
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(root_pid or os.getpid())
        self.interval_s = interval_s
        self.pss = pss
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.peak_by_name: dict[str, int] = {}
        self.names: dict[int, str] = {}  # pid -> role name (Ray workers rename themselves ray::Class)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def sample(self) -> None:
        psutil = self._psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss = pss = 0
        by_name: dict[str, int] = {}
        for p in procs:
            try:
                if self.pss:
                    info = p.memory_full_info()
                    pss += getattr(info, "pss", info.rss)
                else:
                    info = p.memory_info()
                rss += info.rss
                name = self.names[p.pid] = _role_name(p)
                by_name[name] = by_name.get(name, 0) + info.rss
            except psutil.Error:
                continue
        if rss > self.peak_rss:
            self.peak_rss, self.peak_by_name = rss, by_name
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def summary(self) -> dict:
        return {
            "peak_rss_bytes": self.peak_rss,
            "peak_pss_bytes": self.peak_pss,
            "max_processes": self.peak_procs,
            "rss_by_process_at_peak": dict(sorted(self.peak_by_name.items(), key=lambda kv: -kv[1])),
        }


def _role_name(p) -> str:
    """Ray workers rename themselves ``ray::ClassName``; everything else goes by its executable."""
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - the process may be gone
        cmd = []
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    if any(a.endswith(("compare_trl.py", "bench_ppo.py")) for a in cmd):
        return "driver"
    return p.name()


def wall() -> float:
    return time.perf_counter()


# ------------------------------------------------------------------------------------------------
# This machine's limits, measured in the run that uses them
# ------------------------------------------------------------------------------------------------
def matmul_peak(
    dtype: str = "float32", threads: int | None = None, n: int = 1024, seconds: float = 1.0
) -> float:
    """Best FLOP/s of an ``n x n @ n x n`` matmul (2 n^3 FLOPs) in this process.

    ``threads`` sets torch's intra-op threads for the measurement and restores them after. The
    best of several timed windows is kept (a peak, not a mean), so a busy shared machine lowers it
    less than it lowers a mean.
    """
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dt = getattr(torch, dtype)
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        torch.mm(a, b)  # warm-up (bf16 kernels pick their path on first use)
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline or best == 0.0:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        return best
    finally:
        torch.set_num_threads(old)


def matmul_peaks(threads=(1, 2), dtypes=("float32", "bfloat16")) -> dict:
    """``{"float32": {"1": flops, "2": flops}, "bfloat16": {...}}`` measured now, in this process."""
    return {d: {str(t): matmul_peak(d, t) for t in threads} for d in dtypes}


def train_flops(params: int, tokens: float) -> float:
    """Model FLOPs of forward + backward over ``tokens`` positions: 6 x params x tokens.

    2 FLOPs per parameter per token forward (one multiply-add), 4 backward (gradients of inputs and
    of weights). Attention's score/value products (12 x layers x hidden x sequence per token) are left
    out: under 5% at the sequence lengths benchmarked here (<= 64 tokens vs hidden >= 256).
    """
    return 6.0 * params * tokens


def gloo_baselines(backend: str = "gloo", nbytes: int = 64 << 20, iters: int = 10) -> dict:
    """Raw broadcast between two Ray actors and a memcpy, both of ``nbytes`` buffers (bytes/s).

    Needs a running Ray. The upper bounds a weight sync is compared to in the same run (used by
    bench_weight_sync.py and bench_ppo.py).
    """
    import ray
    import torch

    from rlhf_ray.ports import free_port
    from rlhf_ray.sync.group import open_group

    @ray.remote(num_cpus=0)
    class GlooPeer:
        def address(self) -> tuple[str, int]:
            return ray.util.get_node_ip_address(), free_port()

        def broadcast(self, addr, port, rank, backend, nbytes, iters) -> float:
            group = open_group(addr, port, rank, 2, backend)
            buf = torch.ones(nbytes, dtype=torch.uint8, device=group.device)
            group.broadcast(buf).wait()  # warm-up
            start = time.perf_counter()
            for _ in range(iters):
                group.broadcast(buf).wait()
            return nbytes * iters / (time.perf_counter() - start)

        def memcpy(self, nbytes, iters) -> float:
            src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
            dst.copy_(src)
            start = time.perf_counter()
            for _ in range(iters):
                dst.copy_(src)
            return nbytes * iters / (time.perf_counter() - start)

    a, b = GlooPeer.remote(), GlooPeer.remote()
    try:
        addr, port = ray.get(a.address.remote())
        bcast = ray.get(
            [
                a.broadcast.remote(addr, port, 0, backend, nbytes, iters),
                b.broadcast.remote(addr, port, 1, backend, nbytes, iters),
            ]
        )[0]
        copy = ray.get(a.memcpy.remote(nbytes, iters))
    finally:
        for actor in (a, b):
            ray.kill(actor)
    return {"buffer_bytes": nbytes, "broadcast_bytes_per_s": bcast, "memcpy_bytes_per_s": copy}


# ------------------------------------------------------------------------------------------------
# Charts
# ------------------------------------------------------------------------------------------------
def save_chart(json_path: Path, panels: list[dict], title: str) -> Path:
    """A PNG next to a results JSON (same name, ``.png``): one bar panel per entry of ``panels``.

    Each panel: ``{"title", "labels", "series": {name: [values]}, "ylabel", "stacked": bool,
    "hline": optional (value, label)}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        labels, series = panel["labels"], panel["series"]
        x = list(range(len(labels)))
        if panel.get("stacked"):
            bottom = [0.0] * len(labels)
            for name, vals in series.items():
                vals = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in vals]
                ax.bar(x, vals, bottom=bottom, label=name)
                bottom = [b + v for b, v in zip(bottom, vals)]
        else:
            width = 0.8 / max(1, len(series))
            for i, (name, vals) in enumerate(series.items()):
                xs = [xi - 0.4 + width * (i + 0.5) for xi in x]
                bars = ax.bar(xs, vals, width=width, label=name)
                ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if panel.get("hline"):
            value, text = panel["hline"]
            ax.axhline(value, color="k", linestyle="--", linewidth=1)
            ax.text(x[-1] if x else 0, value, f" {text}", va="bottom", ha="right", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.set_title(panel["title"], fontsize=10)
        if len(series) > 1 or panel.get("stacked"):
            ax.legend(fontsize=8)
    return save_figure(fig, json_path, title)


def save_figure(fig, json_path: Path, title: str) -> Path:
    """Titles ``fig`` (with the shared-machine note) and writes it next to its results JSON
    (same name, ``.png``)."""
    import matplotlib.pyplot as plt

    fig.suptitle(f"{title}\n{SHARED_NOTE}", fontsize=9)
    fig.tight_layout()
    png = Path(json_path).with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
