"""Timing helpers shared by the benchmarks."""
from __future__ import annotations

import datetime
import os
import pathlib
import platform
import shlex
import sys

import jax
import jax.numpy as jnp

from cprec.runtime.allocator import keep_freed_memory
from cprec.jsonfile import write_json
from cprec.timing import median_seconds

keep_freed_memory()  # benchmarks measure the same allocator setting as training runs

RESULTS_DIR = pathlib.Path(__file__).resolve().parents[2] / "bench_results"


def matmul_peak_flops(sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 7) -> float:
    """The machine's f32 matmul peak: the best median FLOP/s of square n x n @ n x n products."""
    f = jax.jit(lambda x, y: x @ y)
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
        best = max(best, 2 * n**3 / median_seconds(lambda: f(a, b), repeats=repeats, warmup=2))
    return best


def compiled_flops(jitted, *args) -> float:
    """FLOPs of one call as counted by XLA's cost analysis of the compiled program."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def device_info() -> dict[str, str]:
    d = jax.devices()[0]
    return {"platform": d.platform, "device": str(d.device_kind), "host": platform.node(),
            "jax": jax.__version__}


def provenance() -> dict[str, str]:
    """The command and UTC date of this benchmark run, the fields a results/ table cites (results/README.md)."""
    module = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = f"python -m {module.name}" if module else f"python {sys.argv[0]}"
    return {"command": " ".join([prog, *map(shlex.quote, sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}


def save_results(name: str, payload: dict, path: str | pathlib.Path | None = None) -> pathlib.Path:
    """Writes ``bench_results/<name>-<platform>.json`` (or ``path``) with the command, date and device."""
    return write_json(path or RESULTS_DIR / f"{name}-{jax.devices()[0].platform}.json",
                      {**provenance(), "device": device_info(), **payload})


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): a shared machine's noise, recorded."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def finish(res: dict, out: str | pathlib.Path, load_start: float | None) -> dict:
    """Adds the device and the load averages to a benchmark's results, saves them to `out`, says where."""
    res |= {**provenance(), "device": device_info(), "load_average_start": load_start,
            "load_average_end": load_average()}
    print(f"saved {write_json(out, res)}")
    return res
