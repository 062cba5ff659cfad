"""The recommend function as StableHLO (``jax.export``): top-n without cprec, with jax alone.

``python -m cprec.export`` writes, beside the parameters, one serialised ``jax.export.Exported``
per batch size, ``recommend_b{B}.stablehlo``, and ``stablehlo.json`` that says how to call them.
A process with jax and safetensors (and no cprec) recommends with:

    import json, jax, numpy as np
    from safetensors.numpy import load_file
    sig = json.load(open(f"{art}/stablehlo.json"))
    params = load_file(f"{art}/params.safetensors")              # the artifact's tensors, as stored
    fn = jax.export.deserialize(open(f"{art}/{sig['files']['8']}", "rb").read())
    scores, ids, exact = fn.call(params, histories, exclude, max_clusters)

- ``histories`` int32 [B, L]: internal ids (the index of a raw id in items.json), most recent
  last, left-padded with 0; the last L = ``max_len`` items, as ``Recommender`` reads them
  (``context="window"``, the default).
- ``exclude`` int32 [B, E] with E = ``max_exclude`` (128 by default, set at export): ids never to
  recommend, -1 for none. ``exclude_seen`` is the history's E most recent distinct items: the
  policy of ``Recommender`` (which reads E from this signature) and of its sessions.
- ``max_clusters`` int32 [B]: tail clusters each row may expand; ``num_tail_clusters`` is exact.
- Returns log-probabilities [B, n] (best first), internal ids [B, n] and ``exact`` [B] bool; an
  entry whose score is -inf is no item (fewer than n left). Any n' <= n is the first n' columns.

Why one export per batch size: the early stop compacts the rows that need a cluster into static
buffers whose sizes derive from B (``_row_buckets``), so B cannot be a symbolic dimension; a
caller pads its batch to the next exported size. The parameters are an argument (the same tensors
as ``params.safetensors``, int8 codes and bfloat16 included, dequantised inside), so the exports
hold no copy of them; the early stop's cluster statistics, computed once from the dequantised
weights, are constants of the module.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import export as jax_export
from safetensors import safe_open

from cprec.model.nextitnet import NextItNet
from cprec.model.sasrec import SASRec
from cprec.serve.artifact import PARAMS_FILE, Artifact, params_from_tensors
from cprec.model.conv import padded_conv
from cprec.serve.incremental import padding_window
from cprec.serve.recommender import MAX_EXCLUDE, recommend_program

SIGNATURE_FILE = "stablehlo.json"
BATCH_SIZES = (1, 8, 64, 256)
TOP_N = 20
PLATFORMS = ("cpu", "cuda")


def recommend_fn(model: NextItNet, stats: Any, n: int, quantized: dict[str, int], padded_window: tuple,
                 sparse: dict[str, dict] | None = None) -> Callable:
    """(tensors, histories [B, L], exclude [B, E], max_clusters [B]) -> (scores, ids, exact).

    ``tensors``: params.safetensors' flat dict. ``recommend_program``, the computation
    ``Recommender`` runs for a window context, with the portable conv (the matmul form: the same
    program suits CPU and GPU) and the whole batch in one pass.
    """
    def fn(tensors, histories, exclude, max_clusters):
        scores, ids, _, exact = recommend_program(model, params_from_tensors(tensors, quantized, sparse), stats, histories,
                                                  exclude, max_clusters, n, padded_window, None, padded_conv)
        return scores, ids, exact
    return fn


def _tensor_specs(path: pathlib.Path) -> dict[str, jax.ShapeDtypeStruct]:
    with safe_open(str(path), framework="np") as f:
        return {name: jax.ShapeDtypeStruct(t.shape, t.dtype) for name in f.keys() for t in [f.get_tensor(name)]}


def num_tail_clusters(model: NextItNet) -> int:
    return max(0, len(model.cutoffs) - 1) if model.softmax == "tree" else 0


def export_recommend(directory: pathlib.Path, artifact: Artifact, batch_sizes: Sequence[int] = BATCH_SIZES,
                     n: int = TOP_N, max_exclude: int = MAX_EXCLUDE, platforms: Sequence[str] = PLATFORMS) -> dict:
    """Writes ``recommend_b{B}.stablehlo`` per batch size and ``stablehlo.json`` into `directory`
    (an artifact being written: params.safetensors must be there); returns the signature."""
    model = artifact.model()
    n = min(int(n), len(artifact.item_ids) - 1)
    max_len = int(artifact.max_len)
    quantized = {k: int(v) for k, v in artifact.manifest.get("quantized", {}).items()}
    specs = _tensor_specs(directory / PARAMS_FILE)
    float_params = artifact.float_params()
    # The tree's cluster bounds are small constants of the program. A TT-Rec table's rebuilt rows
    # (its serving stats) are as large as the uncompressed table: the program rebuilds them per call.
    stats = None if model.softmax != "tree" else jax.tree.map(
        np.asarray, jax.jit(lambda p: model.apply({"params": p}, method="serving_stats"))(float_params))
    # A SASRec encodes the window as it is (padding masked); a NextItNet needs its padding's left context.
    padded = None if isinstance(model, SASRec) else jax.tree.map(
        np.asarray, jax.jit(lambda p: padding_window(model, p, max_len))(float_params))
    sparse = artifact.manifest.get("sparse", {})
    fn = jax.jit(recommend_fn(model, stats, n, quantized, padded, sparse))
    files = {}
    for b in sorted(set(int(b) for b in batch_sizes)):
        args = (specs, jax.ShapeDtypeStruct((b, max_len), np.int32), jax.ShapeDtypeStruct((b, max_exclude), np.int32),
                jax.ShapeDtypeStruct((b,), np.int32))
        exported = jax_export.export(fn, platforms=tuple(platforms))(*args)
        name = f"recommend_b{b}.stablehlo"
        (directory / name).write_bytes(exported.serialize())
        files[str(b)] = name
    signature = {
        "function": "recommend(tensors, histories, exclude, max_clusters) -> (scores, ids, exact)",
        "files": files,
        "batch_sizes": sorted(int(b) for b in files),
        "n": n,
        "max_len": max_len,
        "max_exclude": int(max_exclude),
        "num_tail_clusters": num_tail_clusters(model),
        "platforms": list(platforms),
        "inputs": {
            "tensors": f"{PARAMS_FILE} as stored (safetensors.numpy.load_file)",
            "histories": "int32 [B, max_len], internal ids (index in items.json), left-padded with 0",
            "exclude": "int32 [B, max_exclude], internal ids never to recommend, -1 for none",
            "max_clusters": "int32 [B], tail clusters a row may expand (num_tail_clusters: exact)",
        },
        "outputs": {"scores": "float32 [B, n] log-probabilities, best first (-inf: no item)",
                    "ids": "int32 [B, n] internal ids", "exact": "bool [B]"},
    }
    (directory / SIGNATURE_FILE).write_text(json.dumps(signature, indent=2) + "\n")
    return signature


def load_signature(directory: str | pathlib.Path) -> dict | None:
    """The artifact's stablehlo.json, or None when it was exported without StableHLO."""
    path = pathlib.Path(directory) / SIGNATURE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
