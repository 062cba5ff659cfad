"""Dataset presets shared by the experiment configs: data settings and a training length that fits each."""
import ml_collections

from cprec.errors import ConfigError

DATASETS = ("synthetic", "ml100k", "ml1m", "ml20m", "synthetic1m")


def apply_dataset(config: ml_collections.ConfigDict, name: str) -> None:
    """Sets config.data and the training schedule for the dataset preset `name`."""
    d, t = config.data, config.train
    if name == "synthetic":
        # Small enough to train to a clear signal in under 3 minutes on 2 CPU cores.
        d.name = "synthetic"
        d.min_user_count = d.min_item_count = 0  # keep the whole generated catalogue
        t.num_epochs, t.eval_every, t.checkpoint_every, t.log_every = 10, 100, 100, 20
    elif name == "ml100k":
        d.name = "ml-100k"
        t.num_epochs, t.eval_every, t.checkpoint_every, t.log_every = 40, 50, 50, 10
    elif name == "ml1m":
        d.name = "ml-1m"
        t.num_epochs, t.eval_every, t.checkpoint_every, t.log_every = 20, 500, 500, 50
    elif name == "ml20m":
        d.name = "ml-20m"
        t.num_epochs, t.eval_every, t.checkpoint_every, t.log_every = 3, 5000, 2000, 100
    elif name == "synthetic1m":
        # 1,000,000-item long-tail catalogue (CpRec's setting); needs the tree softmax to train fast.
        d.name = "synthetic"
        d.num_items, d.num_users, d.mean_len = 1_000_000, 200_000, 50
        d.num_topics, d.min_user_count, d.min_item_count = 200, 0, 0
        t.num_epochs, t.eval_every, t.checkpoint_every, t.log_every = 1, 2000, 1000, 50
        config.eval.batch_size = 32
    else:
        raise ConfigError(f"dataset {name!r} is unknown; valid choices: {', '.join(DATASETS)}")
