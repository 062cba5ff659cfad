"""A private one-node SLURM (munged, slurmctld, slurmd) in a temporary folder, for tests and CI.

Everything lives under one folder: the munge key and socket, slurm.conf (found through
$SLURM_CONF), state, spool, logs and pid files; ports are picked free, so a system SLURM, if any,
is left alone. Needs root (SlurmUser=root). Debian's `slurm-wlm` and `munge` are installed with
apt when `sbatch` is missing and apt is usable.

    python tests/slurm_cluster.py start /tmp/slurm    # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py stop /tmp/slurm
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order: clients first


class ClusterUnavailable(Exception):
    """SLURM can't run here; the message says why (a reason to skip, not a failure)."""


def ensure_installed() -> float:
    """Installs slurm-wlm and munge with apt if sbatch is missing; returns the seconds apt took (0 if not)."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return 0.0
    if os.geteuid() != 0:
        raise ClusterUnavailable("sbatch is not installed and installing slurm-wlm needs root")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("sbatch is not installed and apt-get is not available to install slurm-wlm")
    start = time.time()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:  # the package lists may be missing on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not shutil.which("sbatch"):
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ClusterUnavailable(f"apt-get install slurm-wlm munge failed: {tail[0]}")
    return time.time() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
    return int(kb / 1024 * 0.9)  # a little under the machine's, or slurmd marks the node invalid


class SlurmCluster:
    """Writes the config and starts the daemons under `root`; `stop()` ends the ones it started."""

    def __init__(self, root: str | pathlib.Path) -> None:
        self.root = pathlib.Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point SLURM's commands at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def pid_file(self, daemon: str) -> pathlib.Path:
        return self.root / "run" / f"{daemon}.pid"

    def start(self, timeout_s: float = 60.0) -> None:
        if os.geteuid() != 0:
            raise ClusterUnavailable("a private SLURM here runs its daemons as root (SlurmUser=root)")
        for sub in ("munge", "run", "log", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._start_munge()
        self._write_conf()
        env = {**os.environ, **self.env}
        for daemon in ("slurmctld", "slurmd"):
            result = subprocess.run([daemon, "-f", str(self.conf)], capture_output=True, text=True, env=env)
            if result.returncode != 0:
                self.stop()
                raise ClusterUnavailable(f"{daemon} did not start: {self._log_tail(daemon) or result.stderr.strip()}")
        self._wait_idle(timeout_s, env)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        cmd = ["munged", "--force", f"--socket={self.root / 'munge' / 'munge.socket'}", f"--key-file={key}",
               f"--pid-file={self.pid_file('munged')}", f"--log-file={self.root / 'log' / 'munged.log'}",
               f"--seed-file={self.root / 'munge' / 'munged.seed'}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ClusterUnavailable(f"munged did not start: {(result.stderr or result.stdout).strip()}")

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(f"""\
ClusterName=cprec-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={r / 'munge' / 'munge.socket'}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={self.pid_file('slurmctld')}
SlurmdPidFile={self.pid_file('slurmd')}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_idle(self, timeout_s: float, env: dict[str, str]) -> None:
        deadline = time.time() + timeout_s
        state = ""
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
            state = out.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        self.stop()
        raise ClusterUnavailable(f"the SLURM node did not become idle in {timeout_s:.0f}s (state {state!r}); "
                                 f"see {self.root / 'log'}")

    def _log_tail(self, daemon: str) -> str:
        log = self.root / "log" / f"{daemon}.log"
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        return lines[-1] if lines else ""

    def _drain(self, timeout_s: float) -> None:
        """Cancels what is left in the queue and waits for it to leave: a job step whose slurmd is
        gone would wait for it forever."""
        env = {**os.environ, **self.env}

        def queued() -> list[str]:
            out = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, env=env)
            return out.stdout.split() if out.returncode == 0 else []

        jobs = queued()
        if jobs:
            subprocess.run(["scancel", *jobs], capture_output=True, env=env)
        deadline = time.time() + timeout_s
        while queued() and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)  # a step's last report to slurmd follows its job's exit from the queue

    def stop(self, timeout_s: float = 20.0) -> None:
        """Cancels leftover jobs, then terminates the daemons named in this cluster's pid files."""
        if self.pid_file("slurmctld").exists():
            self._drain(timeout_s)
        for daemon in DAEMONS:
            path = self.pid_file(daemon)
            try:
                pid = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + timeout_s
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a daemon we started is our child only when started in-process; reap it if so
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return _state(pid) != "Z"


def _state(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit("usage: python tests/slurm_cluster.py start|stop FOLDER")
    cluster = SlurmCluster(sys.argv[2])
    if sys.argv[1] == "stop":
        cluster.stop()
    else:
        try:
            ensure_installed()
            cluster.start()
        except ClusterUnavailable as exc:
            sys.exit(f"error: {exc}")
        print(f"export SLURM_CONF={cluster.conf}")
