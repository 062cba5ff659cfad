"""Shared fixtures: a tiny synthetic experiment that trains in seconds on CPU."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests.helpers import tiny_config  # noqa: E402


@pytest.fixture
def tiny(tmp_path_factory):
    """A function making tiny configs that share one prepared-data cache."""
    cache = tmp_path_factory.getbasetemp() / "data-cache"
    return lambda **model: tiny_config(cache, **model)
