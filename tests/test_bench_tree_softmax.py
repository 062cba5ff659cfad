"""The tree-softmax benchmark's defaults part (c), at a size that runs in seconds."""
import json

import pytest

from cprec.bench.tree_softmax import main


@pytest.mark.slow  # about 35 s; the layer's default paths are checked against references in test_tree_softmax.py
def test_defaults_part_compares_the_plain_layer_with_the_tuned_one(tmp_path, capsys):
    out = tmp_path / "defaults.json"
    main(["--items", "3000", "--dim", "32", "--tokens", "256", "--repeats", "1", "--topk-batches", "1", "16", "--time-budget", "0",
          "--defaults-only", "--defaults-cutoffs", "300,1200", "--out", str(out)])
    res = json.loads(out.read_text())
    dft = res["defaults"]
    assert res["training"] is None and res["topk"] is None
    assert dft["cutoffs"] == [300, 1200, 3000] and dft["ranks"] == [32, 8, 2]
    for name in ("default", "tuned"):
        assert dft["training"][name]["tokens_per_s"] > 0
    # Every setting at both batches, and the default layer's top-k equals the tuned one's.
    assert len(dft["topk"]) == 4 * 2
    assert all(row["identical"] for row in dft["topk"])
    assert "(c) BlockwiseSoftmax(32, 3,000" in capsys.readouterr().out
