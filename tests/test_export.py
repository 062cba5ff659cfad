"""`python -m cprec.export`: a trained run to a serving artifact, in every dtype, and its refusals."""
import csv
import importlib.util
import json
import pathlib
import re
import shlex
import shutil

import jax
import numpy as np
import pytest

from cprec.data import dataset
from cprec.data.synthetic import generate_synthetic
from cprec.eval.pretrained import load_run
from cprec.export import main
from cprec.jsonfile import write_json
from cprec.model.builder import build_model, init_params
from cprec.model.nextitnet import NextItNet
from cprec.runtime.checkpointing import Checkpointer
from cprec.serve.artifact import load_artifact
from cprec.serve.quantize import dequantize_tree
from cprec.train import train_and_evaluate
from tests.helpers import tiny_config, user_error


def _token(i: int) -> str:
    return "café, n°7" if i == 7 else f"sku-{i:02d}"  # a quoted, non-ASCII token among plain ones


def _write_csv(path) -> None:
    users, items, times = generate_synthetic(num_users=80, num_items=60, mean_len=14, num_topics=6, seed=3)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["uid", "iid", "ts"])
        for u, i, t in zip(users, items, times):
            w.writerow([f"user-{u}", _token(int(i)), int(t)])


def _csv_config(base, cache):
    config = tiny_config(cache, embedding="blockwise", softmax="tree", cutoffs=(0.3, 0.6))
    d = config.data
    d.name, d.path, d.user_col, d.item_col, d.time_col = "csv", str(base / "events.csv"), "uid", "iid", "ts"
    return config


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """A tiny CpRec run (block-wise embedding, tree softmax) on a CSV file with string item tokens."""
    base = tmp_path_factory.mktemp("export")
    _write_csv(base / "events.csv")
    train_and_evaluate(_csv_config(base, base / "cache"), base / "run")
    return base


def _top20(model, params, x):
    scores, ids, _ = model.apply({"params": params}, x, 20, method=NextItNet.top_k)
    return np.asarray(scores), np.asarray(ids)


@pytest.mark.slow
def test_every_dtype_recommends_like_the_run(csv_run, tmp_path, capsys):
    run = load_run(csv_run / "run")
    x = np.asarray(run.data.test_inputs[:16])
    ref_scores, ref_ids = _top20(run.model, run.params, x)
    totals = {}
    for dtype in ("float32", "bfloat16", "int8"):
        out = tmp_path / dtype
        assert main([str(csv_run / "run"), str(out), "--dtype", dtype, "--stablehlo-batch-sizes", "1,4"]) == 0
        printed = capsys.readouterr().out
        art = load_artifact(out)
        m = art.manifest
        assert (m["dtype"], m["source"], m["step"]) == (dtype, "best", run.step)
        assert m["source_run"] == str((csv_run / "run").resolve())
        assert m["metrics"] == json.loads((csv_run / "run" / "results.json").read_text())["test"]
        assert f"wrote {out} ({dtype}" in printed and f"{m['total_bytes']:,} bytes" in printed
        assert "latest training checkpoint" in printed and "x smaller" in printed
        assert {"recommend_b1.stablehlo", "recommend_b4.stablehlo", "stablehlo.json"} <= set(m["files"])
        assert art.max_len == run.config.data.max_len and art.model_kwargs["softmax"] == "tree"
        np.testing.assert_array_equal(art.item_counts, run.data.item_counts)
        scores, ids = _top20(art.model(), art.float_params(), x)
        if dtype == "float32":
            np.testing.assert_array_equal(ids, ref_ids)
            np.testing.assert_array_equal(scores, ref_scores)
        else:
            # Rounded weights may swap near-tied items; the lists stay nearly the same.
            overlap = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ids, ref_ids)])
            assert overlap >= 0.9, overlap
            np.testing.assert_allclose(scores, ref_scores, atol=0.1)
        totals[dtype] = m["files"]["params.safetensors"]  # the StableHLO files do not shrink with the dtype
    assert totals["int8"] < totals["float32"] and totals["bfloat16"] < totals["float32"]


def _csv_train_counts(path) -> dict[str, int]:
    """Training count of every token: each user's events by time, minus the last two."""
    by_user: dict[str, list] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for k, row in enumerate(csv.DictReader(f)):
            by_user.setdefault(row["uid"], []).append((int(row["ts"]), k, row["iid"]))
    counts: dict[str, int] = {}
    for events in by_user.values():
        for _, _, token in sorted(events)[:-2]:
            counts[token] = counts.get(token, 0) + 1
    return counts


def test_string_item_tokens_round_trip(csv_run, tmp_path):
    out = tmp_path / "art"
    main([str(csv_run / "run"), str(out), "--stablehlo-batch-sizes", "none"])
    ids = load_artifact(out).item_ids
    assert ids[0] is None and all(isinstance(t, str) for t in ids[1:])
    assert set(ids[1:]) <= {_token(i) for i in range(60)} and "café, n°7" in ids
    assert len(set(ids[1:])) == len(ids) - 1
    # Each internal id's training count is the count of its token in the file: the mapping is right.
    counts = _csv_train_counts(csv_run / "events.csv")
    art = load_artifact(out)
    assert [counts.get(t, 0) for t in ids[1:]] == art.item_counts[1:].tolist()
    run = load_run(csv_run / "run")
    assert dataset.item_raw_ids(run.data) == ids


def _fake_synthetic_run(tmp_path):
    """A synthetic full-softmax run with one training checkpoint of its initial parameters."""
    config = tiny_config(tmp_path / "cache")
    data = dataset.load_dataset(config.data, verbose=False)
    model = build_model(config, data.item_counts)
    workdir = tmp_path / "run"
    write_json(workdir / "config.json", json.loads(config.to_json_best_effort()), sort_keys=True)
    ckpt = Checkpointer(workdir, 1)
    ckpt.save(0, {"params": init_params(model, config.seed)})
    ckpt.close()
    return workdir, pathlib.Path(data.meta["cache_dir"])


def test_a_synthetic_run_exports_integer_ids_and_regenerates_its_data(tmp_path, capsys):
    workdir, cache = _fake_synthetic_run(tmp_path)
    shutil.rmtree(cache)
    capsys.readouterr()
    assert main([str(workdir), str(tmp_path / "art"), "--dtype", "int8", "--stablehlo-batch-sizes", "none"]) == 0
    assert "generating it again" in capsys.readouterr().out
    art = load_artifact(tmp_path / "art")
    assert art.manifest["source"] == "checkpoints" and art.manifest["step"] == 0 and art.manifest["metrics"] is None
    assert art.item_ids[0] is None and sorted(art.item_ids[1:]) == list(range(60))
    assert set(art.manifest["quantized"]) == {"embed/embedding", "head/kernel"}
    run = load_run(workdir)
    x = np.asarray(run.data.test_inputs[:4])
    _, ref = _top20(run.model, run.params, x)
    _, got = _top20(art.model(), jax.jit(dequantize_tree)(art.params), x)  # dequantised inside a jitted call
    assert np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got, ref)]) >= 0.9


def _prepare_cli():
    spec = importlib.util.spec_from_file_location("prepare_cli", dataset.REPO_ROOT / "data" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_run_whose_prepared_data_is_gone_says_how_to_prepare_it(csv_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(csv_run / "run", workdir)
    config = json.loads((workdir / "config.json").read_text())
    config["data"]["cache_dir"] = str(tmp_path / "new-cache")
    (workdir / "config.json").write_text(json.dumps(config))
    err = user_error(capsys, main, [str(workdir), str(tmp_path / "art")])
    assert "prepared data" in err and "is gone" in err and "python data/prepare.py csv" in err
    assert not (tmp_path / "new-cache").exists() and not (tmp_path / "art").exists()
    # The command it prints prepares exactly that cache; then the export goes through.
    command = shlex.split(re.search(r"`([^`]*)`", err).group(1))
    assert command[:2] == ["python", "data/prepare.py"]
    assert _prepare_cli().main(command[2:]) == 0
    assert main([str(workdir), str(tmp_path / "art"), "--stablehlo-batch-sizes", "none"]) == 0
    assert "café, n°7" in load_artifact(tmp_path / "art").item_ids


def test_user_errors_write_nothing(csv_run, tmp_path, capsys):
    run = str(csv_run / "run")
    out = tmp_path / "out"
    assert "config.json does not exist" in user_error(capsys, main, [str(tmp_path / "nowhere"), str(out)])
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(csv_run / "run" / "config.json", bare / "config.json")
    assert "has no checkpoint" in user_error(capsys, main, [str(bare), str(out)])
    assert "has no step 99; its kept steps are" in user_error(capsys, main, [run, str(out), "--step", "99"])
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "pass --force" in user_error(capsys, main, [run, str(out)])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(SystemExit) as exc:
        main([run, str(tmp_path / "x"), "--dtype", "int4"])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exc:
        main([run, str(tmp_path / "x"), "--stablehlo-batch-sizes", "8,0"])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exc:
        main([run, str(tmp_path / "x"), "--max-exclude", "0"])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "out"]
    assert main([run, str(out), "--force", "--source", "checkpoints", "--stablehlo-batch-sizes", "none"]) == 0
    assert load_artifact(out).manifest["source"] == "checkpoints"


def test_the_exclusion_width_is_set_at_export(csv_run, tmp_path):
    from cprec.serve.recommender import Recommender

    out = tmp_path / "e5"
    assert main([str(csv_run / "run"), str(out), "--max-exclude", "5", "--stablehlo-batch-sizes", "1"]) == 0
    assert load_artifact(out).manifest["max_exclude"] == 5
    assert json.loads((out / "stablehlo.json").read_text())["max_exclude"] == 5
    assert Recommender.load(str(out)).max_exclude == 5
    assert Recommender(load_artifact(out)).max_exclude == 5  # without the StableHLO signature too


@pytest.mark.slow
@pytest.mark.parametrize("embedding, size", [("qr", {"qr_buckets": 9}), ("lowrank", {"rank": 3}),
                                             ("jpq", {"jpq_splits": 3, "jpq_centroids": 5}),
                                             ("prune", {"prune_sparsity": 0.8}), ("tt", {"tt_rank": 3})])
def test_a_rival_exports_and_serves_the_top20_of_its_run(tmp_path, embedding, size):
    """A compressed item table tied to the full softmax: trained, exported (float32 with StableHLO,
    int8), and served by the Recommender, with the run's own top-20."""
    from cprec.serve.recommender import Recommender

    config = tiny_config(tmp_path / "cache", embedding=embedding, tie_embeddings=True, output_projection=True, **size)
    config.train.num_steps = 4
    train_and_evaluate(config, tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run.model.embedding == embedding and dict(run.model.table_options)[next(iter(size))] == next(iter(size.values()))
    x = np.asarray(run.data.test_inputs[:6])
    ref_scores, ref_ids = _top20(run.model, run.params, x)
    for dtype in ("float32", "int8"):
        out = tmp_path / dtype
        batches = "2" if dtype == "float32" else "none"
        assert main([str(tmp_path / "run"), str(out), "--dtype", dtype, "--stablehlo-batch-sizes", batches]) == 0
        art = load_artifact(out)
        assert art.model() == run.model  # the table's kind and size travel with the artifact
        histories = [[art.item_ids[i] for i in row if i > 0] for row in x]
        served = Recommender(art).recommend(histories, n=20, exclude_seen=False)
        got = np.array([[art.item_ids.index(i) for i in r.items] for r in served])
        if dtype == "float32":
            np.testing.assert_array_equal(got, ref_ids)
            np.testing.assert_allclose([r.scores for r in served], ref_scores, rtol=1e-5, atol=1e-5)
        else:
            assert any(k.startswith("embed/") for k in {**art.manifest["quantized"], **art.manifest["sparse"]})
            assert np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got, ref_ids)]) >= 0.9
        if embedding == "prune":  # stored as its non-zeros, which stay exactly zero when served
            assert art.manifest["sparse"] == {"embed/embedding": {"axis": 0, "shape": [61, 8]}}
            served_table = art.float_params()["embed"]["embedding"]
            np.testing.assert_array_equal(served_table == 0, np.asarray(run.params["embed"]["embedding"]) == 0)
