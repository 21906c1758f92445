"""Running a study's cells through submitit.

``local``: each cell a process on this machine (submitit's LocalExecutor), ``jobs`` side by
side, one thread each; ``slurm``: each cell a SLURM job with the study config's ``slurm``
settings (partition, GPUs, CPUs, memory, time), ``jobs`` in the queue at once (default: every
cell that is ready); ``debug``: in this process, one after another (submitit's DebugExecutor,
for tests and pdb). A cell is submitted once the cells it needs (its teacher, its cache) are
done; a cell whose ``cell.json`` exists is done, so a killed study resumes cell by cell (and a
killed cell, inside itself, from its last checkpoint).
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from .study import cell_lines, describe, is_done, once_per_study

EXECUTORS = ("local", "slurm", "debug")


def cell_job(cell: Dict[str, Any], related: List[Dict[str, Any]], study: Dict[str, Any]) -> Dict[str, Any]:
    """What a submitted job runs: one cell (returns its cell.json). The job gets the cell's
    config as the submitting process built and validated it (pickled by submitit), with the
    once-per-study cells it may need (teachers, caches): loading the study's every config again
    in each job cost 20 s of one core per cell on the lab's grid."""
    from ..runner import import_all
    from .study import run_cell

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import_all()
    return run_cell(cell, related + [cell], study, progress=False)


def make_executor(kind: str, folder: Path, study: Dict[str, Any]):
    """The submitit executor of ``kind``, its logs under ``folder`` (``%j`` is the job id)."""
    import submitit

    if kind not in EXECUTORS:
        raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    folder = Path(folder) / "%j"
    if kind == "debug":
        return submitit.DebugExecutor(folder=folder)
    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=study["slurm"]["timeout_min"])
        return ex
    s = study["slurm"]
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = {"name": f"pcseg_kd-{Path(study['config_path']).stem}", "timeout_min": s["timeout_min"],
              "gpus_per_node": s["gpus_per_node"], "cpus_per_task": s["cpus_per_task"], "mem_gb": s["mem_gb"],
              "tasks_per_node": 1, "nodes": 1}
    if s["partition"]:
        params["slurm_partition"] = s["partition"]
    if s["additional"]:
        params["slurm_additional_parameters"] = dict(s["additional"])
    ex.update_parameters(**params)
    return ex


def run_cells(all_cells: List[Dict[str, Any]], submit: Callable[[Dict[str, Any]], Any], jobs: int,
              log: Callable[[str], None] = print, poll_seconds: float = 1.0) -> List[str]:
    """Submit every cell not yet done once the cells it needs are, at most ``jobs`` at a time;
    wait for them. Returns the failed cells (their dependents are not run)."""
    todo = [c for c in all_cells if not is_done(c)]
    finished = {c["name"] for c in all_cells if once_per_study(c) and is_done(c)}
    total = len(all_cells)
    done_count = total - len(todo)
    if done_count:
        log(f"resuming: {done_count} of {total} cells done")
    running: List[tuple] = []
    failed: List[str] = []
    try:
        _schedule(todo, finished, running, failed, submit, jobs, log, poll_seconds, done_count, total)
    except KeyboardInterrupt:  # Ctrl-C: the running cells stop too (each resumes from its last checkpoint)
        for _, job in running:
            try:
                job.cancel()
            except Exception:  # noqa: BLE001 - a job that already ended
                pass
        log(f"  interrupted: {len(running)} running cells cancelled; rerun to resume")
        raise
    blocked = [describe(c) for c in todo]
    if blocked:
        log(f"  not run ({len(blocked)} cells need a failed cell): {', '.join(blocked[:8])}"
            + (" ..." if len(blocked) > 8 else ""))
    return failed + blocked


def _schedule(todo, finished, running, failed, submit, jobs, log, poll_seconds, done_count, total) -> None:
    t0 = time.perf_counter()
    while todo or running:
        ready = [c for c in todo if all(n in finished for n in c["needs"])]
        while ready and len(running) < jobs:
            c = ready.pop(0)
            todo.remove(c)
            running.append((c, submit(c)))
        if not running:
            break  # what is left needs a cell that failed
        time.sleep(poll_seconds)
        for item in list(running):
            c, job = item
            if not job.done():
                continue
            running.remove(item)
            try:
                out = job.result()
            except Exception as e:  # the job's own traceback is in its log
                failed.append(describe(c))
                log(f"  FAILED {describe(c)}: {failure_line(e)} (log: {job_log(job)})")
                continue
            done_count += 1
            if once_per_study(c):
                finished.add(c["name"])
            log(f"  [{done_count}/{total}, {(time.perf_counter() - t0) / 60:.1f} min] " + cell_lines(out)[0])


def failure_line(error: BaseException) -> str:
    """The job's own error (``KittiDataError: ...``) out of submitit's message, which carries the
    job's traceback followed by where its logs are."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line)]
    return raised[-1] if raised else (lines[0] if lines else type(error).__name__)


def job_log(job) -> str:
    paths = getattr(job, "paths", None)
    return str(paths.stderr) if paths is not None else "in this process"


def submit_with(executor, all_cells: List[Dict[str, Any]], study: Dict[str, Any]) -> Callable[[Dict[str, Any]], Any]:
    related = [c for c in all_cells if once_per_study(c)]  # the teachers and caches a cell may read

    def submit(cell: Dict[str, Any]):
        return executor.submit(cell_job, cell, [c for c in related if c is not cell], study)
    return submit
