"""The jax.export recommend functions of an artifact, called in a process where cprec is not importable."""
import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.model.nextitnet import NextItNet
from cprec.serve.artifact import model_kwargs_of, save_artifact
from cprec.serve.recommender import Recommender
from cprec.serve.stablehlo import SIGNATURE_FILE, export_recommend, load_signature

V, D, L = 80, 8, 10
HISTORIES = [[3, 5, 7], [40, 41, 2, 2, 13, 58, 59, 1, 30, 31, 32, 33, 77], [20], [79, 78, 70, 60, 50, 12, 11]]
BUDGETS = [None, 1, 0, None]
E = 5  # fewer than two histories' distinct items: the exclusion policy is tested beyond E

# Needs jax, numpy and safetensors only; prints {artifact: [[raw ids], ...]} per batch of HISTORIES.
FRESH_PROCESS = textwrap.dedent("""
    import gzip, importlib.util, json, sys
    assert importlib.util.find_spec("cprec") is None, "cprec must not be importable here"
    import jax, numpy as np
    from safetensors.numpy import load_file

    request = json.loads(sys.argv[1])
    out = {}
    for art in request["artifacts"]:
        sig = json.load(open(f"{art}/stablehlo.json"))
        raw = json.loads(gzip.decompress(open(f"{art}/items.json.gz", "rb").read()))
        index = {r: i for i, r in enumerate(raw) if i > 0}
        params = load_file(f"{art}/params.safetensors")
        hist = [[index[r] for r in h if r in index] for h in request["histories"]]
        b = min(s for s in sig["batch_sizes"] if s >= len(hist))
        L, E = sig["max_len"], sig["max_exclude"]
        x = np.zeros((b, L), np.int32)
        exclude = np.full((b, E), -1, np.int32)
        budget = np.full((b,), sig["num_tail_clusters"], np.int32)
        for r, h in enumerate(hist):
            window = h[-L:]
            if window:
                x[r, L - len(window):] = window
            seen = list(dict.fromkeys(reversed(h)))[:E]  # the E most recent distinct items
            exclude[r, :len(seen)] = seen
            if request["budgets"][r] is not None:
                budget[r] = min(request["budgets"][r], sig["num_tail_clusters"])
        fn = jax.export.deserialize(open(f"{art}/{sig['files'][str(b)]}", "rb").read())
        scores, ids, exact = (np.asarray(a) for a in fn.call(params, x, exclude, budget))
        n = request["n"]
        out[art] = [{"items": [raw[i] for i, s in zip(ids[r, :n], scores[r, :n]) if np.isfinite(s)],
                     "scores": [float(s) for s in scores[r, :n] if np.isfinite(s)], "exact": bool(exact[r])}
                    for r in range(len(hist))]
    print(json.dumps(out))
""")


def _raw(ids):
    return [f"movie-{i}" for i in ids]


def _save(out: pathlib.Path, softmax: str, dtype: str, batch_sizes=(4,)) -> pathlib.Path:
    kw = dict(num_items=V, dim=D, dilations=(1, 2, 1, 4), sharing="cross_block")
    if softmax == "tree":
        kw.update(embedding="blockwise", softmax="tree", cutoffs=(12, 30, 50, V), ranks=(D, 4, 3, 2))
    model = NextItNet(**kw)
    params = model.init(jax.random.PRNGKey(1), jnp.ones((1, 2), jnp.int32))["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: np.asarray(x) * 3 + 0.3 * rng.standard_normal(x.shape).astype(np.float32), params)
    return save_artifact(out, model_kwargs=model_kwargs_of(model), max_len=L, params=params,
                         item_ids=[None] + _raw(range(1, V)), item_counts=np.arange(V)[::-1].copy(), dtype=dtype,
                         manifest={}, extra=lambda d, a: export_recommend(d, a, batch_sizes, n=20, max_exclude=E))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    base = tmp_path_factory.mktemp("stablehlo")
    return {(s, d): _save(base / f"{s}-{d}", s, d) for s, d in
            [("tree", "float32"), ("tree", "int8"), ("tree", "bfloat16"), ("full", "float32")]}


@pytest.mark.slow
def test_the_exports_recommend_like_the_recommender_without_cprec(artifacts, tmp_path):
    n = 15
    request = {"artifacts": [str(a) for a in artifacts.values()], "histories": [_raw(h) for h in HISTORIES],
               "budgets": BUDGETS, "n": n}
    script = tmp_path / "serve_without_cprec.py"
    script.write_text(FRESH_PROCESS)
    # -I: no script directory, PYTHONPATH or user site on sys.path, so the repository is not importable.
    done = subprocess.run([sys.executable, "-I", str(script), json.dumps(request)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={"JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    inexact = 0
    for key, art in artifacts.items():
        rec = Recommender.load(art)
        want = rec.recommend([_raw(h) for h in HISTORIES], n=n, exclude_seen=True, max_clusters=BUDGETS)
        for r, (g, w) in enumerate(zip(got[str(art)], want)):
            assert g["items"] == w.items, (key, r)
            np.testing.assert_allclose(g["scores"], w.scores, rtol=1e-5, atol=1e-5)
            assert g["exact"] == w.exact, (key, r)
            inexact += not w.exact
    assert inexact > 0  # the budgets of 0 and 1 cluster did cut some rows short


def test_signature_describes_the_files(artifacts):
    art = artifacts[("tree", "int8")]
    sig = load_signature(art)
    assert sig["batch_sizes"] == [4] and sig["n"] == 20 and sig["max_len"] == L
    assert sig["num_tail_clusters"] == 3 and sig["max_exclude"] == E and Recommender.load(art).max_exclude == E
    manifest = json.loads((art / "manifest.json").read_text())
    for name in [*sig["files"].values(), SIGNATURE_FILE]:
        assert (art / name).is_file() and manifest["files"][name] == (art / name).stat().st_size
    assert load_signature(art.parent / "nowhere") is None
