"""Errors and bad-frame bookkeeping for the SemanticKITTI pipeline.

Every problem with an input file is raised as :class:`KittiDataError`, whose message
starts with the file's path and says what is wrong with it, so that a broken frame in a
19k-frame dataset is found from the log line alone instead of from a numpy traceback.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Optional, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]


class KittiDataError(ValueError):
    """An input file is missing, unreadable or inconsistent. ``path`` names the file."""

    def __init__(self, path: PathLike, problem: Optional[str] = None):
        self.worker_traceback: Optional[str] = None
        if problem is None:  # one argument: a message, e.g. torch's re-raise from a DataLoader worker
            path, problem, self.worker_traceback = _parse_message(str(path))
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        # rebuilt from (path, problem), not from the message: an error raised in a DataLoader
        # worker reaches the main process as the same KittiDataError with the same message
        return (type(self), (self.path, self.problem), self.__dict__)


def _parse_message(msg: str) -> Tuple[str, str, Optional[str]]:
    """``"PATH: PROBLEM"``, or torch's ``"Caught KittiDataError in DataLoader worker process 0.
    Original Traceback ...\n...KittiDataError: PATH: PROBLEM\n"`` -> (path, problem, traceback)."""
    tb = None
    marker = "KittiDataError: "
    if msg.startswith("Caught ") and marker in msg:
        tb = msg
        msg = msg[msg.rindex(marker) + len(marker):].rstrip("\n")
    path, sep, problem = msg.partition(": ")
    return (path, problem, tb) if sep else ("<unknown file>", msg, tb)


class BadFrameLog:
    """Counts frames skipped because of a :class:`KittiDataError`, by problem kind.

    With ``skip_bad_frames`` the dataset warns once per frame and keeps going; the counts
    say at the end of an epoch how much data was lost (per worker process when a
    DataLoader uses workers, since each worker holds its own copy of the dataset).
    """

    def __init__(self) -> None:
        self.by_kind: Counter = Counter()
        self.frames: list = []

    def add(self, frame_id: str, err: KittiDataError) -> None:
        self.by_kind[_kind(err.problem)] += 1
        self.frames.append((frame_id, str(err)))

    @property
    def count(self) -> int:
        return len(self.frames)

    def __repr__(self) -> str:
        return f"BadFrameLog(count={self.count}, by_kind={dict(self.by_kind)})"


def _kind(problem: str) -> str:
    # The first words of the message identify the check that failed ("size 17 bytes ...").
    return problem.split(":")[0].split(" (")[0][:60]
