"""The rivals' training-speed bench: every method's own train step, timed in turn, ratios to CpRec's."""
import json

import jax
import numpy as np
import pytest

from cprec.bench import rivals

CONFIG = '''
from tests.helpers import tiny_config

def get_config(arg):
    kv = dict(x.split("=") for x in arg.split(",") if "=" in x)
    table = {{"cprec": dict(embedding="blockwise", softmax="tree", cutoffs=(20, 40)),
              "qr": dict(embedding="qr", tie_embeddings=True, output_projection=True, qr_buckets=9),
              "prune": dict(embedding="prune", tie_embeddings=True, output_projection=True, prune_sparsity=0.8),
              "nextitnet": dict(embedding="full")}}[kv["method"]]
    return tiny_config({cache!r}, **table)
'''


@pytest.fixture
def config(tmp_path):
    """A protocol config file of tiny models, one per method."""
    path = tmp_path / "protocol.py"
    path.write_text(CONFIG.format(cache=str(tmp_path / "cache")))
    return path


def test_the_bench_times_every_methods_train_step_and_writes_a_docs_table(config, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rivals, "RESULTS", tmp_path)
    res = rivals.main(["--config", f"{config}:tiny", "--methods", "cprec,qr,prune,nextitnet", "--repeats", "2",
                       "--out", str(tmp_path / "bench.json"), "--table", "speed"])
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["CpRec", "QR", "pruning", "NextItNet (uncompressed)"]
    assert rows["CpRec"]["output"] == "tree" and rows["QR"]["output"] == "full"
    assert rows["CpRec"]["vs_reference"] == 1.0
    tokens = res["batch"][0] * (res["batch"][1] - 1)
    assert res["batch"] == [16, 11]
    for r in rows.values():
        assert r["tokens_s"] == pytest.approx(tokens / (r["step_ms"] / 1e3))
        assert r["vs_reference"] == pytest.approx(rows["CpRec"]["step_ms"] / r["step_ms"])
    # a pruned table counts its non-zeros, as its budget does
    from cprec.model.builder import init_params, pruned_count
    dense = sum(x.size for x in jax.tree.leaves(init_params(rivals.build_model(
        rivals.load_config_file(f"{config}:method=prune"), np.ones(61)), 0)))
    assert rows["pruning"]["params"] == dense - pruned_count(61, 8, 0.8)
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == res["rows"]
    table = json.loads((tmp_path / "speed.json").read_text())
    assert [r["method"] for r in table["rows"]] == list(rows) and "interleaved" in table["title"]
    assert "x CpRec's speed" in capsys.readouterr().out


def test_variants_time_any_configs_with_overrides_relative_to_the_first(config, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rivals, "RESULTS", tmp_path)
    res = rivals.main(["--variant", f"full={config}:method=nextitnet",
                       "--variant", f"sampled 8={config}:method=nextitnet model.softmax=sampled model.num_negatives=8",
                       "--repeats", "2", "--out", str(tmp_path / "bench.json"), "--table", "softmax"])
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["full", "sampled 8"] and res["reference"] == "full"
    assert rows["full"]["output"] == "full" and rows["sampled 8"]["output"] == "sampled"
    assert rows["sampled 8"]["vs_reference"] == pytest.approx(rows["full"]["step_ms"] / rows["sampled 8"]["step_ms"])
    table = json.loads((tmp_path / "softmax.json").read_text())
    assert {c["key"]: c["label"] for c in table["columns"]}["vs_reference"] == "vs full"
    assert "x full's speed" in capsys.readouterr().out


@pytest.mark.parametrize("variant, message", [
    ("no-equals-sign", "is malformed"),
    ("x={config}:method=nextitnet model.num_negative=8", "unknown config key 'model.num_negative'"),
    ("x={config}:method=nextitnet model.num_negatives", "has no '='"),
    ("x={config}:method=nextitnet model.cutoffs=5,9", "cannot be set from text"),
])
def test_a_bad_variant_is_a_one_line_error(config, tmp_path, capsys, variant, message):
    with pytest.raises(SystemExit) as exit_:
        rivals.main(["--variant", variant.format(config=config), "--out", str(tmp_path / "bench.json")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
