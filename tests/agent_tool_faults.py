"""Tools that fail on purpose, for the tool runner's failure tests (stand-ins by design: each
injects one way a real tool goes wrong). Module-level, so tool processes import them by reference."""

from __future__ import annotations

import os
import time


def raises(x: int) -> int:
    raise RuntimeError(f"cannot handle {x}")


def hangs(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


def garbage() -> object:
    return object()


def kills_its_process() -> str:
    os._exit(3)


def floods(n: int) -> str:
    return "x" * n


def echo(text: str) -> str:
    return text
