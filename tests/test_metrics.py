import numpy as np
import pytest

from cprec.eval.metrics import popularity_ranks, rank_metrics


def test_rank_metrics_hand_computed():
    # ranks 0, 2, 7, 30 (0-based) for four users
    m = rank_metrics(np.array([0, 2, 7, 30]), ks=(5, 10))
    assert m["hr@5"] == pytest.approx(2 / 4)
    assert m["hr@10"] == pytest.approx(3 / 4)
    assert m["mrr@5"] == pytest.approx((1 + 1 / 3) / 4)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 8) / 4)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / np.log2(4)) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / np.log2(9)) / 4)


def test_popularity_ranks():
    counts = np.array([0, 10, 7, 7, 1])
    # item 1 -> rank 0; items 2 and 3 tie (optimistic) -> rank 1; item 4 -> rank 3
    np.testing.assert_array_equal(popularity_ranks(counts, np.array([1, 2, 3, 4])), [0, 1, 1, 3])


def test_rank_metrics_rejects_empty():
    with pytest.raises(ValueError):
        rank_metrics(np.array([]))
