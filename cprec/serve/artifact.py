"""A serving artifact: one directory with all a server needs to recommend, and no pickle.

    art = load_artifact("exports/cprec-1m")
    model, params = art.model(), art.float_params()
    scores, ids, _ = model.apply({"params": params}, histories, 20, method="top_k")
    raw = [art.item_ids[i] for i in ids[0]]           # the data file's item ids

Layout (``FORMAT_VERSION`` 2), written by ``save_artifact`` (``python -m cprec.export``):

- ``params.safetensors``: every parameter under its "/"-joined name (``stack/kernels``,
  ``head/tail_1_out``, ...). float32: all float32. bfloat16: all stored as BF16 (safetensors'
  own dtype, which ``safetensors.numpy.save_file`` / ``load_file`` and torch read).
  int8: each quantised item table (``cprec.serve.quantize``) as three tensors ``<name>.q`` (uint8),
  ``<name>.scale`` and ``<name>.offset`` (float32, shaped to broadcast against ``q``: 1 on every axis
  but the item axis); item tables too thin to quantise row-wise (rank-1 and rank-2 tail clusters)
  as bfloat16; the rest (conv kernels, biases, LayerNorms, projections) float32. Any dtype: an item
  table with at least half its entries zero that is smaller as non-zeros and their positions (a
  pruned one) is stored so (``cprec.serve.sparse``: ``<name>.indices``, ``.indptr`` and the values,
  quantised for int8) and densified at load. The header metadata holds ``format`` (``cprec-params``),
  ``dtype``, ``quantized`` (JSON ``{name: item axis}``) and ``sparse`` (JSON ``{name: {axis, shape}}``).
- ``model.json``: the model's constructor kwargs (``model_fields``: the backbone, ``nextitnet`` when
  absent, the item layers and the backbone's own) and ``max_len`` (L, the history length the model
  was trained on, and SASRec's number of positions).
- ``items.json.gz``: a gzip-compressed JSON list, the data file's item id for every internal id;
  index 0 (padding) is null; integer ids stay JSON numbers, token ids JSON strings.
- ``item_counts.json.gz``: a gzip-compressed JSON list, the training count of every internal id
  (the clusters follow it). gzip because at a million items the two lists take 8.9 MB as plain
  JSON, as much as the int8 model itself, and 2.7 MB compressed. Format 1 artifacts (plain
  ``items.json`` / ``item_counts.json``) are still read.
- ``manifest.json``: ``format_version``, ``cprec_version``, ``created``, ``dtype``, what the caller
  passes (the export: ``source_run``, ``source``, ``step``, ``metrics``), ``param_count``,
  ``quantized``, ``files`` (bytes of each file, itself included) and ``total_bytes``.

``load_artifact`` returns float32 numpy arrays for float32 and bfloat16 artifacts (bfloat16 values
upcast exactly; serving computes in float32 as training did) and ``QuantizedTable`` leaves for
int8 ones: dequantise them with ``Artifact.float_params()`` once, or ``dequantize_tree`` inside a
jitted call to keep the item tables 8-bit in memory.

A directory appears only complete: it is written under a hidden temporary sibling name, read back
and checked, then renamed into place (a replaced one is removed only after that).
"""
from __future__ import annotations

import datetime
import gzip
import importlib.metadata
import json
import os
import pathlib
import shutil
import sys
import uuid
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from cprec.errors import CprecError
from cprec.model.builder import init_params
from cprec.model.nextitnet import NextItNet
from cprec.model.sasrec import SASRec
from cprec.model.sequential import SequentialRecommender
from cprec.serve.sparse import PARTS as SPARSE_PARTS
from cprec.serve.sparse import densify, encode, worth_storing_sparse
from cprec.serve.quantize import (QuantizedTable, dequantize_tree, is_quantized, item_table_axes, param_path,
                                  quantize_params)

FORMAT_VERSION = 2
# Bytes per entry of an item table stored densely (int8: its uint8 codes; scales and offsets aside).
_DENSE_ITEM_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
READABLE_FORMATS = (1, 2)  # format 1: the id lists as plain JSON
DTYPES = ("float32", "bfloat16", "int8")
# The item layers' fields (every backbone), then each backbone's own (SASRec's max_len is model.json's).
ITEM_FIELDS = ("num_items", "dim", "sharing", "embedding", "softmax", "cutoffs", "ranks", "tie_embeddings",
               "tie_projections", "output_projection", "table_options")
BACKBONE_FIELDS = {"nextitnet": ("dilations", "kernel_size"), "sasrec": ("num_blocks", "num_heads", "inner_dim")}
BACKBONES = {"nextitnet": NextItNet, "sasrec": SASRec}
MODEL_FIELDS = ITEM_FIELDS + BACKBONE_FIELDS["nextitnet"]  # a NextItNet's (artifacts before SASRec)
# Fields added after format 2 was first written, and the value an artifact without them means.
_LATER_FIELDS = {"tie_embeddings": False, "tie_projections": False, "output_projection": False}
_LATER_OPTIONS = {"table_options": ()}  # a rival item table's sizes: a JSON object in model.json
_TUPLE_FIELDS = ("dilations", "cutoffs", "ranks")
PARAMS_FILE, MODEL_FILE, ITEMS_FILE, COUNTS_FILE, MANIFEST_FILE = (
    "params.safetensors", "model.json", "items.json.gz", "item_counts.json.gz", "manifest.json")
_QUANT_PARTS = ("q", "scale", "offset")
_FALLBACK_VERSION = "0.1.0"


class ArtifactError(CprecError):
    """A missing, damaged or unreadable artifact directory, or one that may not be written."""


class Artifact(NamedTuple):
    model_kwargs: dict  # model_from_kwargs(model_kwargs); tuples for dilations, cutoffs, ranks
    max_len: int  # L, the history length of training
    params: Any  # nested dicts: float32 numpy arrays, QuantizedTable leaves for int8 item tables
    item_ids: list  # data file item id per internal id; [0] is None (padding)
    item_counts: np.ndarray  # [V] int64 training counts
    manifest: dict

    def model(self) -> SequentialRecommender:
        """The model to apply the parameters to (no training capacities: serving needs none)."""
        return model_from_kwargs(self.model_kwargs)

    def float_params(self) -> Any:
        """The parameters with every quantised table dequantised to float32."""
        return dequantize_tree(self.params)


def backbone_of(model: SequentialRecommender) -> str:
    return next(name for name, cls in BACKBONES.items() if isinstance(model, cls))


def model_fields(backbone: str) -> tuple[str, ...]:
    """The constructor kwargs an artifact keeps for a ``backbone`` model (SASRec's max_len besides)."""
    return ITEM_FIELDS + BACKBONE_FIELDS[backbone] + (("max_len",) if backbone == "sasrec" else ())


def model_kwargs_of(model: SequentialRecommender) -> dict:
    """The constructor kwargs of `model` an artifact keeps, with ``backbone`` for a SASRec."""
    backbone = backbone_of(model)
    kwargs = {field: getattr(model, field) for field in model_fields(backbone)}
    return kwargs if backbone == "nextitnet" else {"backbone": backbone, **kwargs}


def model_from_kwargs(kwargs: Mapping) -> SequentialRecommender:
    """The model of ``model_kwargs_of``'s dict (no ``backbone``: a NextItNet)."""
    kwargs = dict(kwargs)
    return BACKBONES[kwargs.pop("backbone", "nextitnet")](**kwargs)


def cprec_version() -> str:
    """The installed distribution's version, else ``cprec.__version__``, else ``_FALLBACK_VERSION``."""
    try:
        return importlib.metadata.version("cprec")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(sys.modules.get("cprec"), "__version__", _FALLBACK_VERSION))


# ----------------------------------------------------------------------------------------------
# Writing

def check_out_dir(out_dir: str | pathlib.Path, force: bool) -> pathlib.Path:
    """`out_dir` as a path, or an ArtifactError when it may not be (re)written; writes nothing."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"{out_dir} exists and is not a directory; give another output directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ArtifactError(f"{out_dir} exists and is not empty; pass --force to replace it, or give another directory")
    return out_dir


def _flatten(params: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    flat = {}
    for path, leaf in leaves:
        name = param_path(path)
        if not name or "." in name:
            raise ValueError(f"parameter name {name!r} cannot be stored: names must be non-empty and have no '.'")
        flat[name] = leaf
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def _tensors(params: Any, dtype: str) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, dict], Any]:
    """(safetensors dict, {quantised name: axis}, {sparse name: {axis, shape}}, the params as
    load_artifact will return them). An item table that is smaller stored sparsely (a pruned one,
    ``cprec.serve.sparse``) is; the rest as ``dtype`` says."""
    flat_all = _flatten(params)
    sparse, sparse_parts = {}, {}
    for name, axis in item_table_axes(params).items():
        table = np.asarray(flat_all[name])
        # int8: a dense table's uint8 codes and a float32 scale and offset per slice
        dense_bytes = table.size * _DENSE_ITEM_BYTES[dtype] + (8 * table.shape[axis] if dtype == "int8" else 0)
        if worth_storing_sparse(table, axis, dense_bytes, dtype):
            sparse[name] = {"axis": int(axis), "shape": list(table.shape)}
            sparse_parts[name] = encode(table, axis, dtype)
    params = _unflatten({k: v for k, v in flat_all.items() if k not in sparse})
    thin_tables: set[str] = set()
    if dtype == "int8":
        thin_tables = set(item_table_axes(params))
        params = quantize_params(params)
    tensors, quantized, loaded = {}, {}, {}
    for name, leaf in _flatten(params).items():
        if is_quantized(leaf):
            quantized[name] = int(leaf.axis)
            parts = (np.asarray(leaf.q, np.uint8), np.asarray(leaf.scale, np.float32),
                     np.asarray(leaf.offset, np.float32))
            for part, array in zip(_QUANT_PARTS, parts):
                tensors[f"{name}.{part}"] = np.ascontiguousarray(array)
            loaded[name] = QuantizedTable(*parts, leaf.axis)
            continue
        array = np.asarray(leaf)
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"parameter {name} has dtype {array.dtype}; an artifact stores float parameters")
        array = array.astype(np.float32)
        if dtype == "bfloat16" or name in thin_tables:  # int8: an item table left unquantised
            stored = array.astype(ml_dtypes.bfloat16)
            tensors[name], loaded[name] = np.ascontiguousarray(stored), stored.astype(np.float32)
        else:
            tensors[name], loaded[name] = np.ascontiguousarray(array), array
    for name, parts in sparse_parts.items():
        tensors |= {f"{name}.{part}": np.ascontiguousarray(array) for part, array in parts.items()}
        loaded[name] = np.asarray(densify(parts, tuple(sparse[name]["shape"]), sparse[name]["axis"]))
    return tensors, quantized, sparse, _unflatten(loaded)


def stored_params(params: Any, dtype: str) -> tuple[int, Any]:
    """(bytes of ``params`` in an artifact's params.safetensors of ``dtype``, tensors only, no header;
    the parameters as ``load_artifact`` returns them, quantised tables as QuantizedTable leaves)."""
    tensors, _, _, loaded = _tensors(params, dtype)
    return int(sum(t.nbytes for t in tensors.values())), loaded


def _json_id(raw: Any, index: int) -> Any:
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, (int, np.integer)) and not isinstance(raw, (bool, np.bool_)):
        return int(raw)
    raise ValueError(f"item id {raw!r} of internal id {index} is neither an int nor a string")


def _model_json(model_kwargs: Mapping, max_len: int) -> dict:
    backbone = model_kwargs.get("backbone", "nextitnet")
    fields = model_fields(backbone)
    missing = [f for f in fields if f not in model_kwargs]
    extra = [f for f in model_kwargs if f not in fields + ("backbone",)]
    if missing or extra:
        raise ValueError(f"model_kwargs needs exactly {fields}; missing {missing}, unexpected {extra}")
    if backbone == "sasrec" and int(model_kwargs["max_len"]) != int(max_len):
        raise ValueError(f"a SASRec's positions ({model_kwargs['max_len']}) must equal max_len ({max_len})")
    out = {"backbone": backbone}
    for field in fields:
        value = model_kwargs[field]
        out[field] = [int(v) for v in value] if field in _TUPLE_FIELDS else value
    for field in ("num_items", "dim") + BACKBONE_FIELDS[backbone]:
        if field not in _TUPLE_FIELDS:
            out[field] = int(out[field])
    for field in _LATER_FIELDS:
        out[field] = bool(out[field])
    out["table_options"] = {str(k): v for k, v in out["table_options"]}
    out["max_len"] = int(max_len)
    return out


def _model_kwargs(model_json: Mapping) -> dict:
    """The constructor kwargs from model.json (its lists back to tuples; ``backbone`` for a SASRec)."""
    model_json = {**_LATER_FIELDS, **_LATER_OPTIONS, **model_json}
    backbone = model_json.get("backbone", "nextitnet")
    if backbone not in BACKBONES:
        raise KeyError("backbone")
    kwargs = {f: tuple(int(v) for v in model_json[f]) if f in _TUPLE_FIELDS else model_json[f]
              for f in model_fields(backbone)}
    kwargs["table_options"] = tuple(sorted(dict(kwargs["table_options"]).items()))
    return kwargs if backbone == "nextitnet" else {"backbone": backbone, **kwargs}


def _write_compact_json(path: pathlib.Path, data: Any) -> None:
    text = json.dumps(data, separators=(",", ":")) + "\n"
    if path.suffix == ".gz":
        # mtime=0: the same ids give the same bytes
        path.write_bytes(gzip.compress(text.encode(), compresslevel=6, mtime=0))
    else:
        path.write_text(text)


def _write_manifest(directory: pathlib.Path, manifest: dict) -> dict:
    """Writes manifest.json with the byte counts of every file, its own included (a fixed point)."""
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    size = 0
    for _ in range(10):
        full = {**manifest, "files": {**files, MANIFEST_FILE: size}, "total_bytes": sum(files.values()) + size}
        text = json.dumps(full, indent=2) + "\n"
        if len(text.encode()) == size:
            break
        size = len(text.encode())
    (directory / MANIFEST_FILE).write_text(text)
    return full


def save_artifact(out_dir: str | pathlib.Path, *, model_kwargs: dict, max_len: int, params: Any,
                  item_ids: list, item_counts: np.ndarray, dtype: str, manifest: dict, force: bool = False,
                  extra: Callable[[pathlib.Path, Artifact], None] | None = None) -> pathlib.Path:
    """Writes the artifact of a model into `out_dir` (layout in the module docstring); returns it.

    An existing non-empty `out_dir` is refused unless `force`, and then replaced only once the new
    artifact is complete. `manifest`: what to record beside the sizes (e.g. the source run).
    `extra(directory, artifact)`: writes further files (e.g. a compiled recommend function) into the
    not-yet-renamed directory; they are part of the artifact, counted in the manifest.
    """
    if dtype not in DTYPES:
        raise ArtifactError(f"dtype {dtype!r} is unknown; valid choices: {', '.join(DTYPES)}")
    out_dir = check_out_dir(out_dir, force)
    counts = np.asarray(item_counts).astype(np.int64)
    model_json = _model_json(model_kwargs, max_len)
    num_items = model_json["num_items"]
    if len(item_ids) != num_items or counts.shape != (num_items,):
        raise ValueError(f"{len(item_ids)} item ids and {counts.shape} counts for a model of {num_items} items")
    ids = [_json_id(raw, k) for k, raw in enumerate(item_ids)]
    tensors, quantized, sparse, loaded_params = _tensors(params, dtype)
    kwargs = _model_kwargs(model_json)
    param_count = int(sum(np.prod(np.shape(t.q if is_quantized(t) else t)) for t in
                          jax.tree.leaves(loaded_params, is_leaf=is_quantized)))
    full_manifest = {
        "format_version": FORMAT_VERSION,
        "cprec_version": cprec_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in manifest.items() if k not in ("format_version", "files", "total_bytes")},
        "dtype": dtype,
        "param_count": param_count,
        "quantized": quantized,
        "sparse": sparse,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    old = out_dir.parent / f".{out_dir.name}.old-{tag}"
    moved_old = False
    try:
        tmp.mkdir()
        metadata = {"format": "cprec-params", "dtype": dtype, "quantized": json.dumps(quantized, sort_keys=True),
                    "sparse": json.dumps(sparse, sort_keys=True)}
        save_file(tensors, str(tmp / PARAMS_FILE), metadata=metadata)
        (tmp / MODEL_FILE).write_text(json.dumps(model_json, indent=2) + "\n")
        _write_compact_json(tmp / ITEMS_FILE, ids)
        _write_compact_json(tmp / COUNTS_FILE, counts.tolist())
        if extra is not None:
            extra(tmp, Artifact(kwargs, model_json["max_len"], loaded_params, ids, counts, dict(full_manifest)))
        _write_manifest(tmp, full_manifest)
        load_artifact(tmp)  # what was written reads back and matches the model
        if out_dir.is_dir():
            if any(out_dir.iterdir()):
                check_out_dir(out_dir, force)  # appeared meanwhile
                out_dir.rename(old)
                moved_old = True
            else:
                out_dir.rmdir()
        tmp.rename(out_dir)
    except OSError as e:
        raise ArtifactError(f"cannot write the artifact {out_dir} ({' '.join(str(e).split())[:200]}); "
                            "check free space and permissions") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_old:
            if out_dir.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(out_dir)  # the new one never arrived: the old stays
    return out_dir


# ----------------------------------------------------------------------------------------------
# Reading

def _read_json(path: pathlib.Path) -> Any:
    try:
        if path.suffix == ".gz":
            return json.loads(gzip.decompress(path.read_bytes()))
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing; the artifact is incomplete: export it again") from None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is unreadable ({type(e).__name__}); the artifact is damaged: export it again") from None


def _read_params(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; the artifact is incomplete: export it again")
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError and others for damaged files
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise ArtifactError(f"{path} is damaged ({reason}); export the artifact again") from None
    return tensors, metadata


def params_from_tensors(tensors: Mapping[str, Any], quantized: Mapping[str, int],
                        sparse: Mapping[str, Mapping] | None = None) -> dict:
    """The nested parameters from the flat tensors of params.safetensors and its ``quantized`` and
    ``sparse`` metadata: QuantizedTable leaves for quantised tables, float32 for the rest (bfloat16
    upcasts exactly; a sparse table is densified). Works on numpy and on traced jax arrays (the
    StableHLO export calls it inside).
    """
    rest = dict(tensors)
    flat: dict[str, Any] = {}
    for name, spec in (sparse or {}).items():
        parts = {part: rest.pop(f"{name}.{part}") for part in SPARSE_PARTS if f"{name}.{part}" in rest}
        dense = densify(parts, tuple(spec["shape"]), int(spec["axis"]))
        flat[name] = np.asarray(dense) if isinstance(parts["indices"], np.ndarray) else dense
    for name, axis in quantized.items():
        q, scale, offset = (rest.pop(f"{name}.{part}") for part in _QUANT_PARTS)
        flat[name] = QuantizedTable(q, scale.astype(np.float32), offset.astype(np.float32), int(axis))
    for name, array in rest.items():
        flat[name] = array.astype(np.float32)
    return _unflatten(flat)


def _expected_shapes(model: SequentialRecommender) -> dict[str, tuple[int, ...]]:
    shapes = jax.eval_shape(lambda: init_params(model, 0))
    return {name: tuple(leaf.shape) for name, leaf in _flatten(shapes).items()}


def load_artifact(path: str | pathlib.Path) -> Artifact:
    """Reads an artifact directory written by ``save_artifact``; every problem is an ArtifactError."""
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist; give an OUT_DIR of `python -m cprec.export`")
    manifest = _read_json(directory / MANIFEST_FILE)
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in READABLE_FORMATS:
        raise ArtifactError(f"{directory / MANIFEST_FILE} has format_version {version!r}; this cprec reads format_version "
                            f"{', '.join(map(str, READABLE_FORMATS))}: export the run again with this cprec")
    model_json = _read_json(directory / MODEL_FILE)
    try:
        kwargs = _model_kwargs(model_json)
        max_len = int(model_json["max_len"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{directory / MODEL_FILE} lacks a valid {e}; the artifact is damaged: export it again") from None
    plain = version == 1  # format 1 kept the id lists as plain JSON
    item_ids = _read_json(directory / (ITEMS_FILE.removesuffix(".gz") if plain else ITEMS_FILE))
    counts = _read_json(directory / (COUNTS_FILE.removesuffix(".gz") if plain else COUNTS_FILE))
    if not (isinstance(item_ids, list) and isinstance(counts, list) and len(item_ids) == len(counts) == kwargs["num_items"]):
        raise ArtifactError(f"{directory}: {ITEMS_FILE} and {COUNTS_FILE} do not list the model's {kwargs['num_items']} "
                            "items; the artifact is damaged: export it again")
    tensors, metadata = _read_params(directory / PARAMS_FILE)
    try:
        quantized = {name: int(axis) for name, axis in json.loads(metadata.get("quantized", "{}")).items()}
        sparse = {name: {"axis": int(spec["axis"]), "shape": [int(n) for n in spec["shape"]]}
                  for name, spec in json.loads(metadata.get("sparse", "{}")).items()}
    except (ValueError, TypeError, AttributeError, KeyError):
        raise ArtifactError(f"{directory / PARAMS_FILE} has unreadable metadata; export the artifact again") from None
    try:
        params = params_from_tensors(tensors, quantized, sparse)
    except KeyError as e:
        raise ArtifactError(f"{directory / PARAMS_FILE} lacks the tensor {e}; export the artifact again") from None
    flat = _flatten(params)
    try:
        model = model_from_kwargs(kwargs)
        expected = _expected_shapes(model)
    except CprecError as e:
        raise ArtifactError(f"{directory / MODEL_FILE} describes no valid model ({e}); export it again") from None
    got = {name: tuple(np.shape(leaf.q if is_quantized(leaf) else leaf)) for name, leaf in flat.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise ArtifactError(f"{directory / PARAMS_FILE} does not match model.json (first differences: {diff}); "
                            "export the artifact again")
    return Artifact(kwargs, max_len, params, item_ids, np.asarray(counts, np.int64), manifest)
