"""Synthetic generator: determinism, long tail, learnable transitions; one slow scale run."""

import time

import numpy as np
import pytest

from cprec.data import generate_synthetic, load_dataset
from cprec.data.dataset import default_data_config
from cprec.errors import ConfigError

SMALL = dict(num_users=500, num_items=2000, mean_len=30, num_topics=20, zipf_a=1.1, follow_prob=0.6)


def test_same_seed_same_data_other_seed_differs():
    a, b, c = (generate_synthetic(**SMALL, seed=s) for s in (3, 3, 4))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a[1].shape != c[1].shape or not np.array_equal(a[1], c[1])


def test_shapes_and_grouping():
    users, items, times = generate_synthetic(**SMALL, seed=0)
    assert users.dtype == items.dtype == times.dtype == np.int64
    assert np.all(np.diff(users) >= 0) and items.min() >= 0 and items.max() < SMALL["num_items"]
    lengths = np.bincount(users)
    assert lengths.size == SMALL["num_users"] and lengths.min() >= 5
    assert 0.8 * SMALL["mean_len"] < lengths.mean() < 1.2 * SMALL["mean_len"]
    same_user = users[1:] == users[:-1]
    assert np.all(np.diff(times)[same_user] > 0)


def test_popularity_is_long_tailed():
    _, items, _ = generate_synthetic(**SMALL, seed=0)
    counts = np.sort(np.bincount(items, minlength=SMALL["num_items"]))[::-1]
    top = counts[: SMALL["num_items"] // 10].sum() / counts.sum()
    assert top > 0.5  # the top 10% of items take most events
    assert counts[0] > 20 * max(1, np.median(counts))


def test_next_item_is_mostly_predictable_from_current():
    users, items, _ = generate_synthetic(**SMALL, seed=0)
    same = users[1:] == users[:-1]
    cur, nxt = items[:-1][same], items[1:][same]
    pairs = cur * SMALL["num_items"] + nxt
    keys, counts = np.unique(pairs, return_counts=True)
    best = np.zeros(SMALL["num_items"], np.int64)
    np.maximum.at(best, keys // SMALL["num_items"], counts)
    # With follow_prob=0.6 the fixed successor is the most common next item of most items.
    assert best.sum() / cur.size > 0.55
    _, items0, _ = generate_synthetic(**{**SMALL, "follow_prob": 0.0}, seed=0)
    assert not np.array_equal(items0, items)


def test_invalid_parameters():
    with pytest.raises(ConfigError, match="num_topics <= num_items"):
        generate_synthetic(num_users=5, num_items=3, num_topics=10)
    with pytest.raises(ConfigError, match="follow_prob"):
        generate_synthetic(follow_prob=1.5)


@pytest.mark.slow
def test_million_items_ten_million_events(tmp_path):
    """Scale check (run with `pytest -m slow -s`); prints the timing, asserts no time."""
    cfg = default_data_config()
    cfg.update(dict(name="synthetic", num_users=250_000, num_items=1_000_000, mean_len=40, num_topics=200))
    cfg.min_item_count = 0
    start = time.perf_counter()
    data = load_dataset(cfg, cache_root=tmp_path)
    elapsed = time.perf_counter() - start
    print(f"synthetic 1M items / {data.meta['num_events']:,} events: generate+prepare+save {elapsed:.1f}s")
    assert data.num_items == 1_000_001 and data.meta["num_events"] > 9_500_000
    assert np.all(np.diff(np.asarray(data.item_counts[1:])) <= 0)
    start = time.perf_counter()
    load_dataset(cfg, cache_root=tmp_path)
    print(f"reload from cache {time.perf_counter() - start:.2f}s")
