"""One run per work folder: an exclusive lock on ``WORK/.lock``.

Two runs writing the same work folder would interleave their logs and overwrite each other's
checkpoints. The lock is an ``fcntl.flock`` on a file that says who holds it; the kernel
releases it when the process ends, however it ends (a killed run leaves no stale lock).
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Iterator


class WorkDirLocked(ValueError):
    """Another live process holds the work folder."""


@contextlib.contextmanager
def work_dir_lock(work_dir: "os.PathLike | str") -> Iterator[Path]:
    import fcntl

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / ".lock"
    f = open(path, "a+")
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
        f.close()  # closing releases the lock
