"""Dataset presets shared by the experiment configs: data settings and a training length that fits each."""
from typing import NamedTuple

import ml_collections

from cprec.errors import ConfigError


class Schedule(NamedTuple):
    """How long a preset trains, and how often it logs, validates and checkpoints (in steps)."""

    num_epochs: int
    eval_every: int
    checkpoint_every: int
    log_every: int
    eval_batch_size: int | None = None  # None = the base config's
    eval_num_users: int | None = None  # None = every user


class Preset(NamedTuple):
    data: dict  # config.data overrides
    schedule: Schedule


_SYNTHETIC_FULL = {"name": "synthetic", "min_user_count": 0, "min_item_count": 0}  # keep the whole catalogue

PRESETS = {
    # Small enough to train to a clear signal in about a minute on 2 CPU cores.
    "synthetic": Preset(_SYNTHETIC_FULL, Schedule(num_epochs=10, eval_every=100, checkpoint_every=100, log_every=20)),
    "ml100k": Preset({"name": "ml-100k"}, Schedule(num_epochs=40, eval_every=50, checkpoint_every=50, log_every=10)),
    "ml1m": Preset({"name": "ml-1m"}, Schedule(num_epochs=20, eval_every=500, checkpoint_every=500, log_every=50)),
    "ml20m": Preset({"name": "ml-20m"}, Schedule(num_epochs=3, eval_every=5000, checkpoint_every=2000, log_every=100)),
    # 30,000-item long-tail catalogue: big enough that the item tables dominate the model, small
    # enough that the full-softmax baseline still trains on a CPU.
    "synthetic30k": Preset({**_SYNTHETIC_FULL, "num_items": 30_000, "num_users": 20_000, "mean_len": 40, "num_topics": 300},
                           Schedule(num_epochs=4, eval_every=500, checkpoint_every=500, log_every=50)),
    # 1,000,000-item long-tail catalogue (CpRec's setting); needs the tree softmax to train fast.
    # Evaluation: a [batch, 1M] score matrix per step, and a fixed 10,000 of the 200,000 users,
    # since full ranking of every user takes too long on a CPU.
    "synthetic1m": Preset({**_SYNTHETIC_FULL, "num_items": 1_000_000, "num_users": 200_000, "mean_len": 50,
                           "num_topics": 200},
                          Schedule(num_epochs=1, eval_every=2000, checkpoint_every=1000, log_every=50,
                                   eval_batch_size=32, eval_num_users=10_000)),
}
DATASETS = tuple(PRESETS)


def apply_dataset(config: ml_collections.ConfigDict, name: str) -> None:
    """Sets config.data and the training schedule for the dataset preset `name`."""
    if name not in PRESETS:
        raise ConfigError(f"dataset {name!r} is unknown; valid choices: {', '.join(DATASETS)}")
    preset = PRESETS[name]
    config.data.update(preset.data)
    s, t = preset.schedule, config.train
    t.num_epochs, t.eval_every, t.checkpoint_every, t.log_every = s.num_epochs, s.eval_every, s.checkpoint_every, s.log_every
    if s.eval_batch_size is not None:
        config.eval.batch_size = s.eval_batch_size
    if s.eval_num_users is not None:
        config.eval.num_users = s.eval_num_users

