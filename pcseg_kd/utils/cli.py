"""One error path for every command-line tool.

    from pcseg_kd.utils.cli import run_main

    def main(argv=None) -> int: ...          # raises on failure, returns an exit status (or None)

    if __name__ == "__main__":
        sys.exit(run_main(main))

:func:`run_main` removes a ``--debug`` flag from the arguments, calls ``main(argv)`` and
turns every *expected* failure -- a bad config or input file, a damaged checkpoint, a missing
optional package, a full disk, a read-only folder, a non-finite loss -- into one ``error: ...``
message on stderr and exit status 1. The traceback is shown only with ``--debug`` (which
re-raises), or for an unexpected exception, i.e. a genuine bug. ``SystemExit`` (argparse's
usage errors, ``raise SystemExit("error: ...")``) passes through unchanged; Ctrl-C exits 130.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple, Type

DEBUG_FLAG = "--debug"

#: Exceptions that describe a problem with the user's input or environment, not a bug.
#: ``ValueError`` covers ConfigError, KittiDataError, CheckpointError, ResumeMismatch,
#: IDXFormatError and MissingDependencyError; ``OSError`` covers FileNotFoundError,
#: PermissionError, disk full (ENOSPC), read-only file systems.
EXPECTED_ERRORS: Tuple[Type[BaseException], ...] = (ValueError, OSError, ImportError, FloatingPointError)


def split_debug(argv: Optional[Sequence[str]]) -> Tuple[List[str], bool]:
    """``argv`` (default ``sys.argv[1:]``) without ``--debug``, and whether it was there
    (arguments after a ``--`` separator are left alone)."""
    args = list(sys.argv[1:] if argv is None else argv)
    cut = args.index("--") if "--" in args else len(args)
    debug = DEBUG_FLAG in args[:cut]
    if debug:
        args = [a for a in args[:cut] if a != DEBUG_FLAG] + args[cut:]
    return args, debug or os.environ.get("PCSEG_KD_DEBUG", "") not in ("", "0")


def error_message(e: BaseException) -> str:
    """The text after ``error: `` for an expected exception: its message, with an OSError's
    file named (``PATH: No space left on device``) and a KeyError's quotes removed."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        where = e.filename if e.filename is not None else ""
        text = f"{e.strerror}" if not where or str(where) in e.strerror else f"{where}: {e.strerror}"
        if e.filename2 is not None:
            text += f" (-> {e.filename2})"
        return text
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]
    text = str(e).strip()
    return text or type(e).__name__


def run_main(main: Callable[[List[str]], Any], argv: Optional[Sequence[str]] = None,
             expected: Tuple[Type[BaseException], ...] = EXPECTED_ERRORS, prog: Optional[str] = None) -> int:
    """Run ``main(argv without --debug)``; return its exit status (``None`` -> 0, an int -> it,
    anything else -> 0), or 1 after printing ``error: MESSAGE`` for an expected exception.
    With ``--debug`` (or ``PCSEG_KD_DEBUG=1``) the exception propagates with its traceback."""
    args, debug = split_debug(argv)
    try:
        status = main(args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # output piped into `head`: not an error worth a traceback
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except expected as e:
        if debug:
            raise
        name = f"{prog}: " if prog else ""
        print(f"{name}error: {error_message(e)}", file=sys.stderr, flush=True)
        return 1
    if isinstance(status, bool) or not isinstance(status, int):
        return 0
    return status
