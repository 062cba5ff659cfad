"""Shared fixtures: a tiny synthetic experiment that trains in seconds on CPU."""
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test run, shared by the xdist workers and by the run.py and
# server subprocesses the tests start (they inherit the environment): most of the suite's time is
# XLA compiling the same tiny models again in other tests and processes.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # True in the process that makes it (not in workers)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"cprec-tests-jax-cache-{os.getpid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests' models are tiny: XLA's backend optimisations cost far more compile time than they save
# at run time (the suite takes about a third less wall time without them). Results are the same
# computation, so every parity test still holds; benchmarks never run under this setting.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402

from tests.helpers import tiny_config  # noqa: E402


@pytest.fixture
def tiny(tmp_path_factory):
    """A function making tiny configs that share one prepared-data cache."""
    cache = tmp_path_factory.getbasetemp() / "data-cache"
    return lambda **model: tiny_config(cache, **model)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:  # the run's own cache goes with it (a cache the caller set is theirs)
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
