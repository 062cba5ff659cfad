"""cprec.timing: medians of wall times, and the interleaved A/B form the benchmarks use."""
import itertools

from cprec import timing


def test_interleaved_medians_time_each_fn_in_turn(monkeypatch):
    clock = itertools.count()  # every perf_counter() call advances one tick...
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))
    calls = []

    def fn(name, ticks):
        def run():
            calls.append(name)
            for _ in range(ticks):  # ...so a fn that reads the clock k times lasts k + 1 ticks
                timing.time.perf_counter()
        return run

    got = timing.interleaved_median_seconds({"a": fn("a", 0), "b": fn("b", 2)}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # the warm-up round, then three timed rounds, A/B/A/B
    assert got == {"a": 1.0, "b": 3.0}
    assert timing.median_seconds(fn("c", 4), repeats=3, warmup=0) == 5.0
