"""The README's quick start, as written, in a fresh clone (fewer training steps; slow: minutes)."""
import json
import shutil
import socket
import subprocess

import pytest

from tests.test_package import ROOT, readme_block


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("curl"), reason="the quick start calls curl")
def test_the_quick_start_runs_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "cprec"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    train = readme_block("Install", "bash").splitlines()[1] + " --config.train.num_steps=20 --config.train.eval_every=20"
    port = str(free_port())
    steps = [line.replace("8080", port) for line in readme_block("Quick start", "bash").splitlines()
             if not line.startswith("tensorboard")]  # the viewer blocks; nothing to check in it
    script = "\n".join(["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null' EXIT", train, *steps[:-1],
                        steps[-1] + " > answer.json"])
    subprocess.run(["bash", "-c", script], cwd=clone, check=True, timeout=900)
    answer = json.loads((clone / "answer.json").read_text())
    assert len(answer["items"]) == 5 and len(answer["scores"]) == 5
