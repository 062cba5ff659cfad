"""Load test of the HTTP server: closed-loop `wrk` clients against `python -m cprec.serve` on 127.0.0.1.

    python -m cprec.bench.server exports/c1m-serve/int8 [--concurrency 1 8 64 256] [--duration 10] [--soak 60]

For each server setting (auto-batching: --max-batch-size 256 --batch-timeout-ms 2; and without:
--max-batch-size 1) and each request kind (stateless /v1/recommend with a 20-item history, and
/v1/sessions/{id}/events appending one item to one of 10,000 users' sessions), runs `wrk` at each
concurrency for --duration seconds and reports requests/s (= recommendations/s: one top-20 per
request), p50 and p99 latency, and failed requests. Then a soak: --soak seconds at concurrency 64
on the batched server, after which a sample of requests is compared with an in-process
`Recommender` (same top-20). Histories are drawn from the artifact's training item counts, so any
artifact works without its data. Needs `wrk` (Debian/Ubuntu: `apt install wrk`).

Saves bench_results/server-<artifact>-<platform>.json (see ``results_name``).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import httpx
import jax
import numpy as np

from cprec.bench.common import RESULTS_DIR, finish, load_average
from cprec.errors import CprecError, exit_on_user_error
from cprec.serve.artifact import DTYPES, load_artifact
from cprec.serve.recommender import Recommender

SETTINGS = {"batched": ["--max-batch-size", "256", "--batch-timeout-ms", "2"],
            "unbatched": ["--max-batch-size", "1", "--batch-timeout-ms", "0"]}
HISTORY_LEN, USERS, BODIES = 20, 10_000, 2_000

LUA = """
local bodies = {%(bodies)s}
local paths = {%(paths)s}
local counter = 0
request = function()
  counter = counter + 1
  local k = (counter * 7919 + math.random(0, #bodies)) %% #bodies + 1
  return wrk.format("POST", paths[k], {["Content-Type"] = "application/json"}, bodies[k])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('CPREC_JSON {"requests": %%d, "duration_us": %%d, "status_errors": %%d, '
    .. '"connect_errors": %%d, "read_errors": %%d, "write_errors": %%d, "timeouts": %%d, '
    .. '"p50_us": %%d, "p99_us": %%d, "mean_us": %%f}\\n', summary.requests, summary.duration, e.status,
    e.connect, e.read, e.write, e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cprec.bench.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="an export directory (python -m cprec.export)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    p.add_argument("--soak", type=int, default=60, help="seconds of the soak at concurrency 64 (0: none)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--out", default=None)
    return p


def histories(artifact_dir: str, count: int, seed: int = 0) -> list[list]:
    """`count` histories of HISTORY_LEN raw ids drawn by training popularity (any artifact, no data)."""
    art = load_artifact(artifact_dir)
    counts = np.asarray(art.item_counts, np.float64)[1:] + 1.0
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(1, len(counts) + 1), size=(count, HISTORY_LEN), p=counts / counts.sum())
    return [[art.item_ids[int(i)] for i in row] for row in ids]


def _lua(kind: str, hist: list[list], path: pathlib.Path) -> pathlib.Path:
    def lua_string(s: str) -> str:
        return "[==[" + s + "]==]"
    if kind == "recommend":
        bodies = [json.dumps({"history": h, "n": 20}) for h in hist]
        paths = ["/v1/recommend"] * len(hist)
    else:  # one new event per request, spread over USERS sessions
        rng = np.random.default_rng(1)
        bodies = [json.dumps({"items": [h[-1]], "n": 20}) for h in hist]
        paths = [f"/v1/sessions/user-{int(u)}/events" for u in rng.integers(0, USERS, len(hist))]
    path.write_text(LUA % {"bodies": ",".join(map(lua_string, bodies)), "paths": ",".join(map(lua_string, paths))})
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m cprec.serve` on a free port, ready; ``checkout``: run that checkout's cprec instead."""

    def __init__(self, artifact: str, args: list[str], checkout: str | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = None if checkout is None else {**os.environ, "PYTHONPATH": str(pathlib.Path(checkout).resolve())}
        self.proc = subprocess.Popen([sys.executable, "-m", "cprec.serve", str(pathlib.Path(artifact).resolve()),
                                      "--port", str(self.port), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=checkout, env=env)
        start, lines = time.perf_counter(), []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise CprecError("the server exited before it was ready:\n" + "".join(lines[-20:]))
            lines.append(line)
            print("  " + line.rstrip(), flush=True)
            if "ready on" in line:
                break
        self.ready_s = time.perf_counter() - start
        # A server that compiles the rest of its shapes in the background: measure it once it is done.
        while httpx.get(self.url + "/healthz", timeout=60).json().get("compiling", 0):
            time.sleep(0.5)
        self.settled_s = time.perf_counter() - start
        print(f"  settled (background warm-up done) after {self.settled_s:.1f} s", flush=True)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def wrk(url: str, script: pathlib.Path, concurrency: int, duration: int) -> dict:
    threads = min(2, concurrency)
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{duration}s", "--timeout", "10s",
                          "-s", str(script), url], capture_output=True, text=True, timeout=duration + 120)
    line = next((x for x in out.stdout.splitlines() if x.startswith("CPREC_JSON ")), None)
    if line is None:
        raise CprecError(f"wrk printed no summary (status {out.returncode}): {out.stderr.strip()[-300:]}")
    r = json.loads(line.split(" ", 1)[1])
    failed = r["status_errors"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
    return {"concurrency": concurrency, "requests": r["requests"], "failed": failed,
            "requests_per_s": r["requests"] / (r["duration_us"] / 1e6),
            "p50_ms": r["p50_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3, "mean_ms": r["mean_us"] / 1e3}


def soak_check(url: str, artifact: str, hist: list[list], sample: int = 50) -> dict:
    """The server's top-20 for a sample of histories against an in-process Recommender's."""
    rec = Recommender.load(artifact)
    want = rec.recommend(hist[:sample], n=20)
    same = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        for h, w in zip(hist[:sample], want):
            same += client.post("/v1/recommend", json={"history": h, "n": 20}).json()["items"] == w.items
    return {"sample": sample, "identical_top20": same}


def run(args) -> dict:
    if shutil.which("wrk") is None:
        raise CprecError("the server benchmark needs `wrk` on PATH (Debian/Ubuntu: apt install wrk)")
    hist = histories(args.artifact, BODIES)
    res: dict = {"artifact": str(args.artifact), "duration_s": args.duration, "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        scripts = {k: _lua(k, hist, pathlib.Path(tmp) / f"{k}.lua") for k in ("recommend", "session")}
        for setting in args.settings:
            print(f"[server] {setting}: starting", flush=True)
            server = ServerProcess(args.artifact, SETTINGS[setting])
            rows = {"ready_s": server.ready_s}
            try:
                for kind, script in scripts.items():
                    rows[kind] = []
                    for c in args.concurrency:
                        row = wrk(server.url, script, c, args.duration)
                        rows[kind].append(row)
                        print(f"[server] {setting} {kind} c={c}: {row['requests_per_s']:,.0f} req/s, p50 "
                              f"{row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, failed {row['failed']}", flush=True)
                if setting == "batched" and args.soak:
                    rows["soak"] = wrk(server.url, scripts["recommend"], 64, args.soak)
                    rows["soak"] |= soak_check(server.url, args.artifact, hist)
                    print(f"[server] soak {args.soak} s at c=64: {rows['soak']}", flush=True)
                rows["metrics_excerpt"] = [line for line in httpx.get(server.url + "/metrics").text.splitlines()
                                           if line.startswith(("cprec_batch_size_sum", "cprec_batch_size_count"))]
            finally:
                rows["exit_status"] = server.stop()
            res["settings"][setting] = rows
    if {"batched", "unbatched"} <= set(res["settings"]):
        b, u = res["settings"]["batched"]["recommend"], res["settings"]["unbatched"]["recommend"]
        res["batched_over_unbatched"] = {r["concurrency"]: r["requests_per_s"] / s["requests_per_s"]
                                         for r, s in zip(b, u)}
    return res


def results_name(artifact: str) -> str:
    """The artifact's name in the results file: its directory, prefixed by the run's name when the
    directory is only a dtype (``runs/c1m-serve/exports/int8`` -> ``c1m-serve-int8``), so that the
    exports of two runs do not overwrite each other's results."""
    path = pathlib.Path(artifact).resolve()
    if path.name not in DTYPES:
        return path.name
    run = path.parent.parent if path.parent.name == "exports" else path.parent
    return f"{run.name}-{path.name}"


def run_on_artifact(run: Callable[[argparse.Namespace], dict], args: argparse.Namespace, prefix: str) -> dict:
    """Runs an artifact benchmark's ``run(args)`` (user errors as one line), then saves its results
    to ``args.out`` or bench_results/<prefix>-<artifact>-<platform>.json."""
    load_start = load_average()
    with exit_on_user_error():
        res = run(args)
    name = f"{prefix}-{results_name(args.artifact)}-{jax.devices()[0].platform}.json"
    return finish(res, args.out or RESULTS_DIR / name, load_start)


def main(argv: list[str] | None = None) -> dict:
    return run_on_artifact(run, _parser().parse_args(argv), "server")


if __name__ == "__main__":
    main()
