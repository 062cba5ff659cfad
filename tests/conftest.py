"""Shared fixtures: a tiny synthetic experiment that trains in seconds on CPU."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from cprec.config import base_config  # noqa: E402


def tiny_config(cache_dir, **model):
    c = base_config()
    d = c.data
    d.name, d.cache_dir = "synthetic", str(cache_dir)
    d.num_users, d.num_items, d.mean_len, d.num_topics, d.max_len = 80, 60, 14, 6, 10
    d.min_user_count = d.min_item_count = 0
    c.model.dim, c.model.dilations, c.model.num_blocks = 8, (1, 2), 1
    for key, value in model.items():
        c.model[key] = value
    c.train.batch_size, c.train.num_steps = 16, 12
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 4, 6, 4
    c.eval.batch_size = 32
    c.eval.topk_batches = (1, 4)
    return c


@pytest.fixture
def tiny(tmp_path_factory):
    """A function making tiny configs that share one prepared-data cache."""
    cache = tmp_path_factory.getbasetemp() / "data-cache"
    return lambda **model: tiny_config(cache, **model)
