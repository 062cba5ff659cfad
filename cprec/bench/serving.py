"""Serving a trained run: artifact sizes, quantised quality, window vs stream, session and scoring costs.

    python -m cprec.bench.serving runs/c1m-serve [--exports exports/c1m-serve] [--sections sizes,quality,latency]

- sizes: exports the run as float32, bfloat16 and int8 (``python -m cprec.export``, into
  --exports) and compares their bytes with the training checkpoints: the run's own (parameters +
  Adam moments) and that of the same config's uncompressed NextItNet (embedding full, softmax full,
  no sharing; initialised and saved once with the training code's optimizer and checkpointer, then
  deleted).
- quality: the run's own evaluation (full ranking, the run's test users: ``eval.num_users``) of
  every exported dtype (int8 and bfloat16 dequantised), with the L-item windows the model was
  trained on ("window"), and, for float32 and int8, with everything in the receptive field of each
  test user's history, as a session sees it ("stream").
- latency (median of --repeats, batch 1 and --batch): one new event and a top-20, from session
  states (``advance``: append and recommend in one call) against recomputing the window
  (``recommend``), and each half alone, for the test histories and for their first 16 items
  (``short_``: a new user; a SASRec session's cache fills until L items, and once full each
  append re-encodes the window); ``recommend`` with and without ``exclude_seen``;
  ``score`` of M = 100, 1,000, 10,000 candidates against the full ``log_prob``; and per
  ``max_clusters`` budget, latency and recall@20 against the exact top-20.

Saves bench_results/serving-<run>-<platform>.json.
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import numpy as np

from cprec.bench.common import RESULTS_DIR, finish, load_average
from cprec.data.dataset import load_sequences, split_histories
from cprec.errors import CprecError, exit_on_user_error
from cprec.eval.evaluate import check_finite_rows, eval_ranks, eval_splits, eval_users, evaluate_split, make_rank_fn
from cprec.eval.metrics import rank_metrics
from cprec.eval.pretrained import Run, load_run
from cprec.export import directory_bytes, export
from cprec.model.builder import build_model, init_params
from cprec.runtime.checkpointing import Checkpointer
from cprec.serve.artifact import DTYPES, load_artifact
from cprec.serve.quantize import dequantize_tree
from cprec.serve.recommender import Recommender, left_padded, recent_distinct
from cprec.timing import interleaved_median_seconds, median_seconds

SECTIONS = ("sizes", "quality", "latency")
SCORE_CANDIDATES = (100, 1_000, 10_000)
SHORT = 16  # the latency section's short histories (a new user's first events)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cprec.bench.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", help="a trained run directory (run.py --workdir)")
    p.add_argument("--exports", default=None, help="where to write the artifacts (default <workdir>/exports)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--batch", type=int, default=256, help="the large batch of the latency section")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None, help="JSON path (default bench_results/serving-<run>-<platform>.json)")
    return p


# -- sizes ------------------------------------------------------------------------------------------

def baseline_checkpoint_bytes(run: Run, workdir: pathlib.Path) -> tuple[int, int]:
    """(parameters, bytes of a saved training checkpoint) of the uncompressed NextItNet of the run's config."""
    from cprec.train.step import make_optimizer, new_train_state  # only this section needs the training stack

    config = run.config.copy_and_resolve_references()
    config.model.embedding, config.model.softmax, config.model.sharing = "full", "full", "none"
    model = build_model(config, np.asarray(run.data.item_counts))
    params = init_params(model, 0)
    count = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    state = new_train_state(params, make_optimizer(config, config.train.num_steps or 1))
    # Fresh Adam moments are zeros, which orbax's compression squeezes to nothing; a trained run's
    # are dense. Random values stand in for them so the bytes are those of a trained checkpoint.
    rng = np.random.default_rng(0)
    state["opt_state"] = jax.tree.map(
        lambda x: rng.standard_normal(x.shape, np.float32).astype(x.dtype)
        if np.issubdtype(x.dtype, np.floating) and x.size > 1 else x, state["opt_state"])
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        ckpt = Checkpointer(tmp, keep=1)
        ckpt.save(0, state)
        ckpt.close()
        return count, directory_bytes(pathlib.Path(tmp))


def sizes(run: Run, workdir: pathlib.Path, exports: pathlib.Path) -> dict:
    out = {"artifacts": {}}
    for dtype in DTYPES:
        path = export(workdir, exports / dtype, dtype=dtype, force=True, log=lambda *_: None)
        manifest = load_artifact(path).manifest
        out["artifacts"][dtype] = {"path": str(path), "total_bytes": manifest["total_bytes"],
                                   "params_bytes": manifest["files"]["params.safetensors"]}
        print(f"[sizes] {dtype:>8}: {manifest['total_bytes']:,} bytes ({manifest['files']['params.safetensors']:,} "
              "of them parameters)", flush=True)
    latest = sorted((workdir / "checkpoints").glob("[0-9]*"), key=lambda p: int(p.name))
    if latest:
        out["run_checkpoint_bytes"] = directory_bytes(latest[-1])
    out["baseline_params"], out["baseline_checkpoint_bytes"] = baseline_checkpoint_bytes(run, workdir)
    print(f"[sizes] this run's training checkpoint {out.get('run_checkpoint_bytes', 0):,} bytes; the uncompressed "
          f"NextItNet's ({out['baseline_params']:,} parameters) {out['baseline_checkpoint_bytes']:,} bytes", flush=True)
    for dtype, a in out["artifacts"].items():
        a["vs_baseline_checkpoint"] = out["baseline_checkpoint_bytes"] / a["total_bytes"]
        print(f"[sizes] {dtype:>8} artifact is {a['vs_baseline_checkpoint']:.1f}x smaller than the baseline's checkpoint")
    return out


# -- quality ---------------------------------------------------------------------------------------

def test_histories(run: Run) -> tuple[list[np.ndarray], np.ndarray]:
    """Every evaluated test user's whole history before the test item (internal ids) and the targets."""
    items, _ = load_sequences(run.data)
    starts, ends = split_histories(run.data, "test")
    users = eval_users(len(run.data.test_targets), run.config.eval.num_users)
    histories = [items[starts[u]:ends[u]] for u in users]
    targets = np.asarray(run.data.test_targets)[users]
    windows = np.asarray(run.data.test_inputs)[users]
    for h, t, w, u in zip(histories, targets, windows, users):
        if items[ends[u]] != t or list(w[w > 0]) != list(h[-w.shape[0]:]):
            raise CprecError(f"the prepared sequences of {run.data.meta['cache_dir']} do not match the test split "
                             f"(user {u}); "
                             "prepare the data again")
    return histories, targets


def stream_metrics(rec: Recommender, histories: list[np.ndarray], targets: np.ndarray, ks) -> dict:
    """Test metrics when each user's hidden state reads the whole receptive field (a session's view)."""
    model = rec.model
    rank = jax.jit(lambda p, h, y: eval_ranks(model.apply({"params": dequantize_tree(p)}, h,
                                                          method=lambda m, x: m.head.log_prob(x)), y))
    ranks, finite = [], []
    for start in range(0, len(targets), rec.max_batch):
        rows = [list(h) for h in histories[start:start + rec.max_batch]]
        hidden = rec.hidden(rows)
        b = rec.max_batch
        hp = np.zeros((b, hidden.shape[1]), np.float32)
        hp[:len(rows)] = hidden
        y = np.ones(b, np.int32)
        y[:len(rows)] = targets[start:start + len(rows)]
        r, f = rank(rec.params, hp, y)
        ranks.append(np.asarray(r)[:len(rows)])
        finite.append(np.asarray(f)[:len(rows)])
    check_finite_rows(np.concatenate(finite), "test (stream)", None)
    return rank_metrics(np.concatenate(ranks), ks)


def quality(run: Run, exports: pathlib.Path, histories: list[np.ndarray], stream_targets: np.ndarray) -> dict:
    ks = tuple(run.config.eval.ks)
    inputs, targets = eval_splits(run.data, run.config.eval.num_users)["test"]
    rank_fn = make_rank_fn(run.model)
    out = {"window": {}, "stream": {}, "num_users": int(len(targets)),
           "receptive_field": None, "max_len": int(run.config.data.max_len)}
    for dtype in DTYPES:
        art = load_artifact(exports / dtype)
        m = evaluate_split(rank_fn, art.float_params(), inputs, targets, run.config.eval.batch_size, ks,
                           split=f"test ({dtype} export)", step=art.manifest.get("step"))
        out["window"][dtype] = m
        print(f"[quality] {dtype:>8} window: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()), flush=True)
        if dtype != "bfloat16":
            rec = Recommender(art, context="stream")
            out["receptive_field"] = rec.receptive_field
            m = stream_metrics(rec, histories, stream_targets, ks)
            out["stream"][dtype] = m
            print(f"[quality] {dtype:>8} stream: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()), flush=True)
    f32, q8 = out["window"]["float32"], out["window"]["int8"]
    out["int8_relative_change"] = {k: (q8[k] - f32[k]) / f32[k] for k in f32 if f32[k]}
    return out


# -- latency ---------------------------------------------------------------------------------------

def _ms(fn, repeats: int) -> float:
    return 1e3 * median_seconds(fn, repeats=repeats, warmup=2)


def latency(exports: pathlib.Path, histories: list[np.ndarray], batch: int, repeats: int) -> dict:
    rows = {}
    for dtype in ("float32", "int8"):
        art = load_artifact(exports / dtype)
        window = Recommender(art, max_batch=max(batch, 1))
        stream = Recommender(art, context="stream", max_batch=max(batch, 1))
        per = rows[dtype] = {}
        for b in (1, batch):
            r = per[f"batch{b}"] = append_costs(window, stream, histories[:b], repeats)
            # a new user's first events: a SASRec session's KV cache is not full yet
            r |= {f"short_{k}": v for k, v in append_costs(window, stream, [h[:SHORT] for h in histories[:b]],
                                                           repeats).items()}
            print(f"[latency] {dtype} batch {b}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
        per["score"] = score_costs(window, histories[0], repeats)
        per["max_clusters"] = budget_table(window, histories[:batch], repeats)
    return rows


def append_costs(window: Recommender, stream: Recommender, histories: list[np.ndarray], repeats: int) -> dict:
    """One new event and a top-20 for each history: from session states against recomputing the window."""
    raw = window.artifact.item_ids
    hist = [[raw[i] for i in h] for h in histories]
    sessions = stream.sessions(hist)
    event = [[raw[int(h[-1])]] for h in histories]  # any known item: the cost does not depend on it
    r = {"session_append_ms": _ms(lambda: stream.append_sessions(sessions, event), repeats),
         "session_append_top20_ms": _ms(lambda: stream.advance(sessions, event, 20), repeats),
         "window_encode_ms": _ms(lambda: window.hidden([list(h) for h in histories]), repeats),
         "window_top20_ms": _ms(lambda: window.recommend(hist, 20), repeats),
         "window_top20_no_exclude_ms": _ms(lambda: window.recommend(hist, 20, exclude_seen=False), repeats)}
    r["session_speedup_top20"] = r["window_top20_ms"] / r["session_append_top20_ms"]
    r["session_speedup_state_only"] = r["window_encode_ms"] / r["session_append_ms"]
    return r


def score_costs(rec: Recommender, history: np.ndarray, repeats: int) -> dict:
    """``score`` of M random candidates against encode + a full log_prob over the catalogue, batch 1,
    timed in turn within each round: ``score_*_ms`` end to end (raw ids in, Python floats out),
    ``score_*_device_ms`` the one jitted call alone (internal ids in, the array out), and
    ``score_*_full_log_prob_end_to_end_ms`` the full log_prob doing score()'s whole job."""
    model = rec.model
    full = jax.jit(lambda p, h: model.apply({"params": dequantize_tree(p)}, h, method=lambda m, x: m.head.log_prob(x)))
    raw_history = [rec.ids.raw[i] for i in history]
    x = left_padded([list(history)], rec.history_width([list(history)]), 1)
    h = rec.hidden([list(history)])
    lp = np.asarray(full(rec.params, h))[0]
    encode_full = lambda: full(rec.params, rec.hidden([list(history)]))

    def full_then_pick(cands: list) -> None:
        """What score() replaces, end to end as score() is: raw ids looked up, the full log_prob
        computed, the candidates' entries picked and returned as Python floats."""
        known, _ = rec.ids.internal(raw_history)
        np.asarray(full(rec.params, rec.hidden([known])))[0, rec.ids.lookup_array(cands)].tolist()

    out = {}
    rng = np.random.default_rng(0)
    counts = np.asarray(rec.artifact.item_counts, np.float64)[1:] + 1.0
    for m in SCORE_CANDIDATES:
        # Uniform candidates reach every tail cluster (the worst case: all normalisers); a retrieval
        # stage's candidates follow popularity and mostly stay in the head and the first clusters.
        for kind, internal in (("uniform", rng.integers(1, rec.num_items, m)),
                               ("popular", rng.choice(np.arange(1, rec.num_items), m, p=counts / counts.sum()))):
            cands = [rec.ids.raw[int(i)] for i in internal]
            padded = np.zeros((1, rec.candidate_width(m)), np.int32)
            padded[0, :m] = internal
            # score() returns Python lists: nothing to wait for (block_until_ready would walk 10,000 floats).
            t = interleaved_median_seconds({"full": encode_full, "score": lambda: rec.score(raw_history, cands) and None,
                                            "device": lambda: rec._score_fn(rec.params, x, padded),
                                            "full_pick": lambda: full_then_pick(cands)}, repeats, warmup=2)
            out[f"score_{m}_{kind}_ms"], out[f"score_{m}_{kind}_device_ms"] = 1e3 * t["score"], 1e3 * t["device"]
            out[f"score_{m}_{kind}_encode_full_log_prob_ms"] = 1e3 * t["full"]
            out[f"score_{m}_{kind}_full_log_prob_end_to_end_ms"] = 1e3 * t["full_pick"]
            got = np.asarray(rec.score(raw_history, cands).scores, np.float64)
            out[f"score_{m}_{kind}_max_abs_error"] = float(np.max(np.abs(got - lp[internal])))
    # score() encodes the history too: the comparison that counts is against encode + full log_prob.
    out["encode_full_log_prob_ms"] = float(np.median([out[f"score_{m}_{kind}_encode_full_log_prob_ms"]
                                                      for m in SCORE_CANDIDATES for kind in ("uniform", "popular")]))
    print("[latency] score: " + ", ".join(f"{k} {v:.3g}" for k, v in out.items()), flush=True)
    return out


def budget_table(rec: Recommender, histories: list[np.ndarray], repeats: int) -> list[dict]:
    """Per max_clusters budget: latency at batch 1 and len(histories), recall@20 against the exact top-20."""
    hidden = rec.hidden([list(h) for h in histories])
    seen = [list(recent_distinct(h.tolist(), rec.max_exclude)) for h in histories]  # what recommend excludes
    exact = rec.top(hidden, 20, seen, [None] * len(histories))
    rows = []
    for budget in [*range(rec.num_tail_clusters), None]:
        got = rec.top(hidden, 20, seen, [budget] * len(histories))
        recall = float(np.mean([len(set(g[0]) & set(e[0])) / max(len(e[0]), 1) for g, e in zip(got, exact)]))
        rows.append({"max_clusters": budget, "recall@20": recall,
                     "exact_rows": float(np.mean([g[2] for g in got])),
                     "batch1_ms": _ms(lambda: rec.top(hidden[:1], 20, seen[:1], [budget]), repeats),
                     f"batch{len(histories)}_ms": _ms(lambda: rec.top(hidden, 20, seen, [budget] * len(histories)),
                                                      repeats)})
        print(f"[latency] max_clusters {budget}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()
                                                               if k != "max_clusters"), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    load_start = load_average()
    with exit_on_user_error():
        bad = [s for s in sections if s not in SECTIONS]
        if bad:
            raise CprecError(f"--sections {','.join(bad)} is unknown; valid: {','.join(SECTIONS)}")
        workdir = pathlib.Path(args.workdir)
        run = load_run(workdir)
        exports = pathlib.Path(args.exports or workdir / "exports")
        res = {"workdir": str(workdir), "step": run.step, "num_items": run.model.num_items,
               "param_count": int(sum(np.size(x) for x in jax.tree.leaves(run.params)))}
        if "sizes" in sections or not all((exports / d).is_dir() for d in DTYPES):
            res["sizes"] = sizes(run, workdir, exports)
        if "quality" in sections or "latency" in sections:
            histories, targets = test_histories(run)  # read and checked once for both sections
        if "quality" in sections:
            res["quality"] = quality(run, exports, histories, targets)
        if "latency" in sections:
            res["latency"] = latency(exports, histories, args.batch, args.repeats)
    res["repeats"] = args.repeats
    return finish(res, args.out or RESULTS_DIR / f"serving-{workdir.name}-{jax.devices()[0].platform}.json", load_start)


if __name__ == "__main__":
    main()
