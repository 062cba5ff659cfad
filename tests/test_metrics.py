import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.errors import EvaluationError
from cprec.eval.evaluate import eval_ranks, evaluate_split
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


def test_popularity_ranks_count_ties_against_the_target():
    counts = np.array([0, 10, 7, 7, 1])
    # item 1 -> rank 0; items 2 and 3 tie: each has the other above it -> rank 2; item 4 -> rank 3
    np.testing.assert_array_equal(popularity_ranks(counts, np.array([1, 2, 3, 4])), [0, 2, 2, 3])
    flat = np.array([0, 5, 5, 5, 5])  # every item tied: every target ranks last
    np.testing.assert_array_equal(popularity_ranks(flat, np.array([1, 3, 4])), [3, 3, 3])


def test_eval_ranks_exclude_padding_and_count_ties_against_the_target():
    lp = jnp.array([[5.0, 1.0, 3.0, 3.0, 0.0], [9.0, 4.0, 3.0, 2.0, 1.0], [0.0, 2.0, jnp.nan, 1.0, 0.0]])
    ranks, finite = eval_ranks(lp, jnp.array([3, 4, 1]))
    # row 0: padding (id 0) has the top score but never counts; item 2 ties with the target and ranks above it
    np.testing.assert_array_equal(ranks[:2], [1, 3])
    np.testing.assert_array_equal(finite, [True, True, False])


def _constant_model(value: float, num_items: int):
    """A rank function of a model that gives every item the same score ``value``."""
    return lambda params: jax.jit(lambda x, y: eval_ranks(jnp.full((x.shape[0], num_items), value), y))


def test_a_model_with_constant_scores_gets_nothing():
    # The old rule (only strictly higher scores rank above) gave this model HR@10 = MRR = 1.
    targets = np.random.default_rng(0).integers(1, 50, size=70).astype(np.int32)
    inputs = np.zeros((70, 4), np.int32)
    m = evaluate_split(_constant_model(-3.9, 50), None, inputs, targets, 32, (10,))
    assert m["hr@10"] == 0 and m["mrr@10"] == 0 and m["ndcg@10"] == 0


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_model_with_non_finite_scores_is_refused(value):
    targets = np.ones(70, np.int32)
    inputs = np.zeros((70, 4), np.int32)
    with pytest.raises(EvaluationError, match=r"^70 of 70 rows of the test split have NaN or infinite scores "
                                              r"\(parameters of step 120\); no metrics written"):
        evaluate_split(_constant_model(value, 50), None, inputs, targets, 32, (10,), split="test", step=120)


def test_one_non_finite_row_is_counted_and_refused():
    def ranks(x, y):  # the row whose input starts with 7 scores NaN everywhere
        scores = jnp.where(x[:, :1] == 7, jnp.nan, jnp.arange(50.0)[None, :])
        return eval_ranks(scores, y)

    inputs = np.zeros((40, 4), np.int32)
    inputs[33, 0] = 7  # in the last, padded batch
    with pytest.raises(EvaluationError, match=r"^1 of 40 rows of the val split"):
        evaluate_split(lambda params: jax.jit(ranks), None, inputs, np.ones(40, np.int32), 32, (10,), split="val", step=3)


def test_rank_metrics_rejects_empty():
    with pytest.raises(ValueError):
        rank_metrics(np.array([]))
