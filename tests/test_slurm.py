"""The SLURM launcher against a real one-node SLURM started for these tests (see tests/slurm_cluster.py).

Skipped, with the reason, where SLURM is absent and can't be installed (no root or no apt).
"""
import json
import os
import subprocess
import time

import pytest

from slurm_cluster import ClusterUnavailable, SlurmCluster, ensure_installed
from test_sweep import run_cli, write_config


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment variables pointing at a private, running SLURM; its daemons stop afterwards."""
    try:
        seconds = ensure_installed()
        if seconds:
            print(f"\ninstalled slurm-wlm and munge with apt in {seconds:.1f}s")
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
        cluster.start()
    except ClusterUnavailable as exc:
        print(f"\nskipping the SLURM tests: {exc}")
        pytest.skip(str(exc))
    try:
        yield cluster.env
    finally:
        cluster.stop()


@pytest.mark.slow  # about 80 s (apt, daemons, 4 trials): kept out of CI, whose budget is 10 minutes
def test_slurm_sweep_runs_every_trial(slurm, tmp_path):
    path = write_config(tmp_path, 'return product({"model.sharing": ["none", "cross_layer"]}, seeds(2))')
    result = run_cli([f"--config={path}", "--sweep", "--launcher=slurm", "--slurm_cpus=1", "--slurm_time_min=10",
                      "--wait"], cwd=tmp_path, env=slurm, timeout=540)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted SLURM job" in result.stdout and "4 finished, 0 failed" in result.stdout
    root = tmp_path / "runs" / "tiny"
    workdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in workdirs] == ["0_sharing=none,seed=0", "1_sharing=none,seed=1",
                                          "2_sharing=cross_layer,seed=0", "3_sharing=cross_layer,seed=1"]
    for workdir in workdirs:
        assert (workdir / "metrics.jsonl").stat().st_size > 0
        assert set(json.loads((workdir / "results.json").read_text())["test"]) >= {"hr@10", "ndcg@10", "mrr@5"}
        status = json.loads((workdir / "status.json").read_text())
        assert status["status"] == "finished" and status["launcher"] == "slurm"

    again = run_cli([f"--config={path}", "--sweep", "--launcher=slurm"], cwd=tmp_path, env=slurm)
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    summary = run_cli([f"--summarize={root}"], cwd=tmp_path)
    assert "4 trials: 4 finished" in summary.stdout


@pytest.mark.slow
def test_slurm_requeue_resumes_the_same_trial(slurm, tmp_path):
    """USR2 (what SLURM sends before the time limit) requeues the task; the trial resumes from its checkpoint.

    Slow: SLURM holds a requeued job for about two minutes before it starts again.
    """
    path = write_config(tmp_path, "return seeds(1)")
    result = run_cli([f"--config={path}", "--sweep", "--launcher=slurm", "--slurm_cpus=1",
                      "--config.train.num_steps=60000", "--config.train.checkpoint_every=1000",
                      "--config.train.log_every=1000", "--config.train.eval_every=30000"], cwd=tmp_path, env=slurm)
    assert result.returncode == 0, result.stderr
    workdir = tmp_path / "runs" / "tiny" / "0_seed=0"
    env = {**os.environ, **slurm}

    def wait_for(predicate, timeout_s):
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if predicate():
                return True
            time.sleep(1)
        return False

    log = workdir / "log.txt"
    assert wait_for(lambda: log.exists() and "step 3000/" in log.read_text(), 120), "the trial did not start"
    job_id = json.loads((workdir / "status.json").read_text())["job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, env=env)
    assert wait_for(lambda: json.loads((workdir / "status.json").read_text())["status"] == "requeued", 60)
    finished = wait_for(lambda: json.loads((workdir / "status.json").read_text())["status"] == "finished", 420)
    assert finished, "the requeued trial did not finish"
    text = log.read_text()
    assert text.count("==> ") == 2 and "resuming from checkpoint at step" in text
    assert (workdir / "results.json").exists()
