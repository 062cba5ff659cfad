"""The package's dependencies run one way: the model imports nothing from training, evaluation,
devices or data loading, so that a server can load a model without the training stack."""
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# Modules the model package must never pull in (prefixes of sys.modules keys).
NOT_IN_THE_MODEL = ("cprec.train", "cprec.eval", "cprec.data", "cprec.runtime", "cprec.sweep", "cprec.config",
                    "cprec.bench", "optax", "orbax", "tensorboardX", "submitit")


def _imported_by(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["cprec", "cprec.model"])
def test_the_model_imports_nothing_from_training(module):
    loaded = _imported_by(module)
    assert "cprec.model.nextitnet" in loaded and "cprec.model.tree_softmax" in loaded
    leaked = sorted(m for m in loaded if m.startswith(NOT_IN_THE_MODEL))
    assert not leaked, f"importing {module} loads {leaked}"


def test_serving_imports_only_the_model():
    loaded = _imported_by("cprec.serve")
    assert "cprec.serve.recommender" in loaded and "cprec.serve.incremental" in loaded
    leaked = sorted(m for m in loaded if m.startswith(NOT_IN_THE_MODEL))
    assert not leaked, f"importing cprec.serve loads {leaked}"


def test_evaluation_imports_nothing_from_training():
    loaded = _imported_by("cprec.eval.pretrained")
    assert not sorted(m for m in loaded if m.startswith(("cprec.train", "cprec.sweep", "optax")))


def test_public_layers_still_import_from_the_top():
    from cprec import BlockwiseEmbedding, BlockwiseSoftmax, FullSoftmax, NextItNet
    from cprec.model import OutputLayer

    assert {BlockwiseEmbedding.__module__, NextItNet.__module__} <= {"cprec.model.tables.blockwise", "cprec.model.nextitnet"}
    assert BlockwiseSoftmax.__module__ == "cprec.model.tree_softmax" and FullSoftmax.__module__ == "cprec.model.full_softmax"
    assert OutputLayer.__module__ == "cprec.model.output"
