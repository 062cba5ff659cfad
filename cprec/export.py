"""Export a trained run as a serving artifact (see cprec/serve/artifact.py for the layout).

    python -m cprec.export runs/cprec-1m exports/cprec-1m --dtype int8

The artifact holds the model's parameters (safetensors: float32, bfloat16, or int8 row-wise item
tables), its constructor kwargs and L, the data file's item id of every internal id, the item
counts, the recommend function as StableHLO (`jax.export`, one file per batch size of
--stablehlo-batch-sizes; callable with jax alone, see cprec/serve/stablehlo.py), and a manifest
(source run, checkpoint, test metrics, sizes). A server needs nothing else:
no optimizer state, no prepared data, no pickle. Parameters come from best/ (best validation)
unless --source/--step pick another kept checkpoint.

The run's prepared data supplies the item ids and counts. If it is gone, the export stops and
prints the `python data/prepare.py` command that prepares it again: it never re-reads a raw data
file itself. Synthetic data is the exception: it regenerates deterministically in seconds, so a
synthetic run's data is prepared again on the fly.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from cprec.data import store
from cprec.data.dataset import cache_directory, item_raw_ids, prepare_command
from cprec.errors import DataError, WorkdirError, exit_on_user_error
from cprec.eval.pretrained import SOURCES, find_checkpoint, load_run, run_config
from cprec.serve.artifact import DTYPES, check_out_dir, model_kwargs_of, save_artifact
from cprec.serve.recommender import MAX_EXCLUDE
from cprec.serve.stablehlo import BATCH_SIZES, export_recommend


def _check_prepared_data(run_dir: pathlib.Path, data_cfg, log) -> None:
    """Refuses a run whose prepared data is gone, unless it is synthetic (cheap and deterministic)."""
    directory = cache_directory(data_cfg)
    if store.is_complete(directory):
        return
    if data_cfg.name == "synthetic":
        log(f"[data] the run's synthetic data is not prepared; generating it again (deterministic) into {directory}")
        return
    raise DataError(
        f"the prepared data of {run_dir} is gone (no cache {directory}); prepare it again with "
        f"`{prepare_command(data_cfg)}` and export again (the export does not re-read raw data files)"
    )


def directory_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _results(run_dir: pathlib.Path) -> dict:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def _test_metrics(results: dict, source: str, step: int) -> dict:
    """``metrics``: the run's test metrics when they belong to the exported parameters, else None
    with ``metrics_note`` saying whose they are and how to score these."""
    # results.json before test_params existed: its metrics were those of best/ (the usual export).
    tested = results.get("test_params", {"source": "best", "step": step if source == "best" else None})
    if "test" not in results:
        return {"metrics": None, "metrics_note": "the run has no test metrics (results.json): it has not finished"}
    if tested.get("step") == step:  # best/ and checkpoints/ of one step hold the same parameters
        return {"metrics": results["test"], "metrics_of": tested}
    return {"metrics": None, "metrics_note": (
        f"the run's test metrics belong to {tested.get('source')}/ step {tested.get('step')}, not to the exported "
        f"{source}/ step {step}; score these with python -m cprec.eval RUN --source {source} --step {step}")}


def export(run_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *, dtype: str = "float32",
           source: str | None = None, step: int | None = None, force: bool = False,
           stablehlo_batch_sizes: tuple[int, ...] | None = BATCH_SIZES, max_exclude: int = MAX_EXCLUDE,
           log=print) -> pathlib.Path:
    """Writes the artifact of the run in `run_dir` into `out_dir`; returns `out_dir`.

    `stablehlo_batch_sizes`: the batch sizes of the `jax.export` recommend functions written into
    the artifact (cprec/serve/stablehlo.py); None or () writes none. `max_exclude`: E, how many of a
    history's most recent distinct items `exclude_seen` excludes, in the library, the server and the
    StableHLO functions alike (recorded in the manifest).

    Every problem the user can fix is a CprecError raised before anything is written (a synthetic
    run's data may have been generated again by then; nothing else).
    """
    run_dir = pathlib.Path(run_dir)
    out_dir = check_out_dir(out_dir, force)
    config = run_config(run_dir)
    find_checkpoint(run_dir, source, step)  # a missing checkpoint or step is refused before any data is prepared
    _check_prepared_data(run_dir, config.data, log)
    run = load_run(run_dir, source=source, step=step)
    item_ids = item_raw_ids(run.data)
    results = _results(run_dir)
    manifest = {
        "source_run": str(run_dir.resolve()),
        "source": run.source,
        "step": run.step,
        **_test_metrics(results, run.source, run.step),
        "report": results.get("report"),
        "data": {"name": config.data.name, "num_items": run.data.num_items},
        "max_exclude": int(max_exclude),
    }
    return save_artifact(out_dir, model_kwargs=model_kwargs_of(run.model), max_len=int(config.data.max_len),
                         params=run.params, item_ids=item_ids, item_counts=np.asarray(run.data.item_counts),
                         dtype=dtype, manifest=manifest, force=force,
                         extra=(lambda d, a: export_recommend(d, a, stablehlo_batch_sizes, max_exclude=max_exclude))
                         if stablehlo_batch_sizes else None)


def summary(out_dir: pathlib.Path, run_dir: pathlib.Path) -> str:
    """What was written: dtype, bytes per file, total, and the size against the latest training checkpoint."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    total = manifest["total_bytes"]
    lines = [f"wrote {out_dir} ({manifest['dtype']}, {manifest['param_count']:,} parameters, "
             f"{manifest['source']}/ step {manifest['step']})"]
    width = max(len(name) for name in manifest["files"])
    lines += [f"  {name:<{width}}  {size:>14,} bytes" for name, size in manifest["files"].items()]
    lines.append(f"  {'total':<{width}}  {total:>14,} bytes")
    try:
        _, latest = find_checkpoint(run_dir, "checkpoints")
    except WorkdirError:  # a run keeping only best/: nothing to compare with
        latest = None
    if latest is not None:
        ckpt = run_dir / "checkpoints" / str(latest)
        size = directory_bytes(ckpt)
        lines.append(f"latest training checkpoint {ckpt} (parameters + Adam moments): {size:,} bytes; "
                     f"the artifact is {size / max(total, 1):.2f}x smaller")
    return "\n".join(lines)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _batch_sizes(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive batch sizes (or 'none')")
    return sizes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cprec.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the --workdir of a trained run")
    p.add_argument("out_dir", help="the artifact directory to write (must be absent or empty unless --force)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="float32 (exact), bfloat16 (all parameters), int8 (row-wise uint8 item tables, the rest "
                        "float32); default float32")
    p.add_argument("--source", choices=SOURCES, default=None,
                   help="best (best validation) or checkpoints (latest training); default best, else checkpoints")
    p.add_argument("--step", type=int, default=None, help="a kept step of the source (default its latest)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR (once the new one is complete)")
    p.add_argument("--max-exclude", type=_positive, default=MAX_EXCLUDE, metavar="E",
                   help="how many of a history's most recent distinct items exclude_seen excludes when serving "
                        f"(default {MAX_EXCLUDE})")
    p.add_argument("--stablehlo-batch-sizes", type=_batch_sizes, default=BATCH_SIZES, metavar="B,B,...",
                   help="batch sizes of the jax.export (StableHLO) recommend functions, one file each; "
                        f"'none' writes none (default {','.join(map(str, BATCH_SIZES))})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with exit_on_user_error():
        out = export(args.run_dir, args.out_dir, dtype=args.dtype, source=args.source, step=args.step,
                     force=args.force, stablehlo_batch_sizes=args.stablehlo_batch_sizes, max_exclude=args.max_exclude)
    print(summary(out, pathlib.Path(args.run_dir)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
