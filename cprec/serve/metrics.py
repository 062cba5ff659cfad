"""Counters, gauges and histograms in the Prometheus text exposition format (version 0.0.4).

Small on purpose: the server needs labelled counters, a few gauges read at scrape time and two
histograms, with no global registry (tests start several servers in one process).
"""
from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


class Counter:
    def __init__(self, name: str, help_: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help_, tuple(labels)
        self._values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            lines += [f"{self.name}{_labels(self.labels, k)} {v:g}" for k, v in sorted(self._values.items())]
        return lines


class Gauge:
    """A value read at scrape time from a callback: {label values: value}."""

    def __init__(self, name: str, help_: str, read: Callable[[], dict[tuple, float]], labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.read, self.labels = name, help_, read, tuple(labels)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        return lines + [f"{self.name}{_labels(self.labels, k)} {v:g}" for k, v in sorted(self.read().items())]


class Histogram:
    def __init__(self, name: str, help_: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.buckets, self.labels = name, help_, tuple(buckets), tuple(labels)
        self._counts: dict[tuple, list[int]] = {}
        self._sums: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            counts = self._counts.setdefault(labels, [0] * (len(self.buckets) + 1))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sums[labels] = self._sums.get(labels, 0.0) + value

    def count(self, *labels: str) -> int:
        return sum(self._counts.get(labels, ()))

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for key in sorted(self._counts):
                cumulative = 0
                for bound, c in zip((*self.buckets, float("inf")), self._counts[key]):
                    cumulative += c
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f"{self.name}_bucket{_labels((*self.labels, 'le'), (*key, le))} {cumulative}")
                lines.append(f"{self.name}_sum{_labels(self.labels, key)} {self._sums[key]:g}")
                lines.append(f"{self.name}_count{_labels(self.labels, key)} {cumulative}")
        return lines


def render(metrics: Sequence[Counter | Gauge | Histogram]) -> str:
    return "\n".join(line for m in metrics for line in m.render()) + "\n"
