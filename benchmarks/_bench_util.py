"""Helpers shared by the benchmark scripts: machine facts, tables, result files, memory sampling.

Not a benchmark itself (the leading underscore keeps it apart from the scripts).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
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


def write_results(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


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
