"""Every GPU check in one command, for a GPU lent for minutes: tests, training throughput, and one
epoch of the 1M-item baseline with the full softmax (the real thing) beside the sampled one.

    python -m cprec.bench.gpu_check OUT            # on the GPU machine, about 10 minutes on one H200
    python -m cprec.bench.gpu_check OUT --tiny     # every step at a tiny size, on any machine (CPU)

Steps, each a subprocess with its own time limit, run in order whatever the previous one did:

1. ``tests``: the model, output-layer, training-step and serving tests on the default device
   (the tree softmax's exact early stop under the platform's matmul precision among them);
2. ``train_bench``: ``python -m cprec.bench.nextitnet`` on the synthetic data (training tokens/s and
   FLOP/s against the measured matmul peak);
3. ``full_1m``: ``experiments/nextitnet.py:synthetic1m,softmax=full``, one epoch, evaluated on the
   preset's 10,000 users;
4. ``sampled_1m``: the same preset as it is (sampled softmax, lazy-Adam tables).

``OUT/gpu_check.json`` gets, after every step, each step's status, wall time, command and numbers
(test counts, the benchmark's JSON, the runs' results.json); ``OUT/gpu_check.log`` the tail of every
step's output. Two files, so they come back from a device machine whole.

The device image has JAX with CUDA, flax, optax and orbax; the rest travels as wheels (see
docs/benchmarks.md, "GPU").
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEST_FILES = ("tests/test_model.py", "tests/test_tree_softmax.py", "tests/test_sampled_softmax.py",
              "tests/test_sparse_tables.py", "tests/test_metrics.py", "tests/test_serve_recommender.py",
              "tests/test_serve_incremental.py")
# A synthetic catalogue small enough for seconds on a CPU, for --tiny.
_TINY_DATA = ["--config.data.num_items=2000", "--config.data.num_users=300", "--config.data.mean_len=20",
              "--config.data.num_topics=10", "--config.train.num_steps=4", "--config.eval.num_users=64",
              "--config.train.eval_every=4", "--config.eval.topk_batches=(1,)", "--config.model.num_negatives=64"]


def steps(out: pathlib.Path, tiny: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of every check."""
    py = sys.executable
    tests = [py, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "-m", "not slow", "-x"]
    tests += ["tests/test_sampled_softmax.py", "-k", "config_errors"] if tiny else list(TEST_FILES)
    bench = [py, "-m", "cprec.bench.nextitnet", "--data", "synthetic", "--out", str(out / "train_bench.json")]
    bench += ["--dims", "16", "--batch", "8", "--steps", "2", "--repeats", "1"] if tiny else ["--dims", "64,256"]
    def run(spec: str, name: str) -> list[str]:  # --config first: the overrides apply to it
        return [py, "run.py", "--config", spec, "--workdir", str(out / "runs" / name),
                "--config.eval.batch_size=256"] + (_TINY_DATA if tiny else [])

    return [
        ("tests", tests, 150 if tiny else 200),
        ("train_bench", bench, 120 if tiny else 90),
        ("full_1m", run("experiments/nextitnet.py:synthetic1m,softmax=full", "full_1m"), 240 if tiny else 200),
        ("sampled_1m", run("experiments/nextitnet.py:synthetic1m", "sampled_1m"), 240 if tiny else 100),
    ]


def _numbers(name: str, out: pathlib.Path, text: str) -> dict:
    """What a finished step measured: test counts, the benchmark's JSON, a run's results.json."""
    if name == "tests":
        return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", text)}
    path = out / "train_bench.json" if name == "train_bench" else out / "runs" / name / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for gpu_check.json, gpu_check.log and the runs")
    p.add_argument("--tiny", action="store_true", help="every step at a tiny size (checks the script on a CPU)")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps")
    args = p.parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not args.tiny:
        env.pop("JAX_PLATFORMS", None)  # the GPU: tests/conftest.py would otherwise pin the CPU
        env["JAX_PLATFORMS"] = "cuda"
    report = {"tiny": args.tiny, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}}
    log = (out / "gpu_check.log").open("w")
    for name, command, limit in steps(out, args.tiny):
        if args.only and name not in args.only:
            continue
        print(f"[gpu_check] {name}: {' '.join(command)} (limit {limit} s)", flush=True)
        t0 = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            status = "passed" if done.returncode == 0 else f"failed ({done.returncode})"
            text = done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            status = f"timed out after {limit} s"
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        wall = time.perf_counter() - t0
        report["steps"][name] = {"status": status, "wall_s": round(wall, 1), "command": " ".join(command),
                                 "numbers": _numbers(name, out, text)}
        log.write(f"==== {name}: {status} in {wall:.0f} s\n{text[-6000:]}\n")
        log.flush()
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"[gpu_check] {name}: {status} in {wall:.0f} s", flush=True)
    log.close()
    return 0 if all(s["status"] == "passed" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
