"""DataLoader workers that die with the process that started them.

A loader worker outlives a ``kill -9`` of its parent: it is reparented and goes on loading
(torch's own watchdog only looks at the parent between batches), and it holds every file the
parent had open when it forked, the work folder's lock included, so a later run on that folder
was refused as "in use" by a dead pid. :class:`DieWithParent` is the ``worker_init_fn`` of every
loader of the engine: on Linux it asks the kernel for SIGKILL when the parent dies
(``prctl(PR_SET_PDEATHSIG)``); elsewhere it does nothing but call the loader's own init.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Callable, Optional

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def die_with_parent() -> bool:
    """Have this process SIGKILLed when its parent dies. True when the kernel took the request
    (Linux), False where there is no such request (other systems)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    if libc is None or libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    return True


def _dead(pid: int) -> bool:
    """Gone or a zombie (a killed parent stays a zombie until its own parent reaps it, and
    ``kill(pid, 0)`` still succeeds on a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2:][:1] in (b"Z", b"X")


class DieWithParent:
    """A DataLoader ``worker_init_fn``: the worker is killed when its parent dies, then
    ``then(worker_id)`` (the loader's own init, if any) runs. Picklable (spawned workers).

    Built in the process that creates the loader, whose pid it keeps: a worker forked after its
    parent already died (the request cannot cover that) finds itself reparented and kills itself,
    as the kernel would have. The death signal follows the parent *thread* that forked the
    worker: iterate a loader in the thread that keeps using it (the engine iterates in the main
    thread)."""

    def __init__(self, then: Optional[Callable[[int], None]] = None):
        self.then = then
        self.parent = os.getpid()

    def __call__(self, worker_id: int) -> None:
        before = os.getppid()
        if die_with_parent():
            # the classic race: a parent that died between fork and prctl sends no signal
            orphaned = os.getppid() != before or (before != self.parent and _dead(self.parent))
            if orphaned:
                os.kill(os.getpid(), signal.SIGKILL)
        if self.then is not None:
            self.then(worker_id)


def worker_init(then: Optional[Callable[[int], None]] = None) -> DieWithParent:
    """The ``worker_init_fn`` for a DataLoader: dies with its parent, then runs ``then``."""
    if isinstance(then, DieWithParent):
        return then
    return DieWithParent(then)
