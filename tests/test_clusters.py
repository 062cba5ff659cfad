import numpy as np
import pytest

from cprec.model.clusters import (check_clusters, check_frequency_order, cluster_token_capacities,
                            resolve_cutoffs, resolve_ranks)
from cprec.errors import ConfigError, DataError


def _raises(exc, fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert match in msg, msg
    assert "\n" not in msg, "messages are shown as one line"
    return msg


def test_resolve_cutoffs_absolute_and_fractions():
    assert resolve_cutoffs([20, 60], 100) == (20, 60, 100)
    assert resolve_cutoffs((0.05, 0.2), 1000) == (50, 200, 1000)
    assert resolve_cutoffs([], 100) == (100,)
    assert resolve_cutoffs([20.0, 60.0], 100) == (20, 60, 100)  # integral floats from configs


@pytest.mark.parametrize("spec, match", [
    ([60, 20], "strictly increasing"),
    ([20, 20], "strictly increasing"),
    ([0, 20], "> 0"),
    ([-5, 20], "> 0"),
    ([20, 100], "V = 100"),
    ([20, 150], "V = 100"),
    ([0.5, 1.5], "(0, 1)"),
    ([0.1, 50], "mixes"),
    ([0.001, 0.002], "> 0"),  # rounds to id 0
    ([0.101, 0.104], "strictly increasing"),  # both round to id 10
    ("20,60", "model.cutoffs"),
])
def test_resolve_cutoffs_errors(spec, match):
    msg = _raises(ConfigError, resolve_cutoffs, spec, 100, match=match)
    assert "model.cutoffs" in msg


def test_vocabulary_smaller_than_cutoffs_names_v():
    msg = _raises(ConfigError, resolve_cutoffs, [2000, 10000], 5000, match="V = 5000")
    assert "model.cutoffs" in msg


def test_require_tail():
    _raises(ConfigError, resolve_cutoffs, [], 100, require_tail=True, match="model.cutoffs")
    assert resolve_cutoffs([10], 100, require_tail=True) == (10, 100)


def test_resolve_ranks_decay_and_explicit():
    assert resolve_ranks(4, 256, 6) == (256, 64, 16, 4, 1, 1)
    assert resolve_ranks(2.0, 64, 3) == (64, 32, 16)
    assert resolve_ranks(1, 8, 3) == (8, 8, 8)
    assert resolve_ranks([64, 16, 16], 64, 3) == (64, 16, 16)


@pytest.mark.parametrize("spec, key, match", [
    ([64, 16], "model.ranks", "one rank per cluster"),
    ([64, 16, 4, 1], "model.ranks", "one rank per cluster"),
    ([64, 0, 4], "model.ranks", "[1, dim=64]"),
    ([64, 65, 4], "model.ranks", "[1, dim=64]"),
    ([32, 16, 4], "model.ranks", "must equal dim=64"),
    ([64, 2.5, 4], "model.ranks", "[1, dim=64]"),
    (0.5, "model.rank_decay", ">= 1"),
    (float("inf"), "model.rank_decay", ">= 1"),
    ("4", "model.ranks", "[1, 64]"),
])
def test_resolve_ranks_errors(spec, key, match):
    msg = _raises(ConfigError, resolve_ranks, spec, 64, 3, match=match)
    assert key in msg


def test_check_clusters_resolved():
    check_clusters(100, 16, (10, 50, 100), (16, 4, 1), require_tail=True)
    _raises(ConfigError, check_clusters, 100, 16, (10, 50, 90), (16, 4, 1), match="model.cutoffs")
    _raises(ConfigError, check_clusters, 100, 16, (100,), (16,), require_tail=True, match="model.cutoffs")
    _raises(ConfigError, check_clusters, 100, 16, (10, 100), (16, 4, 1), match="model.ranks")


def test_check_frequency_order():
    check_frequency_order([0, 9, 5, 5, 1])  # padding count is ignored
    check_frequency_order(np.array([3, 3, 3]))
    msg = _raises(DataError, check_frequency_order, [0, 9, 5, 7, 1], match="not frequency-ordered")
    assert "cprec.data" in msg and "id 3" in msg


def test_cluster_token_capacities():
    counts = np.array([0] + [10] * 10 + [1] * 90, dtype=np.int64)  # V = 101, 190 target tokens
    caps = cluster_token_capacities(counts, (11, 51, 101), tokens_per_batch=1000, margin=1.5)
    # shares 40/190 and 50/190 -> 315.8 and 394.7 tokens -> rounded up to multiples of 8
    assert caps == (320, 400)
    assert all(c % 8 == 0 for c in caps)
    assert cluster_token_capacities(counts, (11, 51, 101), tokens_per_batch=100, margin=5.0) == (100, 100)
    assert cluster_token_capacities(counts, (2, 101), tokens_per_batch=64, margin=1.0) == (64,)
    _raises(ConfigError, cluster_token_capacities, counts, (11, 51, 100), 100, 1.5, match="V=100")
