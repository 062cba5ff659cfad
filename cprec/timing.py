"""Wall-clock timing of jitted calls (used by the serving-latency report and the benchmarks)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` runs (blocks on jax outputs)."""
    return interleaved_median_seconds({"fn": fn}, repeats, warmup)["fn"]


def interleaved_median_seconds(fns: dict[str, Callable[[], object]], repeats: int = 5,
                               warmup: int = 1) -> dict[str, float]:
    """Median wall time of each fn, the fns timed in turn within every round (A/B/A/B...), so a
    noisy shared machine's slow spells fall on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}
