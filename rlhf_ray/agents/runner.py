"""Runs tool calls in separate processes with a time limit, so a tool that hangs, crashes its
process or eats memory cannot take the rollout driver with it.

Each of ``workers`` threads owns one tool process and hands it one call at a time over a pipe.
A call that has not answered within ``timeout_s`` gets its process killed (the next call starts a
fresh one); a tool that raises, returns something that is neither text nor JSON, or kills its own
process comes back as a ``ToolResult`` with ``error`` set: an observation the policy reads, and a
count in the iteration's metrics, never an exception in the driver.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Self

from rlhf_ray.agents.tools import Tool, ToolCall

# ToolResult.error values: why a call gave no result.
RAISED, TIMEOUT, GARBAGE, DIED = "raised", "timeout", "garbage", "died"


@dataclass(frozen=True)
class ToolResult:
    content: str  # what the policy is shown: the tool's output, or what went wrong
    error: str = ""  # "" on success, else RAISED, TIMEOUT, GARBAGE or DIED
    seconds: float = 0.0


def as_observation_text(value) -> str:
    """A tool's return value as the text the policy reads: strings as they are, JSON values as
    JSON. Raises ``TypeError`` for anything else (the runner's GARBAGE)."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float | list | dict):
        return json.dumps(value)  # TypeError inside a list or dict of non-JSON values
    raise TypeError(f"returned a {type(value).__name__}, not text or a JSON value")


def _serve(conn) -> None:
    """The tool process: call, answer, repeat, until the pipe closes."""
    while True:
        try:
            function, arguments = conn.recv()
        except EOFError:
            return
        try:
            value = function(**arguments)
        except Exception as e:  # noqa: BLE001 (any failure of the tool is reported; the process lives on)
            conn.send((RAISED, f"{type(e).__name__}: {e}"))
            continue
        try:
            conn.send(("", as_observation_text(value)))
        except (TypeError, ValueError) as e:
            conn.send((GARBAGE, str(e)))


class _ToolProcess:
    def __init__(self, context) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()


class ToolRunner:
    def __init__(self, tools: list[Tool], workers: int = 2, timeout_s: float = 5.0, max_chars: int = 1000) -> None:
        """``tools`` by name; each call may take ``timeout_s`` seconds; outputs are cut to
        ``max_chars`` characters (a tool that dumps megabytes must not fill the context)."""
        for tool in tools:
            try:
                pickle.dumps(tool.function)
            except (pickle.PicklingError, AttributeError, TypeError) as e:
                raise ValueError(f"tool {tool.name!r}: its function must be a module-level function, "
                                 f"importable by reference in a tool process ({e})") from None
        self.tools = {t.name: t for t in tools}
        self.timeout_s, self.max_chars = timeout_s, max_chars
        # forkserver: the rollout driver has threads (Ray's among them), which fork must not copy.
        self._context = multiprocessing.get_context("forkserver")
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="tool")
        self._idle: queue.SimpleQueue[_ToolProcess] = queue.SimpleQueue()
        self._all: set[_ToolProcess] = set()
        self._lock = threading.Lock()

    def submit(self, call: ToolCall) -> Future:
        """Starts ``call`` (a known tool: the parser checks names) and returns a future of its ``ToolResult``."""
        return self._threads.submit(self._run, call)

    def run(self, call: ToolCall) -> ToolResult:
        return self.submit(call).result()

    def _run(self, call: ToolCall) -> ToolResult:
        try:
            worker = self._idle.get_nowait()
        except queue.Empty:
            worker = _ToolProcess(self._context)
            with self._lock:
                self._all.add(worker)
        start = time.monotonic()
        try:
            worker.conn.send((self.tools[call.name].function, call.arguments))
            answered = worker.conn.poll(self.timeout_s)
            error, content = worker.conn.recv() if answered else (TIMEOUT, "")
        except (EOFError, OSError, BrokenPipeError):
            error, content = DIED, ""
        seconds = time.monotonic() - start
        if error in (TIMEOUT, DIED):
            worker.kill()
            with self._lock:
                self._all.discard(worker)
            content = (f"tool {call.name!r} did not answer within {self.timeout_s:g} s" if error == TIMEOUT
                       else f"tool {call.name!r} crashed its process")
        else:
            self._idle.put(worker)
        if error:
            content = f"error: {content}"
        elif len(content) > self.max_chars:
            content = content[: self.max_chars] + f"... [cut at {self.max_chars} characters]"
        return ToolResult(content, error, seconds)

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for worker in self._all:
                worker.kill()
            self._all.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
