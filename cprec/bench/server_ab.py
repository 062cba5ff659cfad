"""Interleaved A/B of server settings: several servers side by side, `wrk` against each in turn.

    python -m cprec.bench.server_ab exports/cprec-demo --variant none="--length-buckets none" --variant auto=""
    python -m cprec.bench.server_ab exports/c1m --variant new="" --variant old@/tmp/old-checkout=""

Every variant runs both batched and unbatched (the settings of ``cprec.bench.server``) with its
extra command-line arguments; a variant named NAME@DIR runs the cprec of the checkout in DIR (an
A/B of two versions of the server). All servers are started first (one after another, so their warm-ups
do not compete), then each round measures every server once with stateless /v1/recommend
requests at one concurrency: on a shared machine the rounds see the same background load, which
separate benchmark runs do not. Prints and saves the median requests/s per server and the batched
over unbatched ratio per variant, and the median p50 latency per server
(bench_results/server-ab-<artifact>-<platform>.json).
"""
from __future__ import annotations

import argparse
import pathlib
import shlex
import statistics
import tempfile

from cprec.bench.server import SETTINGS, ServerProcess, _lua, histories, run_on_artifact, wrk
from cprec.errors import CprecError


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, extra = text.partition("=")
    if not sep or not name:
        raise CprecError(f"--variant {text!r} is invalid: give NAME=\"EXTRA SERVER ARGS\" (the args may be empty)")
    return name, shlex.split(extra)


def run(args) -> dict:
    variants = dict(_variant(v) for v in args.variant)
    hist = histories(args.artifact, 2_000)
    servers: dict[str, ServerProcess] = {}
    res: dict = {"artifact": str(args.artifact), "concurrency": args.concurrency, "duration_s": args.duration,
                 "variants": {k: shlex.join(v) for k, v in variants.items()}, "rounds": []}
    with tempfile.TemporaryDirectory() as tmp:
        script = _lua("recommend", hist, pathlib.Path(tmp) / "recommend.lua")
        try:
            for name, extra in variants.items():
                for setting, flags in SETTINGS.items():
                    print(f"[ab] starting {name} {setting}", flush=True)
                    checkout = name.partition("@")[2]
                    servers[f"{name} {setting}"] = ServerProcess(args.artifact, [*flags, *extra], checkout or None)
            for r in range(args.rounds):
                for c in args.concurrency:
                    row = {}
                    for key, server in servers.items():
                        out = wrk(server.url, script, c, args.duration)
                        row[key] = out
                        print(f"[ab] round {r} c={c} {key}: {out['requests_per_s']:,.0f} req/s, p50 "
                              f"{out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.1f} ms, failed {out['failed']}", flush=True)
                    res["rounds"].append(row)
        finally:
            for server in servers.values():
                server.stop()
    res["ready_s"] = {k: s.ready_s for k, s in servers.items()}
    res["by_concurrency"] = {}
    for c in args.concurrency:
        rounds = [row for row in res["rounds"] if next(iter(row.values()))["concurrency"] == c]
        med = {k: statistics.median(r[k]["requests_per_s"] for r in rounds) for k in servers}
        p50 = {k: statistics.median(r[k]["p50_ms"] for r in rounds) for k in servers}
        ratio = {v: med[f"{v} batched"] / med[f"{v} unbatched"] for v in variants}
        res["by_concurrency"][c] = {"median_requests_per_s": med, "median_p50_ms": p50, "batched_over_unbatched": ratio,
                                    "failed": sum(r[k]["failed"] for r in rounds for k in servers)}
        for v in variants:
            print(f"[ab] c={c} {v}: batched {med[f'{v} batched']:,.0f} req/s, unbatched {med[f'{v} unbatched']:,.0f} "
                  f"req/s, {ratio[v]:.2f}x; p50 {p50[f'{v} batched']:.2f} ms batched, {p50[f'{v} unbatched']:.2f} ms "
                  f"unbatched (median of {args.rounds})", flush=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m cprec.bench.server_ab", description=__doc__)
    p.add_argument("artifact", help="an export directory (python -m cprec.export)")
    p.add_argument("--variant", action="append", required=True, metavar='NAME="ARGS"',
                   help="a named set of extra server arguments (repeat for each variant)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[64])
    p.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    return run_on_artifact(run, args, "server-ab")


if __name__ == "__main__":
    main()
