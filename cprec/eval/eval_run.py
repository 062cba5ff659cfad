"""Scores a run's saved parameters on its validation and test users, without training.

    python -m cprec.eval runs/nextitnet-1m --source checkpoints        # latest training checkpoint
    python -m cprec.eval runs/cprec-1m                                 # best-validation parameters
    python -m cprec.eval runs/nextitnet-1m --source checkpoints --step 400 --splits test

For runs that are still training (or were stopped early): the metrics of any kept checkpoint,
computed exactly as training computes them (same users, full ranking, same batch size). The
run's own files are only read; the metrics are printed and saved to
`<workdir>/evaluations/<source>-<step>.json` (or `--out`).
"""
from __future__ import annotations

import argparse
import pathlib
import time

from cprec.errors import exit_on_user_error
from cprec.eval.evaluate import eval_splits, evaluate_split, make_rank_fn
from cprec.jsonfile import write_json
from cprec.runtime.parallel import DataParallel
from cprec.eval.pretrained import SOURCES, load_run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", help="a run directory written by run.py")
    p.add_argument("--source", choices=SOURCES, default=None,
                   help="best-validation parameters or the training checkpoints (default: best, else checkpoints)")
    p.add_argument("--step", type=int, default=None, help="a kept step of that source (default: its latest)")
    p.add_argument("--splits", nargs="+", choices=("val", "test"), default=["val", "test"])
    p.add_argument("--out", default=None, help="JSON path (default <workdir>/evaluations/<source>-<step>.json)")
    return p


def evaluate_run(workdir: str, source: str | None = None, step: int | None = None,
                 splits: tuple[str, ...] = ("val", "test")) -> dict:
    """{'source', 'step', '<split>': {metric: value}, ...} for one saved set of parameters."""
    run = load_run(workdir, source=source, step=step)
    parallel = DataParallel()
    e = run.config.eval
    parallel.check_divides("eval.batch_size", e.batch_size)
    data = eval_splits(run.data, e.num_users)
    rank_fn = make_rank_fn(run.model)
    params = parallel.replicate(run.params)
    result: dict = {"workdir": str(workdir), "source": run.source, "step": run.step}
    for split in splits:
        inputs, targets = data[split]
        t0 = time.perf_counter()
        result[split] = evaluate_split(rank_fn, params, inputs, targets, e.batch_size, tuple(e.ks),
                                       parallel.shard, parallel.gather, split=split, step=run.step)
        print(f"{split} ({len(targets):,} users, {run.source} step {run.step}, {time.perf_counter() - t0:.0f} s): "
              + ", ".join(f"{k} {v:.4f}" for k, v in result[split].items()), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    with exit_on_user_error():
        result = evaluate_run(args.workdir, args.source, args.step, tuple(args.splits))
    out = pathlib.Path(args.out) if args.out else (
        pathlib.Path(args.workdir) / "evaluations" / f"{result['source']}-{result['step']}.json")
    print(f"saved {write_json(out, result)}")
    return result


if __name__ == "__main__":
    main()
