"""Evaluation on a fixed subset of users (eval.num_users), and under the temporal split."""
import json
import re

import numpy as np
import pytest

from cprec.eval.evaluate import eval_users
from cprec.train import train_and_evaluate


def test_eval_users_is_a_fixed_sorted_subset():
    np.testing.assert_array_equal(eval_users(7, 0), np.arange(7))
    np.testing.assert_array_equal(eval_users(7, 7), np.arange(7))
    a = eval_users(1000, 50)
    np.testing.assert_array_equal(a, eval_users(1000, 50))
    assert len(np.unique(a)) == 50 and np.all(np.diff(a) > 0) and a[-1] < 1000
    assert not np.array_equal(a, np.arange(50))  # random, not the first users


def test_training_evaluates_the_subset(tiny, tmp_path, capsys):
    config = tiny()
    config.train.num_steps = 4
    config.eval.num_users = 20
    test = train_and_evaluate(config, tmp_path / "run")
    assert "evaluating a fixed subset of 20 of the 80 users" in capsys.readouterr().out
    # Every metric is a mean over 20 users, so HR@K is a multiple of 1/20.
    assert all(abs(test[f"hr@{k}"] * 20 - round(test[f"hr@{k}"] * 20)) < 1e-6 for k in (5, 10, 20))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["eval"]["num_users"] == 20
    # The popularity baseline is scored on the same 20 users.
    from cprec.data import load_dataset
    from cprec.eval.evaluate import eval_splits
    from cprec.eval.metrics import popularity_ranks, rank_metrics

    data = load_dataset(config.data, verbose=False)
    expected = rank_metrics(popularity_ranks(data.item_counts, eval_splits(data, 20)["test"][1]), (5, 10, 20))
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {k: logged[f"popularity/test_{k}"] for k in expected} == pytest.approx(expected)


def test_training_and_evaluation_under_the_temporal_split(tiny, tmp_path, capsys):
    from cprec.data import load_dataset
    from cprec.eval.evaluate import eval_splits

    config = tiny()
    config.data.split = "temporal"
    config.train.num_steps = 4
    config.eval.num_users = 3
    data = load_dataset(config.data, verbose=False)
    assert len(data.val_targets) != len(data.test_targets)  # each split scores the users with an event in it
    splits = eval_splits(data, 3, verbose=True)
    assert [len(y) for _, y in splits.values()] == [3, 3]
    assert re.search(r"evaluating a fixed subset of 3 of the \d+ val users, 3 of the \d+ test users", capsys.readouterr().out)
    test = train_and_evaluate(config, tmp_path / "run")
    assert all(abs(test[f"hr@{k}"] * 3 - round(test[f"hr@{k}"] * 3)) < 1e-6 for k in (5, 10, 20))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["split"] == "temporal"
