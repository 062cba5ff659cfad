"""Data-parallel training on 4 simulated CPU devices matches one device."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from tests.helpers import tiny_config
from cprec.train import train_and_evaluate
c = tiny_config(sys.argv[1])
c.train.num_steps, c.train.log_every, c.train.eval_every = 16, 1, 8
c.train.batch_size, c.eval.batch_size, c.train.micro_batch_size = int(sys.argv[3]), 32, int(sys.argv[4])
try:
    train_and_evaluate(c, sys.argv[2])
except Exception as e:
    print("ERROR", type(e).__name__, e)
"""


def _train(tmp_path, name, devices, batch=16, micro_batch_size=0):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "cache"), str(tmp_path / name), str(batch),
                          str(micro_batch_size)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _losses(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [line["train/loss"] for line in lines if "train/loss" in line]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> pathlib.Path:
    """A directory holding the one-device reference run ("one") and its prepared data ("cache"),
    shared by the tests that compare a parallel run with it (each run is a fresh process: ~20 s)."""
    root = tmp_path_factory.mktemp("parallel")
    _train(root, "one", 1)
    return root


def _same_run(root: pathlib.Path, name: str) -> None:
    one, other = _losses(root / "one"), _losses(root / name)
    assert len(one) == len(other) == 16  # every step is logged, the compiling first one too
    assert other == pytest.approx(one, rel=1e-4)
    a = json.loads((root / "one" / "results.json").read_text())["test"]
    b = json.loads((root / name / "results.json").read_text())["test"]
    assert b == pytest.approx(a, rel=1e-4, abs=1e-6)


# Whole batch; 2 micro-batches of 2 rows per device.
@pytest.mark.slow
@pytest.mark.parametrize("micro_batch_size", [0, 2])
def test_four_devices_match_one(one_device, micro_batch_size):
    _train(one_device, f"four-{micro_batch_size}", 4, micro_batch_size=micro_batch_size)
    _same_run(one_device, f"four-{micro_batch_size}")


def test_batch_not_divisible_by_devices_is_an_error(tmp_path):
    out = _train(tmp_path, "bad", 4, batch=18)
    assert "ERROR ConfigError config.train.batch_size=18 does not divide by the 4 devices" in out




LATE_HOST_SCRIPT = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from cprec.runtime.parallel import DataParallel, initialize_distributed
initialize_distributed()
parallel = DataParallel()
if jax.process_index() == 1:
    time.sleep(float(sys.argv[1]))  # as a host whose first compile is slow would be
total = jax.jit(lambda x: jnp.sum(2 * x), out_shardings=parallel.replicated)
print("TOTAL", float(total(parallel.shard(np.arange(2, dtype=np.float32)))), flush=True)
"""


def _run_hosts(args: list[str], ports_from: int) -> list[str]:
    """Runs a script as the two tasks of a one-node SLURM job; returns each task's stdout."""
    job = str(ports_from + os.getpid() % 10000)  # SLURM's job id also picks the coordinator port
    procs = []
    for rank in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
               "SLURM_JOB_ID": job, "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
               "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_NUM_NODES": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=ROOT))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "ERROR" not in out, out + err[-2000:]
    return [out for out, _ in outs]


@pytest.mark.slow  # 35 s; test_two_hosts_match_one runs two hosts in CI
def test_a_host_late_to_its_first_collective_is_waited_for():
    """Gloo gives up on a host 30 s late to the first collective; DataParallel connects the hosts up front."""
    outs = _run_hosts([LATE_HOST_SCRIPT, "35"], ports_from=50000)
    assert all("TOTAL 2.0" in out for out in outs), outs


@pytest.mark.slow  # kept out of CI: another test covers this path faster (run with -m slow)
def test_two_hosts_match_one(one_device):
    """Two processes joined by jax.distributed, as two SLURM tasks would be, train like one device."""
    _run_hosts([SCRIPT, str(one_device / "cache"), str(one_device / "hosts"), "16", "0"], ports_from=40000)
    _same_run(one_device, "hosts")
