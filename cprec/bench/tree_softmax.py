"""Tree (block-wise) softmax vs full softmax at a million items, on this machine.

    python -m cprec.bench.tree_softmax                      # defaults: V=1,000,000, d=256
    python -m cprec.bench.tree_softmax --items 200000 --repeats 3   # quicker

(a) Training step (loss + grads w.r.t. h and all softmax params, jitted): tokens/s of the tree
    softmax for several cutoff choices (rank decay 4) vs a full softmax: the plain baseline
    (``h @ W[d, V]`` + log_softmax + gather, autodiff) and, as a stronger baseline, the tree's own
    fused cross-entropy (hand-written backward) applied to all V columns. Peak memory comes from XLA's
    compiled ``memory_analysis()`` (temp + arguments + outputs, i.e. what the executable holds
    while running; not process RSS), compared at the same token count (full: compiled, not run).
(b) Top-20 latency: early-stop ``BlockwiseSoftmax.top_k`` vs ``lax.top_k(log_prob(h))`` at batch
    1 and 256, checking that both give the same items, with the mean number of expanded clusters,
    for the fastest cutoffs of (a). Params: 'random-init' (each cluster token is one random column,
    so tails are rarely needed) and stand-ins for trained models, a Zipf(s) prior times
    per-context noise (see ``peaky_params``): s = 1.1 models only the data's marginal, where every
    tail cluster outweighs a 20th-best item, so nearly all are expanded; 1.3 and 1.5 are
    increasingly confident models.
(c) Defaults: the layer as a new user constructs it, ``BlockwiseSoftmax(dim, V, cutoffs, ranks)``
    (no ``capacities``, ``top_k`` without ``stats``), against the same layer tuned (capacities from
    the target counts, statistics computed once): training tokens/s and top-20 latency at batch 1
    and 256, cutoffs ``--defaults-cutoffs``.

Targets are Zipf(a) over frequency-ordered ids 1..V-1. Times are medians of at least ``--repeats``
runs after warm-up (compile excluded; see ``timed``); speed-ups are ratios measured in the same run.
Writes ``bench_results/tree_softmax.json`` at the repository root.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cprec.bench.common import RESULTS_DIR, load_average
from cprec.model.clusters import cluster_token_capacities, resolve_cutoffs, resolve_ranks
from cprec.jsonfile import write_json
from cprec.model.tree_softmax import BlockwiseSoftmax
from cprec.model.xent import row_xent

DEFAULT_CUTOFFS = (
    "20000,200000",
    "20000,60000,150000,350000,600000",
    "5000,20000,60000,150000,350000,600000",
    "2000,8000,30000,80000,180000,400000,700000",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000, help="V, item ids including padding")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--tokens", type=int, default=2048, help="target tokens per tree training step")
    p.add_argument("--full-tokens", type=int, default=128,
                   help="tokens per full-softmax training step (its tokens/s is flat in the batch here)")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the targets")
    p.add_argument("--cutoffs", nargs="+", default=list(DEFAULT_CUTOFFS),
                   help="cutoff lists to compare, each comma-separated (ids or fractions of V)")
    p.add_argument("--rank-decay", type=float, default=4.0)
    p.add_argument("--margin", type=float, default=1.5, help="token capacity margin")
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--topk-batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--time-budget", type=float, default=2.0,
                   help="seconds of extra timing rounds per fast top-k comparison (more rounds, steadier medians)")
    p.add_argument("--skip-full", action="store_true", help="skip the (slow) full-softmax training run")
    p.add_argument("--topk-only", metavar="CUTOFFS", default=None,
                   help="run part (b) only, with these cutoffs (e.g. 2000,8000,30000,80000,180000,400000,700000)")
    p.add_argument("--defaults-only", action="store_true", help="run part (c) only")
    p.add_argument("--defaults-cutoffs", default="20000,200000",
                   help="cutoffs of part (c) (ranks from --rank-decay: 256, 64, 16 at d = 256)")
    p.add_argument("--out", default=None,
                   help="JSON output (default bench_results/tree_softmax.json; tree_softmax_topk.json with --topk-only, "
                        "tree_softmax_defaults.json with --defaults-only)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------

def zipf_counts(num_items: int, a: float) -> np.ndarray:
    """Expected target frequency of each id (id 0 = padding gets 0), frequency-ordered."""
    counts = np.zeros(num_items)
    counts[1:] = np.arange(1, num_items, dtype=np.float64) ** -a
    return counts / counts.sum()


def timed(calls: dict[str, tuple[Callable, tuple]], repeats: int, budget_s: float = 2.0,
          block: int = 3) -> dict[str, dict]:
    """Median / min wall seconds of each call over at least ``repeats`` timed runs, after warm-ups.

    Rounds interleave the calls, so that load from other processes on a shared machine hits all
    of them alike and the ratios stay meaningful. Within a round each call runs ``block`` times in
    a row and the first run is not timed (unless ``block`` = 1): it only reloads the call's working
    set into the caches that the other call evicted, as a server answering a stream of requests
    keeps its model warm.
    Fast calls get more rounds (up to 200, within about ``budget_s``) since millisecond timings are
    the noisiest.
    """
    for fn, args in calls.values():  # compiles, if not compiled yet
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    warm = time.perf_counter() - t0
    timed_per_round = max(block - 1, 1)
    rounds = max(-(-repeats // timed_per_round), min(200, int(budget_s / max(block * warm, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            for i in range(block):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                if i or block == 1:
                    times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": float(np.median(t)), "min_s": float(np.min(t)), "runs": len(t)}
            for name, t in times.items()}


def memory_of(compiled: Any) -> dict:
    """Bytes XLA's executable needs: temporaries, arguments and outputs (aliases counted once)."""
    ma = compiled.memory_analysis()
    temp, arg, out = ma.temp_size_in_bytes, ma.argument_size_in_bytes, ma.output_size_in_bytes
    alias = getattr(ma, "alias_size_in_bytes", 0)
    return {"temp_bytes": int(temp), "argument_bytes": int(arg), "output_bytes": int(out),
            "peak_bytes": int(temp + arg + out - alias)}


# ----------------------------------------------------------------------------------------------
# (a) training step

def tree_module(args: argparse.Namespace, spec: str, counts: np.ndarray, tokens: int) -> BlockwiseSoftmax:
    values = [float(v) if "." in v else int(v) for v in spec.split(",")]
    cutoffs = resolve_cutoffs(values, args.items, require_tail=True)
    ranks = resolve_ranks(args.rank_decay, args.dim, len(cutoffs))
    caps = cluster_token_capacities(counts, cutoffs, tokens, args.margin)
    return BlockwiseSoftmax(args.dim, args.items, cutoffs, ranks, caps)


def tree_train_step(module: BlockwiseSoftmax) -> Callable:
    def loss(params, h, targets, mask):
        return module.apply(params, h, targets, mask, method=module.loss)[0]
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def full_train_step(fused: bool = False) -> Callable:
    """Full softmax over V: plain (matmul, log_softmax, gather; autodiff), or the tree's own
    fused cross-entropy (hand-written backward) applied to all V columns (a stronger baseline)."""
    def loss(w, h, targets):
        if fused:
            return jnp.mean(row_xent(h, w, targets))
        lp = jax.nn.log_softmax(h @ w, axis=-1)
        return -jnp.mean(jnp.take_along_axis(lp, targets[:, None], axis=1))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def bench_training(args: argparse.Namespace, counts: np.ndarray, rng: np.random.Generator) -> dict:
    V, d, T = args.items, args.dim, args.tokens
    targets = jnp.asarray(rng.choice(V, size=T, p=counts).astype(np.int32))
    h = jax.random.normal(jax.random.PRNGKey(args.seed), (T, d), jnp.float32)
    mask = jnp.ones((T,), bool)
    rows, calls = [], {}
    for spec in args.cutoffs:
        module = tree_module(args, spec, counts, T)
        params = module.init(jax.random.PRNGKey(1), h[:1])
        compiled = tree_train_step(module).lower(params, h, targets, mask).compile()
        calls[spec] = (compiled, (params, h, targets, mask))
        routed = np.bincount(np.searchsorted(module.cutoffs, np.asarray(targets), side="right"),
                             minlength=len(module.cutoffs))[1:]
        rows.append({"cutoffs": list(module.cutoffs), "ranks": list(module.ranks),
                     "capacities": list(module.capacities), "routed_tokens": routed.tolist(),
                     "params": int(sum(x.size for x in jax.tree.leaves(params))), "tokens": T,
                     "memory": memory_of(compiled)})

    w = jax.random.normal(jax.random.PRNGKey(2), (d, V), jnp.float32) * d ** -0.5
    hf, tf = h[:args.full_tokens], targets[:args.full_tokens]
    fulls = {}
    for name, fused in (("full", False), ("full_fused", True)):
        step = full_train_step(fused)
        # Memory at the tree's token count: compiled only, never run (it may need many GiB).
        fulls[name] = {"tokens": args.full_tokens,
                       "memory_at_tree_tokens": memory_of(step.lower(w, h, targets).compile())}
        if not args.skip_full:
            compiled = step.lower(w, hf, tf).compile()
            fulls[name]["memory"] = memory_of(compiled)
            calls[name] = (compiled, (w, hf, tf))

    times = timed(calls, args.repeats, block=1)  # seconds-long steps: cache warm-up is negligible
    for spec, row in zip(args.cutoffs, rows):
        row.update(times[spec], tokens_per_s=T / times[spec]["median_s"])
        print(f"  tree {spec:45s} {row['tokens_per_s']:9.0f} tok/s", flush=True)
    for name, full in fulls.items():
        if name in times:
            full.update(times[name], tokens_per_s=args.full_tokens / times[name]["median_s"])
            print(f"  {name:50s} {full['tokens_per_s']:9.1f} tok/s", flush=True)
    return {"tree": rows, **fulls}


# ----------------------------------------------------------------------------------------------
# (b) top-k

def peaky_params(module: BlockwiseSoftmax, exponent: float, noise: float, key: jax.Array) -> dict:
    """Params whose p(item | h) is a Zipf(exponent) prior times exp(Gaussian noise of std `noise`).

    A stand-in for a trained model (training one at V=1M is out of a benchmark's budget): with
    h[:, 0] = 1, row 0 of every weight carries the log-prior (cluster tokens carry the log of their
    cluster's prior mass) and the other rows add per-context noise. Steeper priors make the
    head's best items beat whole tail clusters, as a confident model does.
    """
    d, bounds = module.dim, (0,) + tuple(module.cutoffs)
    k1, n_tail = bounds[1], len(bounds) - 2
    log_prior = np.full(bounds[-1], -50.0)
    log_prior[1:] = -exponent * np.log(np.arange(1, bounds[-1], dtype=np.float64))
    cluster_mass = [np.logaddexp.reduce(log_prior[lo:hi]) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    keys = jax.random.split(key, 1 + 2 * n_tail)
    head = jax.random.normal(keys[0], (d, k1 + n_tail)) * noise * (d - 1) ** -0.5
    head = head.at[0].set(jnp.asarray(np.concatenate([log_prior[:k1], cluster_mass]), jnp.float32))
    params = {"head": head}
    for j in range(1, n_tail + 1):
        lo, hi, r = bounds[j], bounds[j + 1], module.ranks[j]
        proj = jax.random.normal(keys[2 * j - 1], (d, r)) * (d - 1) ** -0.5
        proj = proj.at[0].set(0.0).at[:, 0].set(0.0).at[0, 0].set(1.0)  # z_0 = 1 exactly
        out = jax.random.normal(keys[2 * j], (r, hi - lo)) * noise * max(r - 1, 1) ** -0.5
        if r == 1:
            out = jnp.zeros_like(out)
        out = out.at[0].set(jnp.asarray(log_prior[lo:hi], jnp.float32))
        params[f"tail_{j}_proj"], params[f"tail_{j}_out"] = proj, out
    return {"params": params}


def context_vectors(n: int, d: int, key: jax.Array) -> jax.Array:
    return jax.random.normal(key, (n, d)).at[:, 0].set(1.0)


def real_items(log_prob: jax.Array) -> jax.Array:
    """The full ranking's scores with padding (id 0) removed, as ``top_k`` never returns it."""
    return log_prob.at[:, 0].set(-jnp.inf)


def compare_topk(a: tuple, b: tuple) -> dict:
    """Agreement of two (scores, ids) top-k results; ids may differ only between tied scores."""
    sa, ia = np.asarray(a[0]), np.asarray(a[1])
    sb, ib = np.asarray(b[0]), np.asarray(b[1])
    score_diff = float(np.max(np.abs(sa - sb)))
    same_sets = float(np.mean([set(x) == set(y) for x, y in zip(ia, ib)]))
    return {"max_score_diff": score_diff, "same_id_sets": same_sets,
            "identical": bool(score_diff < 1e-4 and same_sets == 1.0)}


def topk_settings(module: BlockwiseSoftmax) -> dict[str, tuple[dict, Callable[[int], jax.Array]]]:
    """Parameters and a maker of ``[batch, dim]`` contexts for each setting of the top-k parts."""
    d = module.dim
    peaky = {f"zipf{s}+noise" + (" (peaky)" if s == 1.5 else ""): peaky_params(module, s, 1.0, jax.random.PRNGKey(5))
             for s in (1.1, 1.3, 1.5)}
    return {"random-init": (module.init(jax.random.PRNGKey(3), jnp.zeros((1, d))),
                            lambda b: jax.random.normal(jax.random.PRNGKey(4), (b, d))),
            **{name: (params, lambda b: context_vectors(b, d, jax.random.PRNGKey(6))) for name, params in peaky.items()}}


def bench_topk(args: argparse.Namespace, spec: str, counts: np.ndarray) -> list[dict]:
    module = tree_module(args, spec, counts, args.tokens)
    n = args.topk
    # The cluster statistics depend on the parameters only: computed once per model, as a server would.
    stats_fn = jax.jit(lambda p: module.apply(p, method=module.cluster_stats))
    fast = jax.jit(lambda p, st, h: module.apply(p, h, n, st, method=module.top_k))
    full = jax.jit(lambda p, h: lax.top_k(real_items(module.apply(p, h, method=module.log_prob)), n))
    rows = []
    for name, (params, make_h) in topk_settings(module).items():
        for b in args.topk_batches:
            h = make_h(b)
            stats = stats_fn(params)
            t = timed({"fast": (fast, (params, stats, h)), "full": (full, (params, h))}, args.repeats, args.time_budget)
            t_fast, t_full = t["fast"], t["full"]
            s, i, expanded = fast(params, stats, h)
            row = {"params": name, "batch": b, "early_stop": t_fast, "full": t_full,
                   "speedup": t_full["median_s"] / t_fast["median_s"],
                   "mean_expanded_clusters": float(np.asarray(expanded).sum(1).mean()),
                   "tail_clusters": int(expanded.shape[1]),
                   **compare_topk((s, i), full(params, h))}
            rows.append(row)
            print(f"  top-{n} {name:22s} batch {b:4d}: early stop {t_fast['median_s'] * 1e3:8.1f} ms, "
                  f"full {t_full['median_s'] * 1e3:8.1f} ms, expanded {row['mean_expanded_clusters']:.2f}"
                  f"/{row['tail_clusters']}, identical {row['identical']}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# (c) the layer's defaults against the tuned layer

def bench_defaults(args: argparse.Namespace, counts: np.ndarray, rng: np.random.Generator) -> dict:
    V, d, T, n = args.items, args.dim, args.tokens, args.topk
    tuned = tree_module(args, args.defaults_cutoffs, counts, T)
    default = BlockwiseSoftmax(d, V, tuned.cutoffs, tuned.ranks)  # what a new user writes
    targets = jnp.asarray(rng.choice(V, size=T, p=counts).astype(np.int32))
    h = jax.random.normal(jax.random.PRNGKey(args.seed), (T, d), jnp.float32)
    mask = jnp.ones((T,), bool)
    params = tuned.init(jax.random.PRNGKey(1), h[:1])
    calls, training = {}, {}
    for name, module in (("default", default), ("tuned", tuned)):
        t0 = time.perf_counter()
        compiled = tree_train_step(module).lower(params, h, targets, mask).compile()
        training[name] = {"compile_s": time.perf_counter() - t0, "memory": memory_of(compiled)}
        calls[name] = (compiled, (params, h, targets, mask))
    times = timed(calls, args.repeats, block=1)
    for name, row in training.items():
        row.update(times[name], tokens_per_s=T / times[name]["median_s"])
    training["default_vs_tuned"] = training["default"]["tokens_per_s"] / training["tuned"]["tokens_per_s"]
    print(f"  training: default {training['default']['tokens_per_s']:.0f} tok/s, tuned "
          f"{training['tuned']['tokens_per_s']:.0f} tok/s ({training['default_vs_tuned']:.2f}x)", flush=True)

    stats_fn = jax.jit(lambda p: tuned.apply(p, method=tuned.cluster_stats))
    with_stats = jax.jit(lambda p, st, h: tuned.apply(p, h, n, st, method=tuned.top_k))
    plain = jax.jit(lambda p, h: default.apply(p, h, n, method=default.top_k))
    topk = []
    for name, (p, make_h) in topk_settings(tuned).items():
        stats = stats_fn(p)
        for b in args.topk_batches:
            hb = make_h(b)
            t = timed({"default": (plain, (p, hb)), "tuned": (with_stats, (p, stats, hb))}, args.repeats,
                      args.time_budget)
            s_d, i_d, e_d = plain(p, hb)
            s_t, i_t, e_t = with_stats(p, stats, hb)
            row = {"params": name, "batch": b, "default": t["default"], "tuned": t["tuned"],
                   "default_vs_tuned": t["default"]["median_s"] / t["tuned"]["median_s"],
                   "expanded_default": float(np.asarray(e_d).sum(1).mean()),
                   "expanded_tuned": float(np.asarray(e_t).sum(1).mean()), **compare_topk((s_d, i_d), (s_t, i_t))}
            topk.append(row)
            print(f"  top-{n} {name:22s} batch {b:4d}: default {t['default']['median_s'] * 1e3:8.2f} ms, tuned "
                  f"{t['tuned']['median_s'] * 1e3:8.2f} ms ({row['default_vs_tuned']:.2f}x), identical "
                  f"{row['identical']}", flush=True)
    return {"cutoffs": list(tuned.cutoffs), "ranks": list(tuned.ranks), "capacities": list(tuned.capacities),
            "training": training, "topk": topk}


def print_defaults_table(res: dict) -> None:
    cfg, dft = res["config"], res["defaults"]
    tr = dft["training"]
    mib = 1 / 2 ** 20
    print(f"\n(c) BlockwiseSoftmax({cfg['dim']}, {cfg['items']:,}, cutoffs {dft['cutoffs']}, ranks {dft['ranks']}) "
          f"as constructed by default vs tuned (capacities {dft['capacities']}, statistics computed once)")
    print(f"{'':24s} {'default':>10s} {'tuned':>10s} {'default/tuned time':>19s}")
    print(f"{'train tok/s':24s} {tr['default']['tokens_per_s']:10.0f} {tr['tuned']['tokens_per_s']:10.0f} "
          f"{1 / tr['default_vs_tuned']:19.2f}")
    print(f"{'train peak MiB':24s} {tr['default']['memory']['peak_bytes'] * mib:10.0f} "
          f"{tr['tuned']['memory']['peak_bytes'] * mib:10.0f}")
    print(f"{'train compile s':24s} {tr['default']['compile_s']:10.1f} {tr['tuned']['compile_s']:10.1f}")
    for r in dft["topk"]:
        label = f"top-{cfg['topk']} ms {r['params'].split(' ')[0]} b{r['batch']}"
        print(f"{label:24s} {r['default']['median_s'] * 1e3:10.2f} {r['tuned']['median_s'] * 1e3:10.2f} "
              f"{r['default_vs_tuned']:19.2f}  identical {r['identical']}")


# ----------------------------------------------------------------------------------------------

def print_table(res: dict) -> None:
    if res["training"] is not None:
        print_training_table(res)
    if res["topk"] is not None:
        print_topk_table(res)
    if res["defaults"] is not None:
        print_defaults_table(res)


def print_training_table(res: dict) -> None:
    cfg, training = res["config"], res["training"]
    mib = 1 / 2 ** 20
    plain, fused = training["full"], training["full_fused"]
    base_tps = plain.get("tokens_per_s", float("nan"))
    fused_tps = fused.get("tokens_per_s", float("nan"))
    base_mem = plain["memory_at_tree_tokens"]["peak_bytes"]
    print(f"\n(a) training step (loss + grads w.r.t. h and params), V={cfg['items']:,}, d={cfg['dim']}, "
          f"Zipf({cfg['zipf']}) targets; tree timed at {cfg['tokens']} tokens, full at {cfg['full_tokens']}")
    print(f"{'softmax':50s} {'tok/s':>9s} {'x full':>7s} {'x fused':>7s} {'peak MiB':>9s} {'x less':>7s} "
          f"{'params':>11s}")
    n_full = cfg["items"] * cfg["dim"]
    rows = [("full [d, V] plain (baseline)", plain.get("tokens_per_s"), plain["memory_at_tree_tokens"], n_full),
            ("full [d, V] fused xent", fused.get("tokens_per_s"), fused["memory_at_tree_tokens"], n_full)]
    rows += [("tree " + ",".join(str(c) for c in r["cutoffs"][:-1]), r["tokens_per_s"], r["memory"], r["params"])
             for r in training["tree"]]
    for name, tps, mem, n_params in rows:
        tps = float("nan") if tps is None else tps
        print(f"{name:50s} {tps:9.1f} {tps / base_tps:7.1f} {tps / fused_tps:7.1f} {mem['peak_bytes'] * mib:9.0f} "
              f"{base_mem / mem['peak_bytes']:7.1f} {n_params:11,d}")
    print(f"peak = XLA compiled memory_analysis() temp + arguments + outputs, all at {cfg['tokens']} tokens "
          f"(the full ones compiled, not run); 'x less' = plain full peak / this peak")


def print_topk_table(res: dict) -> None:
    cfg = res["config"]
    print(f"\n(b) top-{cfg['topk']}: early-stop top_k vs lax.top_k(log_prob), cutoffs {res['topk_cutoffs']}")
    print(f"{'params':24s} {'batch':>5s} {'early ms':>9s} {'full ms':>9s} {'speedup':>8s} "
          f"{'expanded':>9s} {'identical':>9s}")
    for r in res["topk"]:
        print(f"{r['params']:24s} {r['batch']:5d} {r['early_stop']['median_s'] * 1e3:9.1f} "
              f"{r['full']['median_s'] * 1e3:9.1f} {r['speedup']:8.1f} "
              f"{r['mean_expanded_clusters']:5.2f}/{r['tail_clusters']:<3d} {str(r['identical']):>9s}")
    print(f"times: median of >= {cfg['repeats']} runs, calls interleaved in blocks of 3 (first of each untimed); "
          f"expanded = mean tail clusters scored per row; load average {res['machine']['load_average_start']} "
          f"at start, {res['machine']['load_average_end']} at end (2 cores, shared)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    counts = zipf_counts(args.items, args.zipf)
    load_start = load_average()
    print(f"devices: {jax.devices()}, load average {load_start}", flush=True)
    training = topk = defaults = None
    topk_spec = args.topk_only
    if not (args.defaults_only or args.topk_only):
        print("(a) training step", flush=True)
        training = bench_training(args, counts, rng)
        best = max(training["tree"], key=lambda r: r["tokens_per_s"])
        topk_spec = ",".join(str(c) for c in best["cutoffs"][:-1])
    if topk_spec is not None:
        print(f"(b) top-{args.topk} with the fastest training cutoffs {topk_spec}", flush=True)
        topk = bench_topk(args, topk_spec, counts)
    if not args.topk_only:
        print(f"(c) defaults vs tuned, cutoffs {args.defaults_cutoffs}", flush=True)
        defaults = bench_defaults(args, counts, rng)
    res = {"config": vars(args), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                             "jax": jax.__version__, "device": str(jax.devices()[0]),
                                             "load_average_start": load_start, "load_average_end": load_average()},
           "training": training, "topk_cutoffs": topk_spec, "topk": topk, "defaults": defaults}
    print_table(res)
    name = ("tree_softmax_defaults.json" if args.defaults_only else
            "tree_softmax_topk.json" if args.topk_only else "tree_softmax.json")
    out = args.out or str(RESULTS_DIR / name)
    write_json(out, res)
    print(f"\nsaved {out}")
    return res


if __name__ == "__main__":
    main()
