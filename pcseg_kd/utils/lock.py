"""One run per work folder: an exclusive lock on ``WORK/.lock``.

Two runs writing the same work folder would interleave their logs and overwrite each other's
checkpoints. The lock is an ``fcntl.flock`` on a file that says who holds it; the kernel
releases it when the last descriptor of that open file is closed, i.e. when the process ends,
however it ends (a killed run leaves no stale lock) -- provided no other process holds a copy of
the descriptor. A forked child (a DataLoader worker) inherits one, and a worker orphaned by a
``kill -9`` of the run kept the lock alive. So the descriptor is close-on-exec (no program the
run starts gets it) and closed in every forked child right after the fork: closing a copy never
unlocks (flock locks belong to the open file description, released with its last descriptor,
or by ``LOCK_UN``, which the child never calls), so the parent keeps the lock and the child
cannot keep it past the parent.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Set, TextIO

_held: Set[TextIO] = set()  # this process's open lock files: closed in forked children


def _close_in_child() -> None:
    for f in list(_held):
        try:
            f.close()  # the child's copy of the descriptor only: the parent's lock stays
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_close_in_child)


class WorkDirLocked(ValueError):
    """Another live process holds the work folder."""


@contextlib.contextmanager
def work_dir_lock(work_dir: "os.PathLike | str") -> Iterator[Path]:
    import fcntl

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / ".lock"
    f = open(path, "a+")
    os.set_inheritable(f.fileno(), False)  # Python's default (PEP 446), relied on here: say so
    _held.add(f)
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise WorkDirLocked(f"{work_dir} is in use by another run ({holder}): wait for it to finish, "
                                "or use another --work-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield path
    finally:
        _held.discard(f)
        f.close()  # closing releases the lock
