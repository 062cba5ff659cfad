"""A trained run loads back from its workdir; scoring its saved parameters; the trained-model top-k bench."""
import json
import re
import shutil

import jax
import numpy as np
import pytest

from cprec.eval import eval_run
from cprec.bench import serving, trained_topk
from cprec.errors import WorkdirError
from cprec.eval.evaluate import evaluate_split, make_rank_fn
from cprec.eval.pretrained import load_run
from cprec.export import export
from cprec.serve.artifact import load_artifact
from cprec.serve.recommender import Recommender
from cprec.train import train_and_evaluate
from tests.helpers import tiny_config, user_error


@pytest.fixture(scope="module")
def tree_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("pretrained")
    config = tiny_config(base / "cache", embedding="blockwise", softmax="tree", cutoffs=(20, 40))
    test = train_and_evaluate(config, base / "run")
    return base / "run", config, test


def test_load_run_reproduces_the_test_metrics(tree_run):
    workdir, config, test = tree_run
    run = load_run(workdir)
    assert run.source == "best"
    assert run.step == int(next((workdir / "best").iterdir()).name)
    assert run.model.softmax == "tree" and run.model.cutoffs[:2] == (20, 40)
    assert run.model.capacities is None  # a training concern: the loaded model does not depend on the training machine
    again = evaluate_split(make_rank_fn(run.model), run.params, run.data.test_inputs, run.data.test_targets,
                           config.eval.batch_size, config.eval.ks)
    for key, value in again.items():
        np.testing.assert_allclose(value, test[key], rtol=1e-5, err_msg=key)


def test_load_run_falls_back_to_the_latest_checkpoint(tree_run, tmp_path):
    workdir, _, _ = tree_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "best")
    run = load_run(copy)
    assert run.source == "checkpoints" and run.step == 12
    best = load_run(workdir)
    assert jax.tree.structure(run.params) == jax.tree.structure(best.params)


def test_load_run_errors(tmp_path, tree_run):
    with pytest.raises(WorkdirError, match="config.json does not exist"):
        load_run(tmp_path)
    copy = tmp_path / "bare"
    copy.mkdir()
    shutil.copy(tree_run[0] / "config.json", copy / "config.json")
    with pytest.raises(WorkdirError, match="has no checkpoint"):
        load_run(copy)
    (copy / "config.json").write_text("{not json")
    with pytest.raises(WorkdirError, match="unreadable"):
        load_run(copy)


@pytest.mark.slow
def test_trained_topk_bench_matches_the_full_ranking(tree_run, tmp_path, capsys):
    out = tmp_path / "bench.json"
    res = trained_topk.main([str(tree_run[0]), "--n", "5", "--batches", "1", "8", "--repeats", "1", "--out", str(out)])
    assert [r["batch"] for r in res["rows"]] == [1, 8]
    assert all(r["identical"] for r in res["rows"])
    assert all(0 <= r["mean_expanded_clusters"] <= r["tail_clusters"] == 2 for r in res["rows"])
    assert json.loads(out.read_text())["rows"][0]["batch"] == 1
    assert "identical True" in capsys.readouterr().out


@pytest.mark.slow
def test_serving_bench_scores_the_exports_with_the_runs_own_evaluation(tree_run, tmp_path, capsys):
    workdir, _, test = tree_run
    res = serving.main([str(workdir), "--exports", str(tmp_path / "exports"), "--sections", "sizes,quality",
                        "--out", str(tmp_path / "serving.json")])
    sizes, quality = res["sizes"], res["quality"]
    assert set(sizes["artifacts"]) == {"float32", "bfloat16", "int8"}
    # At 60 items the uncompressed model is not larger; the checkpoints hold Adam's two moments too.
    assert sizes["baseline_checkpoint_bytes"] > 3 * 4 * sizes["baseline_params"] * 0.9
    assert sizes["run_checkpoint_bytes"] > 2 * sizes["artifacts"]["float32"]["params_bytes"]
    for key, value in quality["window"]["float32"].items():  # the exported float32 model is the run's model
        np.testing.assert_allclose(value, test[key], rtol=1e-5, err_msg=key)
    assert set(quality["stream"]) == {"float32", "int8"} and quality["receptive_field"] == 19
    assert json.loads((tmp_path / "serving.json").read_text())["num_items"] == 61
    assert "[quality]     int8 stream" in capsys.readouterr().out


@pytest.mark.slow
def test_serving_bench_latency_section(tree_run, tmp_path):
    res = serving.main([str(tree_run[0]), "--exports", str(tmp_path / "exports"), "--batch", "4", "--repeats", "1",
                        "--sections", "latency", "--out", str(tmp_path / "serving.json")])
    for dtype in ("float32", "int8"):
        lat = res["latency"][dtype]
        assert {"batch1", "batch4", "score", "max_clusters"} <= set(lat)
        assert {"session_append_ms", "short_session_append_ms", "short_window_encode_ms"} <= set(lat["batch4"])
        assert lat["score"]["score_100_uniform_max_abs_error"] < 1e-4 and lat["score"]["score_100_popular_max_abs_error"] < 1e-4
        assert [r["max_clusters"] for r in lat["max_clusters"]] == [0, 1, None]
        assert lat["max_clusters"][-1]["recall@20"] == 1.0 and lat["max_clusters"][-1]["exact_rows"] == 1.0


def test_serving_bench_budget_table_excludes_what_a_request_would(tree_run, tmp_path):
    # histories longer than max_exclude distinct items: the table excludes the most recent ones, as
    # recommend does, instead of refusing the request
    export(tree_run[0], tmp_path / "f32", stablehlo_batch_sizes=())
    rec = Recommender(load_artifact(tmp_path / "f32"), max_exclude=2)
    histories, _ = serving.test_histories(load_run(tree_run[0]))
    assert max(len(set(h.tolist())) for h in histories[:4]) > 2
    rows = serving.budget_table(rec, histories[:4], repeats=1)
    assert rows[-1]["max_clusters"] is None and rows[-1]["recall@20"] == 1.0


def test_trained_topk_bench_refuses_a_full_softmax_run(tmp_path, tiny, capsys):
    train_and_evaluate(tiny(), tmp_path / "full")
    assert "trained a full softmax" in user_error(capsys, trained_topk.main, [str(tmp_path / "full"), "--repeats", "1"])


def test_eval_run_scores_saved_parameters_like_training(tree_run, tmp_path, capsys):
    workdir, _, test = tree_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    res = eval_run.main([str(copy)])
    assert res["source"] == "best" and res["test"] == pytest.approx(test, rel=1e-5)
    saved = copy / "evaluations" / f"best-{res['step']}.json"
    assert json.loads(saved.read_text())["test"] == res["test"]
    assert {p: p.read_bytes() for p in before} == before  # the run's own files are untouched
    latest = eval_run.main([str(copy), "--source", "checkpoints", "--splits", "test", "--out", str(tmp_path / "e.json")])
    assert latest["step"] == 12 and set(latest) == {"workdir", "source", "step", "test"}
    assert "test (" in capsys.readouterr().out


def test_eval_run_errors(tree_run, tmp_path, capsys):
    err = user_error(capsys, eval_run.main, [str(tree_run[0]), "--source", "checkpoints", "--step", "7",
                                             "--out", str(tmp_path / "e.json")])
    assert re.search(r"checkpoints has no step 7; its kept steps are .*12", err)
    assert "config.json does not exist" in user_error(capsys, eval_run.main, [str(tmp_path)])
    with pytest.raises(WorkdirError, match="checkpoint source 'latest' is unknown; valid choices: best, checkpoints"):
        load_run(tree_run[0], source="latest")


def _snapshot(path) -> dict:
    """Every file and folder under ``path``, with the bytes of the files."""
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def test_eval_run_opens_a_run_read_only(tree_run, tmp_path):
    # A run may still be training: evaluating it creates, rewrites and deletes nothing in it.
    copy = tmp_path / "run"
    shutil.copytree(tree_run[0], copy)
    # A save of step 16 in flight, as orbax writes it (a temporary folder renamed when complete).
    shutil.copytree(copy / "checkpoints" / "12", copy / "checkpoints" / "16.orbax-checkpoint-tmp-1733331000")
    before = _snapshot(copy)
    eval_run.main([str(copy), "--out", str(tmp_path / "best.json")])
    eval_run.main([str(copy), "--source", "checkpoints", "--step", "8", "--splits", "val", "--out", str(tmp_path / "8.json")])
    assert _snapshot(copy) == before


def test_eval_run_refuses_non_finite_scores_and_writes_nothing(tree_run, tmp_path, capsys, monkeypatch):
    real = eval_run.load_run

    def poisoned(*args, **kwargs):
        run = real(*args, **kwargs)
        return run._replace(params=jax.tree.map(lambda x: x * np.nan, run.params))

    monkeypatch.setattr(eval_run, "load_run", poisoned)
    out = tmp_path / "e.json"
    err = user_error(capsys, eval_run.main, [str(tree_run[0]), "--out", str(out)])
    step = load_run(tree_run[0]).step
    assert re.match(rf"error: \d+ of \d+ rows of the val split have NaN or infinite scores \(parameters of step {step}\)",
                    err), err
    assert not out.exists()


def test_an_export_claims_test_metrics_only_for_the_parameters_they_belong_to(tree_run, tmp_path):
    from cprec.export import export
    from cprec.serve.artifact import load_artifact

    workdir, _, test = tree_run
    results = json.loads((workdir / "results.json").read_text())
    best_step = load_run(workdir).step
    assert results["test_params"] == {"source": "best", "step": best_step}
    best = load_artifact(export(workdir, tmp_path / "best", stablehlo_batch_sizes=None, log=lambda _: None))
    assert best.manifest["metrics"] == test and best.manifest["metrics_of"] == results["test_params"]
    other = 8 if best_step != 8 else 12
    ckpt = load_artifact(export(workdir, tmp_path / "ckpt", source="checkpoints", step=other,
                                stablehlo_batch_sizes=None, log=lambda _: None))
    assert ckpt.manifest["metrics"] is None
    assert ckpt.manifest["metrics_note"] == (
        f"the run's test metrics belong to best/ step {best_step}, not to the exported checkpoints/ step {other}; "
        f"score these with python -m cprec.eval RUN --source checkpoints --step {other}")


def test_a_rivals_record_holds_the_int8_exports_bytes_and_test_metrics(tree_run, tmp_path, monkeypatch):
    """The rivals table's int8 column is the int8 artifact's: its tensors' bytes, and test metrics of
    the parameters that artifact serves (not of the float32 ones)."""
    from safetensors.numpy import load_file

    from cprec.eval import evaluate
    from cprec.report.rivals import stored

    workdir, config, test = tree_run
    scored = []
    real = evaluate.evaluate_split
    monkeypatch.setattr(evaluate, "evaluate_split", lambda rank_fn, params, *a, **k: (
        scored.append(params), real(rank_fn, params, *a, **k))[1])
    got = stored(workdir)
    out = export(workdir, tmp_path / "int8", dtype="int8", stablehlo_batch_sizes=None, log=lambda *a: None)
    art = load_artifact(out)
    assert got["bytes_int8"] == sum(t.nbytes for t in load_file(out / "params.safetensors").values())
    assert got["bytes_float32"] > got["bytes_int8"]
    served, run = art.float_params(), load_run(workdir)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6), scored[0], served)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(served), jax.tree.leaves(run.params)))
    want = real(make_rank_fn(run.model), served, run.data.test_inputs, run.data.test_targets,
                config.eval.batch_size, config.eval.ks)
    for key in ("mrr@5", "ndcg@10", "hr@10"):
        assert got[f"int8/test/{key}"] == pytest.approx(want[key], rel=1e-6), key
    # An earlier format's measurement: kept where the bytes are the same, measured again where not.
    earlier = {**got, "int8/test/mrr@5": -1.0}
    assert stored(workdir, earlier)["int8/test/mrr@5"] == -1.0 and len(scored) == 1
    assert stored(workdir, {**earlier, "bytes_int8": 1})["int8/test/mrr@5"] == got["int8/test/mrr@5"]
    assert len(scored) == 2
