"""Launchers for the trials of a sweep: `local` (subprocesses here) and `slurm` (one submitit job array).

Each trial runs `python run.py --config ... --workdir <trial workdir> --config.k=v ...` with its
stdout and stderr in `<workdir>/log.txt` and its state in `<workdir>/status.json`
(`submitted`, `running`, `requeued`, `finished` or `failed` plus the error line and exit code).
A trial with `results.json` is skipped; an unfinished one resumes from its checkpoint, since
run.py resumes. On SLURM a timed-out or preempted trial is requeued the same way.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import io
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cprec.errors import CprecError
from cprec.jsonfile import write_json
from cprec.sweep.expand import Trial, sweep_root

try:  # the local launcher works without submitit
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - depends on the environment
    Checkpointable = object

REPO = pathlib.Path(__file__).resolve().parents[2]
RUN_PY = REPO / "run.py"
ACTIVE = ("submitted", "running", "requeued")

Print = Callable[[str], None]


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def read_status(workdir: pathlib.Path) -> dict[str, Any]:
    """The trial's status.json, `finished` whenever results.json exists, {} if never launched."""
    try:
        status = json.loads((workdir / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        status = {}
    if (workdir / "results.json").exists():
        status["status"] = "finished"
    return status


def is_active(status: Mapping[str, Any]) -> bool:
    """Whether the process or SLURM job named in a status is still queued or running."""
    if status.get("status") not in ACTIVE:
        return False
    if status.get("launcher") == "slurm":
        queued = _squeue_ids()
        return True if queued is None else str(status.get("job_id")) in queued
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_SQUEUE_CACHE: dict[str, Any] = {"time": -1e9, "ids": None}


def _squeue_ids(max_age_s: float = 1.0) -> set[str] | None:
    """Ids of queued and running jobs, array tasks one by one; None when squeue can't tell."""
    if time.time() - _SQUEUE_CACHE["time"] < max_age_s:  # one call serves a whole table of trials
        return _SQUEUE_CACHE["ids"]
    ids = None
    if shutil.which("squeue") is not None:
        try:
            out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=60)
            ids = set(out.stdout.split()) if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            ids = None
    _SQUEUE_CACHE.update(time=time.time(), ids=ids)
    return ids


def run_trial(trial: Trial, cwd: str | pathlib.Path, launcher: str = "local", job_id: str | None = None,
              child_ignores: Sequence[int] = ()) -> dict[str, Any]:
    """Runs one trial to completion in a subprocess; returns (and writes) its final status."""
    workdir = pathlib.Path(cwd) / trial.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / "trial.json", trial.record())
    if (workdir / "results.json").exists():
        return read_status(workdir)
    command = [sys.executable, str(RUN_PY), *trial.args()]
    started = time.time()
    base = {"launcher": launcher, "host": socket.gethostname(), "job_id": job_id, "started": _now(),
            "command": command, "log": str(trial.workdir / "log.txt")}

    def ignore_signals() -> None:  # the job's own process handles these (SLURM requeue)
        for sig in child_ignores:
            signal.signal(sig, signal.SIG_IGN)

    last_error, returncode = "", None
    with open(workdir / "log.txt", "ab", buffering=0) as log:
        log.write(f"==> {_now()} on {socket.gethostname()}: {' '.join(command)}\n".encode())
        proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},  # log.txt follows progress live
                                preexec_fn=ignore_signals if child_ignores else None)
        try:
            write_json(workdir / "status.json", {"status": "running", **base, "pid": proc.pid})
            for line in proc.stderr:  # stderr is read here to keep its last line for status.json
                log.write(line)
                if line.strip():
                    last_error = line.decode(errors="replace").strip()
            returncode = proc.wait()
        finally:
            if proc.poll() is None:  # we were interrupted (Ctrl-C, SLURM requeue): don't leave it behind
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    status = {**base, "returncode": returncode, "seconds": round(time.time() - started, 1), "ended": _now()}
    if returncode == 0 and (workdir / "results.json").exists():
        status["status"] = "finished"
    else:
        status["status"] = "failed"
        if returncode is not None and returncode < 0:
            last_error = f"killed by {signal.Signals(-returncode).name}; rerun the sweep to resume"
        status["error"] = last_error or f"exit status {returncode} and nothing on stderr"
    write_json(workdir / "status.json", status)
    return status


def _record_sweep(trials: Sequence[Trial], spec: str) -> pathlib.Path:
    """Writes sweep.json; refuses a sweep directory that holds a different sweep."""
    root = sweep_root(trials)
    path = root / "sweep.json"
    records = [t.record() for t in trials]
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        def identity(rs):  # what defines the trials; the config path may be spelled differently
            return [(r.get("name"), r.get("overrides"), r.get("shared")) for r in rs]

        if not old or identity(old.get("trials", [])) != identity(json.loads(json.dumps(records))):
            raise CprecError(f"{root} holds another sweep (see its sweep.json); pass --sweep_dir to choose a new directory")
    write_json(path, {"config": spec, "trials": records})
    return root


def _to_launch(trials: Sequence[Trial], out: Print) -> list[Trial]:
    todo = []
    for t in trials:
        status = read_status(t.workdir)
        if status.get("status") == "finished":
            out(f"  {t.name}: finished already, skipped")
        elif is_active(status):
            where = status.get("job_id") or f"pid {status.get('pid')}"
            out(f"  {t.name}: still {status['status']} ({where}), skipped")
        else:
            todo.append(t)
    return todo


def _outcome(status: Mapping[str, Any]) -> str:
    if status.get("status") == "failed":
        return f"failed (exit {status.get('returncode')}): {status.get('error')}"
    return f"{status.get('status')}" + (f" in {status['seconds']}s" if "seconds" in status else "")


def launch_local(trials: Sequence[Trial], spec: str, parallel: int = 1, out: Print = print) -> int:
    """Runs the unfinished trials here, `parallel` at a time; returns how many failed."""
    if parallel < 1:
        raise CprecError(f"--parallel={parallel} is invalid: must be >= 1")
    root = _record_sweep(trials, spec)
    todo = _to_launch(trials, out)
    if not todo:
        out(f"nothing to run: all {len(trials)} trials are finished or still running")
        return 0
    out(f"running {len(todo)} of {len(trials)} trials, {parallel} at a time; logs in {root}/<trial>/log.txt")
    cwd = pathlib.Path.cwd()
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(run_trial, t, cwd): t for t in todo}
        for future in concurrent.futures.as_completed(futures):
            status = future.result()
            failed += status["status"] != "finished"
            out(f"  {futures[future].name}: {_outcome(status)}")
    out(f"{len(todo) - failed} finished, {failed} failed" + ("; see the failed trials' log.txt" if failed else ""))
    return failed


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """sbatch resources per trial; None leaves SLURM's (or submitit's) default."""

    partition: str | None = None
    gpus: int | None = None
    cpus: int | None = None
    mem_gb: float | None = None
    time_min: int = 240
    array_parallelism: int | None = None

    @classmethod
    def merge(cls, section: Mapping[str, Any] | None, **flags: Any) -> "SlurmOptions":
        """Flags win over a config's `slurm` section (same names: partition, gpus, cpus, ...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = dict(section.items()) if section else {}
        unknown = sorted(set(values) - names)
        if unknown:
            raise CprecError(f"config.slurm.{unknown[0]} is unknown; valid keys: {', '.join(sorted(names))}")
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls(**values)


class TrialFailed(RuntimeError):
    """Raised inside a SLURM job so the job itself reads FAILED."""


class SlurmTrial(Checkpointable):
    """The callable a SLURM array task runs: one trial, requeued on timeout or preemption."""

    def __init__(self, cwd: str) -> None:
        self.cwd = cwd

    def __call__(self, trial: Trial) -> dict[str, Any]:
        job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
        job_id = f"{job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job_id else os.environ.get("SLURM_JOB_ID")
        # SIGUSR2 announces the time limit to the whole step; only this process acts on it (checkpoint).
        status = run_trial(trial, self.cwd, "slurm", job_id, child_ignores=(signal.SIGUSR2,))
        if status["status"] != "finished":
            raise TrialFailed(f"{trial.name}: {status.get('error')}")
        return status

    def checkpoint(self, trial: Trial) -> Any:
        """Requeues the same trial; run.py resumes it from its latest orbax checkpoint."""
        workdir = pathlib.Path(self.cwd) / trial.workdir
        write_json(workdir / "status.json", {**read_status(workdir), "status": "requeued", "requeued": _now()})
        return super().checkpoint(trial)


def _require_slurm() -> None:
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise CprecError("the slurm launcher needs submitit: pip install submitit==1.5.4") from None
    for tool in ("sbatch", "srun", "squeue"):
        if shutil.which(tool) is None:
            raise CprecError(f"the slurm launcher needs SLURM, but `{tool}` is not on PATH; use --launcher local")


def launch_slurm(trials: Sequence[Trial], spec: str, options: SlurmOptions, wait: bool = False,
                 out: Print = print) -> int:
    """Submits the unfinished trials as one job array; prints its id at once.

    With `wait`, blocks until every task ends and returns how many failed; else returns 0.
    """
    _require_slurm()
    import submitit

    root = _record_sweep(trials, spec)
    todo = _to_launch(trials, out)
    if not todo:
        out(f"nothing to submit: all {len(trials)} trials are finished or still queued")
        return 0
    executor = submitit.AutoExecutor(folder=root / ".submitit", cluster="slurm")
    try:
        executor.update_parameters(
            name=root.name, timeout_min=options.time_min, gpus_per_node=options.gpus,
            cpus_per_task=options.cpus, mem_gb=options.mem_gb, slurm_partition=options.partition,
            slurm_array_parallelism=options.array_parallelism,
            # the job unpickles cprec objects: make the repo importable from any working directory
            slurm_setup=[f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}"])
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; the error below has it
            jobs = executor.map_array(SlurmTrial(str(pathlib.Path.cwd())), todo)
    except Exception as exc:  # sbatch's refusal comes back as one of several submitit errors
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[-1] if lines else type(exc).__name__  # sbatch's last word is its reason
        raise CprecError(f"SLURM submission of {len(todo)} trials failed ({detail}); "
                         f"nothing is queued unless `squeue` shows it; see {root}/.submitit") from None
    array_id = jobs[0].job_id.split("_")[0]
    out(f"submitted SLURM job {array_id}: {len(jobs)} trials, logs in {root}/<trial>/log.txt and {root}/.submitit")
    for trial, job in zip(todo, jobs):
        status = read_status(trial.workdir)
        if status.get("job_id") != job.job_id:  # the task may already have started and written its own
            write_json(trial.workdir / "status.json", {"status": "submitted", "launcher": "slurm",
                                                        "job_id": job.job_id, "submitted": _now()})
        out(f"  {trial.name}: job {job.job_id}")
    with open(root / "slurm_jobs.jsonl", "a") as f:
        f.write(json.dumps({"job_id": array_id, "submitted": _now(),
                            "trials": {t.name: j.job_id for t, j in zip(todo, jobs)}}) + "\n")
    if not wait:
        out(f"follow it with `squeue -j {array_id}`; `python run.py --summarize {root}` shows the results")
        return 0
    return wait_slurm(todo, jobs, out)


def wait_slurm(trials: Sequence[Trial], jobs: Sequence[Any], out: Print = print) -> int:
    """Blocks until every job ends, printing each trial's outcome; returns how many failed.

    A job is over when submitit's result file appears, or when it has left the queue (squeue):
    sacct is not used, since many clusters (and a test one) run without accounting.
    """
    try:
        return _wait(trials, jobs, out)
    except KeyboardInterrupt:
        array_id = jobs[0].job_id.split("_")[0]
        raise CprecError(f"stopped waiting; job {array_id} keeps running (squeue -j {array_id})") from None


def _wait(trials: Sequence[Trial], jobs: Sequence[Any], out: Print) -> int:
    pending = dict(enumerate(zip(trials, jobs)))
    gone: dict[int, int] = {}
    failed, start = 0, time.time()
    while pending:
        queued = _squeue_ids(max_age_s=0)
        for key, (trial, job) in list(pending.items()):
            if job.paths.result_pickle.exists():
                status = read_status(trial.workdir)
                if status.get("status") not in ("finished", "failed"):  # the job broke before the trial ran
                    status = _mark_failed(trial, f"job {job.job_id} ended early: {_job_error(job)}")
            elif queued is not None and job.job_id not in queued:
                gone[key] = gone.get(key, 0) + 1
                if gone[key] < 3:  # just left the queue: give its result file a few polls to appear
                    continue
                status = _mark_failed(trial, f"job {job.job_id} left the queue without a result; see {job.paths.stderr}")
            else:
                gone.pop(key, None)
                continue
            del pending[key]
            failed += status.get("status") != "finished"
            out(f"  {trial.name} (job {job.job_id}): {_outcome(status)}")
        if pending:
            time.sleep(min(30.0, 2.0 + (time.time() - start) / 20))  # quick for short jobs, gentle on squeue later
    out(f"{len(trials) - failed} finished, {failed} failed")
    return failed


def _mark_failed(trial: Trial, error: str) -> dict[str, Any]:
    status = {**read_status(trial.workdir), "status": "failed", "error": error}
    write_json(trial.workdir / "status.json", status)
    return status


def _job_error(job: Any) -> str:
    try:
        exc = job.exception()
    except Exception as error:  # no result file at all: submitit says why
        exc = error
    lines = [line.strip() for line in str(exc or "no error recorded").splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
