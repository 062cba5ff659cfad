"""A trained model back from its run directory, for serving, analysis and benchmarks.

    run = load_run("runs/cprec-1m")
    scores, ids, expanded = run.model.apply({"params": run.params}, inputs, 20, method="top_k")

The run's `config.json` rebuilds the config, its prepared data (the cache is reused) gives the
item counts the model's clusters depend on, and the parameters come from the best-validation
checkpoint (`best/`), or else the latest training checkpoint.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, NamedTuple

import jax
import ml_collections

from cprec.runtime.checkpointing import Checkpointer
from cprec.config import with_defaults
from cprec.data import SequenceDataset, load_dataset
from cprec.errors import WorkdirError
from cprec.model.builder import build_model, init_params
from cprec.model.sequential import SequentialRecommender


class Run(NamedTuple):
    config: ml_collections.ConfigDict
    data: SequenceDataset
    model: SequentialRecommender
    params: Any
    step: int  # the training step the parameters are from
    source: str  # 'best' or 'checkpoints'


def run_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a run was started with (its `config.json`, minus the compression report)."""
    path = pathlib.Path(workdir) / "config.json"
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkdirError(f"{path} does not exist; give the --workdir of a run that started training") from None
    except (OSError, json.JSONDecodeError) as e:
        raise WorkdirError(f"{path} is unreadable ({type(e).__name__}); give the workdir of an intact run") from None
    stored.pop("report", None)
    choice = stored.pop("budget", None)
    if choice is not None and "options" in choice:  # a rival table's size, as the solver chose it
        stored["model"].update(choice["options"])
    elif choice is not None:  # the budget solver's recorded choice (V last), so a later solver cannot change the model
        stored["model"]["cutoffs"], stored["model"]["ranks"] = tuple(choice["cutoffs"][:-1]), tuple(choice["ranks"])
    return ml_collections.ConfigDict(with_defaults(stored))


SOURCES = ("best", "checkpoints")  # best-validation parameters; the latest training checkpoints


def find_checkpoint(workdir: str | pathlib.Path, source: str | None = None, step: int | None = None) -> tuple[str, int]:
    """(subdir, step) of the parameters ``load_run`` reads: ``source`` ('best' or 'checkpoints';
    default best, else checkpoints) and a kept ``step`` of it (default its latest).

    Needs no data and builds no model, so a caller can refuse a run before preparing anything.
    """
    workdir = pathlib.Path(workdir)
    if source is not None and source not in SOURCES:
        raise WorkdirError(f"checkpoint source {source!r} is unknown; valid choices: {', '.join(SOURCES)}")
    for subdir in (source,) if source else SOURCES:
        if not (workdir / subdir).is_dir():
            continue
        ckpt = Checkpointer(workdir, None, subdir=subdir, read_only=True)
        try:
            steps = ckpt.all_steps()
        finally:
            ckpt.close()
        if not steps:
            continue
        if step is not None and step not in steps:
            raise WorkdirError(f"{workdir / subdir} has no step {step}; its kept steps are "
                               f"{', '.join(map(str, steps))}")
        return subdir, steps[-1] if step is None else step
    where = f"{source}/" if source else "best/ or checkpoints/"
    raise WorkdirError(f"{workdir} has no checkpoint ({where}); train it first with run.py")


def load_run(workdir: str | pathlib.Path, verbose: bool = False, source: str | None = None,
             step: int | None = None) -> Run:
    """Config, data, model and parameters of the run in `workdir`.

    By default the best-validation parameters, else the latest training checkpoint's. `source`
    ('best' or 'checkpoints') picks one of the two; `step` a kept step of it (default its latest),
    e.g. to score a run that is still training.
    """
    workdir = pathlib.Path(workdir)
    config = run_config(workdir)
    subdir, chosen = find_checkpoint(workdir, source, step)  # before the data: a wrong step costs nothing
    data = load_dataset(config.data, verbose=verbose)
    model = build_model(config, data.item_counts)
    ckpt = Checkpointer(workdir, None, subdir=subdir, read_only=True)
    try:  # the parameters alone (of a best/ or a training checkpoint): no optimizer slots
        restored = ckpt.restore(chosen, {"params": init_params(model, config.seed)}, partial=True)
    finally:
        ckpt.close()
    return Run(config, data, model, jax.device_get(restored["params"]), int(chosen), subdir)
