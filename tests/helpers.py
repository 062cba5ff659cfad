"""Helpers shared by several test modules (fixtures stay in conftest.py)."""
from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest

from cprec.config import base_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
# This development setup's datasets (MovieLens-100K as RecBole files), when present; tests pass without.
SHARED_DATA = ROOT.parent / "shared" / "data"


def tiny_config(cache_dir, **model):
    """A synthetic experiment (80 users, 60 items, d=8, two blocks) that trains 12 steps in seconds."""
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


def user_error(capsys: pytest.CaptureFixture, main: Callable, *args) -> str:
    """Runs a command-line ``main`` that must stop with a user error: exit status 2 and one
    ``error: ...`` line on stderr, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err
