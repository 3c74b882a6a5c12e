"""Engine processes that end with the process that started them.

vLLM's multiprocess engine runs in child processes (``VLLM::EngineCore`` and its ``VLLM::Worker``
ranks). When the process that built the engine is killed (SIGKILL, an out-of-memory kill, a
preempted job) — or exits without vLLM's own shutdown having run — those children are orphaned and
keep their memory (~1.5 GB each here) and cores; a user who interrupts and resumes runs, or a grid
of runs, piles them up.

:func:`guarded` builds an engine and hands every process that appeared under the caller while it
was built to a small watcher process (this file run as a script: it imports nothing of the package,
vLLM or torch). The watcher polls its parent; once the parent is gone it ends the processes it was
given that are still the same processes (pid and start time) — SIGTERM, which vLLM's engine core
answers with its own orderly shutdown, then SIGKILL after :data:`GRACE_S` seconds — and exits. It
also exits as soon as all of them have ended by themselves (vLLM shut the engine down). It ignores
SIGINT and SIGHUP and runs in its own session, so a Ctrl-C meant for the run cannot stop it first.
An in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) starts no process: nothing to watch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable, TypeVar

#: how often the watcher checks its parent (seconds)
POLL_S = 0.5
#: how long the engine's processes get for their own shutdown after SIGTERM before SIGKILL (seconds)
GRACE_S = 5.0

T = TypeVar("T")


def _descendants() -> dict[int, float]:
    """pid → start time of every process under this one."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            out[p.pid] = p.create_time()
        except psutil.Error:
            pass
    return out


def guarded(build: Callable[[], T]) -> T:
    """``build()`` (which starts an engine), with the processes it started ending when this process
    ends (see the module docstring). Returns what ``build`` returned."""
    if not sys.platform.startswith("linux"):
        return build()
    before = _descendants()
    obj = build()
    new = {pid: t for pid, t in _descendants().items() if pid not in before}
    if new:
        watch(new)
    return obj


def watch(procs: dict[int, float]) -> subprocess.Popen:
    """Start the watcher for ``procs`` (pid → start time)."""
    args = [f"{pid}:{t!r}" for pid, t in sorted(procs.items())]
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid()), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True, start_new_session=True)


def _alive(psutil, pid: int, started: float):
    """The process, if ``pid`` is still the process that started at ``started`` (not a reused pid)."""
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - started) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
            return p
    except psutil.Error:
        pass
    return None


def _main(argv: list[str]) -> int:
    import psutil

    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    owner = int(argv[0])
    procs = {int(pid): float(t) for pid, t in (a.split(":", 1) for a in argv[1:])}
    while os.getppid() == owner:
        procs = {pid: t for pid, t in procs.items() if _alive(psutil, pid, t) is not None}
        if not procs:
            return 0  # the engine was shut down: nothing left to watch
        time.sleep(POLL_S)
    left = [p for p in (_alive(psutil, pid, t) for pid, t in procs.items()) if p is not None]
    for p in left:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(left, timeout=GRACE_S)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
