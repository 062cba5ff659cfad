"""Dataset presets shared by the experiment configs: data settings and a training length that fits each."""
import ml_collections

from cprec.errors import ConfigError

# name -> (config.data overrides, (num_epochs, eval_every, checkpoint_every, log_every))
PRESETS = {
    # Small enough to train to a clear signal in about a minute on 2 CPU cores; keeps the whole
    # generated catalogue (no k-core).
    "synthetic": ({"name": "synthetic", "min_user_count": 0, "min_item_count": 0}, (10, 100, 100, 20)),
    "ml100k": ({"name": "ml-100k"}, (40, 50, 50, 10)),
    "ml1m": ({"name": "ml-1m"}, (20, 500, 500, 50)),
    "ml20m": ({"name": "ml-20m"}, (3, 5000, 2000, 100)),
    # 30,000-item long-tail catalogue: big enough that the item tables dominate the model, small
    # enough that the full-softmax baseline still trains on a CPU.
    "synthetic30k": ({"name": "synthetic", "num_items": 30_000, "num_users": 20_000, "mean_len": 40,
                      "num_topics": 300, "min_user_count": 0, "min_item_count": 0}, (4, 500, 500, 50)),
    # 1,000,000-item long-tail catalogue (CpRec's setting); needs the tree softmax to train fast.
    "synthetic1m": ({"name": "synthetic", "num_items": 1_000_000, "num_users": 200_000, "mean_len": 50,
                     "num_topics": 200, "min_user_count": 0, "min_item_count": 0}, (1, 2000, 1000, 50)),
}
DATASETS = tuple(PRESETS)


def apply_dataset(config: ml_collections.ConfigDict, name: str) -> None:
    """Sets config.data and the training schedule for the dataset preset `name`."""
    if name not in PRESETS:
        raise ConfigError(f"dataset {name!r} is unknown; valid choices: {', '.join(DATASETS)}")
    data, schedule = PRESETS[name]
    config.data.update(data)
    t = config.train
    t.num_epochs, t.eval_every, t.checkpoint_every, t.log_every = schedule
    if name == "synthetic1m":
        config.eval.batch_size = 32  # a [batch, 1M] score matrix per evaluation step
        config.eval.num_users = 10_000  # full ranking of all 200,000 users takes too long on a CPU
