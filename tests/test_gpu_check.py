"""The prepared GPU script (python -m cprec.bench.gpu_check), every step at a tiny size on the CPU."""
import json

import pytest

from cprec.bench import gpu_check


def test_the_full_run_names_every_check(tmp_path):
    names = [name for name, _, _ in gpu_check.steps(tmp_path, tiny=False)]
    assert names == ["tests", "train_bench", "full_1m", "sampled_1m"]
    assert sum(limit for _, _, limit in gpu_check.steps(tmp_path, tiny=False)) <= 600  # one 10-minute device call
    commands = {name: " ".join(cmd) for name, cmd, _ in gpu_check.steps(tmp_path, tiny=False)}
    assert "synthetic1m,softmax=full" in commands["full_1m"] and "--config.train.num_steps" not in commands["full_1m"]


@pytest.mark.slow  # about 4 minutes on 2 CPU cores
def test_every_step_passes_at_a_tiny_size(tmp_path):
    assert gpu_check.main([str(tmp_path), "--tiny"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert all(s["status"] == "passed" for s in steps.values()), steps
    assert steps["tests"]["numbers"]["passed"] >= 1
    assert steps["train_bench"]["numbers"]["rows"][0]["tokens_per_sec"] > 0
    for run in ("full_1m", "sampled_1m"):
        assert 0 <= steps[run]["numbers"]["test"]["hr@10"] <= 1
    assert "==== sampled_1m: passed" in (tmp_path / "gpu_check.log").read_text()
