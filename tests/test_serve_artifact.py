"""Row-wise 8-bit item tables and the serving artifact: round trips, refusals, atomic writes."""
import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from cprec.model.builder import build_model, init_params
from cprec.model.nextitnet import NextItNet
from cprec.serve import artifact as artifact_module
from cprec.serve.artifact import ArtifactError, load_artifact, model_kwargs_of, save_artifact
from cprec.serve.quantize import (QuantizedTable, dequantize, dequantize_tree, item_table_axes, param_path,
                                  quantize_params, quantize_rows)
from tests.helpers import tiny_config

COUNTS = np.concatenate([[0], np.arange(60, 0, -1)])  # 60 frequency-ordered items + padding
TREE = dict(embedding="blockwise", softmax="tree", cutoffs=(20, 40), ranks=(8, 4, 2))


def _model(tmp_path, **kw):
    model = build_model(tiny_config(tmp_path / "unused", **kw), COUNTS)
    return model, jax.device_get(init_params(model, 0))


def _flat(params):
    return {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _save(out, model, params, dtype="float32", **kw):
    ids = [None] + [f"sku-{k}" if k % 2 else 1000 + k for k in range(1, 61)]
    return save_artifact(out, model_kwargs=model_kwargs_of(model), max_len=10, params=params, item_ids=ids,
                         item_counts=COUNTS, dtype=dtype, manifest={"source_run": "somewhere", "step": 3}, **kw)


@pytest.mark.parametrize("axis", [0, 1])
def test_quantize_rows_error_is_at_most_half_a_step(axis):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(37, 11)).astype(np.float32) * rng.uniform(0.01, 3, size=(37, 1)).astype(np.float32)
    table[5] = 0.25  # a constant row
    if axis == 1:
        table = table.T.copy()
    qt = quantize_rows(table, axis)
    assert qt.q.dtype == np.uint8 and qt.q.shape == table.shape and qt.axis == axis
    assert qt.scale.shape == qt.offset.shape == tuple(n if a == axis else 1 for a, n in enumerate(table.shape))
    back = np.asarray(jax.jit(dequantize)(qt))  # a pytree with a static axis: dequantises under jit
    assert back.dtype == np.float32
    err = np.abs(back - table)
    assert np.all(err <= qt.scale / 2 * (1 + 1e-5) + 1e-7), err.max()
    const = (slice(5, 6), slice(None)) if axis == 0 else (slice(None), slice(5, 6))
    np.testing.assert_array_equal(back[const], table[const])  # scale 1, exact
    assert qt.q.min() == 0 and qt.q.max() == 255


def test_dequantize_tree_maps_only_quantized_leaves():
    qt = quantize_rows(np.arange(12, dtype=np.float32).reshape(3, 4), 0)
    tree = {"a": {"t": qt}, "b": np.ones(3, np.float32)}
    out = dequantize_tree(tree)
    np.testing.assert_allclose(out["a"]["t"], np.arange(12).reshape(3, 4), atol=1e-5)
    assert out["b"] is tree["b"]
    assert len(jax.tree.leaves(tree)) == 4 and isinstance(jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedTable))[0], QuantizedTable)


def test_item_table_axes_names_exactly_the_item_tables(tmp_path):
    _, full = _model(tmp_path)
    assert item_table_axes(full) == {"embed/embedding": 0, "head/kernel": 1}
    _, tree = _model(tmp_path, **TREE)
    assert item_table_axes(tree) == {"embed/head": 0, "embed/tail_1_emb": 0, "embed/tail_2_emb": 0,
                                     "head/head": 1, "head/tail_1_out": 1, "head/tail_2_out": 1}
    # Item axes: one slice per item (the tree head also has one column per tail cluster token).
    assert full["embed"]["embedding"].shape[0] == full["head"]["kernel"].shape[1] == 61
    assert tree["head"]["head"].shape[1] == 20 + 2 and tree["head"]["tail_2_out"].shape[1] == 21
    # Rank-2 slices would grow with 8 bytes of scale and offset each: left float32.
    q = quantize_params(tree)
    kinds = {name: isinstance(x, QuantizedTable) for name, x in
             ((param_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(q, is_leaf=lambda x: isinstance(x, QuantizedTable))[0])}
    assert {n for n, k in kinds.items() if k} == {"embed/head", "embed/tail_1_emb", "head/head", "head/tail_1_out"}


def test_tensor_train_cores_are_quantised_per_item_factor_slice(tmp_path):
    """TT-Rec's cores are 3-D and 4-D, item factor first: int8 quantises each of their slices (one per
    value of that factor), so an int8 TT artifact is smaller than float32 and scores like it."""
    model, params = _model(tmp_path, embedding="tt", tie_embeddings=True, output_projection=True, tt_rank=3)
    cores = {n: a.shape for n, a in _flat(params).items() if n.startswith("embed/core_")}
    assert sorted(len(s) for s in cores.values()) == [3, 3, 4]
    assert {n: a for n, a in item_table_axes(params).items() if n in cores} == {n: 0 for n in cores}
    q = quantize_params(params)
    assert all(isinstance(q["embed"][n.split("/")[1]], QuantizedTable) for n in cores)
    x = jnp.asarray(np.random.default_rng(1).integers(0, 61, size=(3, 10)), jnp.int32)
    ref = model.apply({"params": params}, x, method=NextItNet.last_log_prob)
    got = model.apply({"params": dequantize_tree(q)}, x, method=NextItNet.last_log_prob)
    np.testing.assert_allclose(got, ref, atol=0.01 * np.ptp(ref))  # 8 bits in each of three chained factors
    sizes = {dtype: _save(tmp_path / dtype, model, params, dtype) for dtype in ("float32", "int8")}
    art = load_artifact(sizes["int8"])
    assert set(cores) <= set(art.manifest["quantized"])
    core_bytes = {}
    for dtype, out in sizes.items():
        with safe_open(str(out / "params.safetensors"), framework="np") as f:
            core_bytes[dtype] = sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith("embed/core_"))
    assert core_bytes["int8"] < core_bytes["float32"] / 2


# CI: the plain model and CpRec with every table tied; the two between them with -m slow.
@pytest.mark.parametrize("kw", [{}, pytest.param(TREE, marks=pytest.mark.slow),
                                pytest.param({"tie_embeddings": True, "output_projection": True}, marks=pytest.mark.slow),
                                # d = 16: at d = 8 the tied tables are so few that safetensors' headers
                                # for the codes, scales and offsets outweigh the bytes int8 saves
                                {**TREE, "dim": 16, "ranks": (16, 4, 2), "tie_embeddings": True,
                                 "tie_projections": True}],
                         ids=["full", "tree", "full-tied", "tree-tied"])
def test_round_trip_float32_bfloat16_int8(tmp_path, kw):
    model, params = _model(tmp_path, **kw)
    flat = _flat(params)
    x = jnp.asarray(np.random.default_rng(1).integers(0, 61, size=(3, 10)), jnp.int32)
    ref = model.apply({"params": params}, x, method=NextItNet.last_log_prob)
    sizes = {}
    for dtype in ("float32", "bfloat16", "int8"):
        out = _save(tmp_path / dtype, model, params, dtype)
        art = load_artifact(out)
        assert art.model_kwargs == model_kwargs_of(model) and art.max_len == 10
        assert art.model() == NextItNet(**model_kwargs_of(model))
        assert art.item_ids[:3] == [None, "sku-1", 1002] and art.item_counts.tolist() == COUNTS.tolist()
        m = art.manifest
        assert (m["format_version"], m["dtype"], m["source_run"], m["step"]) == (2, dtype, "somewhere", 3)
        assert m["param_count"] == sum(a.size for a in flat.values())
        files = {p.name: p.stat().st_size for p in out.iterdir()}
        assert m["files"] == files and m["total_bytes"] == sum(files.values())
        sizes[dtype] = m["files"]["params.safetensors"]
        got = _flat(art.float_params())
        assert got.keys() == flat.keys()
        for name, ref_value in flat.items():
            assert got[name].dtype == np.float32, name
            thin = dtype == "int8" and name in item_table_axes(params) and name not in m["quantized"]
            if dtype == "float32" or (dtype == "int8" and name not in m["quantized"] and not thin):
                np.testing.assert_array_equal(got[name], ref_value, err_msg=name)
            elif dtype == "bfloat16" or thin:  # int8 keeps item tables too thin to quantise in bfloat16
                np.testing.assert_allclose(got[name], ref_value, rtol=2**-8, atol=1e-30, err_msg=name)
        if dtype == "int8":
            assert m["quantized"] and set(m["quantized"]) <= set(item_table_axes(params))
            for name, axis in m["quantized"].items():
                table = art.params
                for part in name.split("/"):
                    table = table[part]
                assert isinstance(table, QuantizedTable) and table.axis == axis and table.q.dtype == np.uint8
                assert np.all(np.abs(got[name] - flat[name]) <= table.scale / 2 * (1 + 1e-5) + 1e-7), name
        lp = art.model().apply({"params": art.float_params()}, x, method=NextItNet.last_log_prob)
        if dtype == "float32":
            np.testing.assert_array_equal(lp, ref)
        else:
            np.testing.assert_allclose(lp, ref, atol=0.05)
    assert sizes["bfloat16"] < sizes["float32"] and sizes["int8"] < sizes["float32"]


def test_bfloat16_is_stored_as_bf16_in_safetensors(tmp_path):
    model, params = _model(tmp_path)
    out = _save(tmp_path / "a", model, params, "bfloat16")
    with safe_open(str(out / "params.safetensors"), framework="np") as f:
        assert f.metadata()["dtype"] == "bfloat16"
        assert str(f.get_tensor("stack/kernels").dtype) == "bfloat16"
    out = _save(tmp_path / "b", model, params, "int8")
    with safe_open(str(out / "params.safetensors"), framework="np") as f:
        assert json.loads(f.metadata()["quantized"]) == {"embed/embedding": 0, "head/kernel": 1}
        assert f.get_tensor("embed/embedding.q").dtype == np.uint8
        assert f.get_tensor("head/kernel.scale").shape == (1, 61)
        assert f.get_tensor("stack/kernels").dtype == np.float32


def test_only_safetensors_and_json(tmp_path):
    model, params = _model(tmp_path, **TREE)
    out = _save(tmp_path / "a", model, params, "int8")
    assert sorted(p.name for p in out.iterdir()) == ["item_counts.json.gz", "items.json.gz", "manifest.json",
                                                     "model.json", "params.safetensors"]
    for p in out.iterdir():
        assert b"\x80\x04" not in p.read_bytes()[:2]  # no pickle header
        if p.suffix == ".json":
            json.loads(p.read_text())
    assert json.loads(gzip.decompress((out / "items.json.gz").read_bytes()))[:3] == [None, "sku-1", 1002]
    again = _save(tmp_path / "again", model, params, "int8")
    assert (again / "items.json.gz").read_bytes() == (out / "items.json.gz").read_bytes()  # reproducible bytes


def test_format_1_artifacts_with_plain_json_id_lists_still_load(tmp_path):
    model, params = _model(tmp_path, **TREE)
    out = _save(tmp_path / "v1", model, params)
    for name in ("items.json", "item_counts.json"):
        (out / name).write_bytes(gzip.decompress((out / f"{name}.gz").read_bytes()))
        (out / f"{name}.gz").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    art = load_artifact(out)
    assert art.item_ids[:3] == [None, "sku-1", 1002] and len(art.item_counts) == model.num_items


def test_int8_keeps_thin_item_tables_in_bfloat16(tmp_path):
    model, params = _model(tmp_path, **TREE)
    out = _save(tmp_path / "thin", model, params, "int8")
    with safe_open(str(out / "params.safetensors"), framework="np") as f:
        dtypes = {name: str(f.get_tensor(name).dtype) for name in f.keys()}
    thin = [n for n in item_table_axes(params) if f"{n}.q" not in dtypes]
    assert thin and all(dtypes[n] == "bfloat16" for n in thin)  # too thin for row-wise int8: bf16, not f32
    assert all(dtypes[n] == "float32" for n in dtypes if n not in thin and not n.endswith((".q", ".scale", ".offset")))


def test_refuses_a_non_empty_dir_and_force_replaces(tmp_path):
    model, params = _model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    _save(out, model, params)  # an empty directory is fine
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="--force"):
        _save(out, model, params, "int8")
    assert (out / "mine.txt").read_text() == "keep me"
    assert load_artifact(out).manifest["dtype"] == "float32"
    _save(out, model, params, "int8", force=True)
    assert not (out / "mine.txt").exists() and load_artifact(out).manifest["dtype"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old directories left


@pytest.mark.parametrize("existing", [False, True])
def test_a_crash_mid_write_leaves_nothing_half_written(tmp_path, monkeypatch, existing):
    model, params = _model(tmp_path)
    root = tmp_path / "exports"
    out = root / "out"
    if existing:
        _save(out, model, params)

    def dying(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_module, "_write_compact_json", dying)
    with pytest.raises(KeyboardInterrupt):
        _save(out, model, params, "int8", force=True)
    assert sorted(p.name for p in root.iterdir()) == (["out"] if existing else [])
    if existing:
        assert load_artifact(out).manifest["dtype"] == "float32"


def test_load_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope")
    model, params = _model(tmp_path)
    out = _save(tmp_path / "a", model, params)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format_version 99; this cprec reads format_version 1"):
        load_artifact(out)
    (out / "manifest.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="manifest.json is unreadable"):
        load_artifact(out)
    out = _save(tmp_path / "b", model, params)
    (out / "params.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="params.safetensors is damaged") as info:
        load_artifact(out)
    assert "\n" not in str(info.value)
    out = _save(tmp_path / "c", model, params)
    (out / "items.json.gz").unlink()
    with pytest.raises(ArtifactError, match="items.json.gz is missing"):
        load_artifact(out)
    out = _save(tmp_path / "d", model, params)
    (out / "model.json").write_text(json.dumps({**json.loads((out / "model.json").read_text()), "dim": 16}))
    with pytest.raises(ArtifactError, match="does not match model.json"):
        load_artifact(out)


def test_serve_imports_no_training_stack():
    from tests.test_layout import _imported_by

    loaded = _imported_by("cprec.serve.artifact")
    banned = ("cprec.train", "cprec.eval", "cprec.data", "cprec.runtime", "cprec.sweep", "optax", "orbax")
    assert not sorted(m for m in loaded if m.startswith(banned))
