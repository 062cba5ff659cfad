"""The docs tables are what their result files render; the report tool's own parts."""
import json
import re
import pathlib

import numpy as np
import pytest

from cprec.report.add_run import add_run, run_values
from cprec.report.markers import render_docs, render_text, table_names
from cprec.report.paths import RESULTS, ROOT, doc_files
from cprec.report.table import REQUIRED, ResultFileError, dump_table, load_table, render_table


def test_every_docs_table_is_what_its_result_file_renders():
    differ = render_docs(check=True)
    assert not differ, f"tables differ from results/ in {differ}: run `python -m cprec.report`"


def test_every_result_file_follows_the_schema_and_is_shown():
    shown = {name for path in doc_files() for name in table_names(path.read_text())}
    tables = [p.stem for p in RESULTS.glob("*.json") if "columns" in json.loads(p.read_text())]
    assert tables
    for name in tables:
        spec = load_table(name)
        assert all(spec[k] for k in REQUIRED), name
        assert spec["rows"], name
        assert name in shown, f"results/{name}.json is in no docs table"
        text = (RESULTS / f"{name}.json").read_text()
        assert text == dump_table(json.loads(text)), f"results/{name}.json: run `python -m cprec.report` (it lays the file out)"


def _table(tmp_path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    spec = {"title": "t", "source": "test", "command": "python run.py", "machine": "cpu", "seeds": [0],
            "columns": [{"key": "run", "label": "run"}, {"key": "params/total", "label": "params", "format": "{:,}"},
                        {"key": "test/mrr@5", "label": "MRR@5", "format": "{:.4f}"},
                        {"keys": ["a", "b"], "label": "a / b", "format": "{:.1f}"}],
            "rows": rows}
    (tmp_path / "t.json").write_text(json.dumps(spec))
    return tmp_path


def test_a_table_renders_formats_bold_and_provenance(tmp_path):
    rows = [{"run": "x", "params/total": 1234567, "test/mrr@5": 0.585, "a": 1.0, "b": 2.25, "_bold": ["test/mrr@5"]},
            {"run": "y", "test/mrr@5": "n/a"}]
    md = render_table(load_table("t", _table(tmp_path, rows)))
    assert "| x | 1,234,567 | **0.5850** | 1.0 / 2.2 |" in md
    assert "| y |  | n/a |  |" in md
    assert "`python run.py`; cpu; seeds 0; test." in md


def test_rows_from_a_benchmarks_own_json(tmp_path):
    bench = {"command": "python -m cprec.bench.x --fast", "date": "2026-12-04", "rows": [{"flops": 2.5e9, "peak": 0.4471}]}
    (tmp_path / "x-cpu.json").write_text(json.dumps(bench))
    spec = {"title": "t", "source": "bench", "machine": "cpu", "rows_from": "x-cpu.json#rows",
            "columns": [{"key": "flops", "label": "GFLOP/s", "format": "{:.1f}", "scale": 1e-9},
                        {"key": "peak", "label": "peak", "format": "{:.1%}"}]}
    (tmp_path / "t.json").write_text(json.dumps(spec))
    md = render_table(load_table("t", tmp_path))
    assert "| 2.5 | 44.7% |" in md and "`python -m cprec.bench.x --fast`; cpu; 2026-12-04; bench." in md


def test_markers_are_replaced_and_other_text_kept(tmp_path):
    results = _table(tmp_path, [{"run": "x", "test/mrr@5": 0.5}])
    text = "intro\n<!-- table:t -->\nstale\n<!-- /table:t -->\noutro\n"
    out = render_text(text, results)
    assert out.startswith("intro\n<!-- table:t -->\n| run |") and out.endswith("<!-- /table:t -->\noutro\n")
    assert "stale" not in out and render_text(out, results) == out
    with pytest.raises(ResultFileError, match="no such result file"):
        render_text("<!-- table:missing -->\n<!-- /table:missing -->", results)


def test_the_command_names_a_missing_result_file_in_one_line(monkeypatch, capsys):
    from cprec.report import __main__ as cli

    def missing(check=False):
        return render_text("<!-- table:missing -->\n<!-- /table:missing -->", pathlib.Path("/nonexistent"))

    monkeypatch.setattr(cli, "render_docs", missing)
    with pytest.raises(SystemExit) as e:
        cli.main(["--check"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: /nonexistent/missing.json: no such result file (a docs marker names table:missing)")


def test_add_puts_a_runs_results_json_in_a_table(tmp_path):
    results = _table(tmp_path, [{"run": "old", "test/mrr@5": 0.1}, {"run": "mine", "test/mrr@5": 0.2}])
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(
        {"step": 10, "test": {"mrr@5": 0.61234}, "report": {"params/total": 5000}, "wall_s": 12.5}))
    row = add_run(run, "t", {"run": "mine"}, results)
    assert row["test/mrr@5"] == 0.61234 and row["params/total"] == 5000 and row["_source"].endswith("results.json")
    assert run_values(run)["wall_s"] == 12.5  # the run's wall time, for a table's time-to-quality column
    add_run(run / "results.json", "t", {"run": "mine"}, results)  # the file names its run too
    rows = load_table("t", results)["rows"]
    assert [r["run"] for r in rows] == ["old", "mine"]  # the run's row replaced, not duplicated
    assert "| mine | 5,000 | 0.6123 |" in render_table(load_table("t", results))


def test_add_a_sweep_of_seeds_gives_their_mean_and_spread(tmp_path):
    results = _table(tmp_path, [])
    spec = json.loads((results / "t.json").read_text())
    spec["columns"].append({"keys": ["test/hr@10", "test/hr@10_std"], "label": "HR@10", "format": "{:.3f}", "sep": " ± "})
    spec["columns"].append({"key": "popularity/test_hr@10", "label": "popularity HR@10", "format": "{:.3f}"})
    (results / "t.json").write_text(dump_table(spec))
    sweep = tmp_path / "runs" / "sweep"
    for seed, hr in enumerate((0.10, 0.20, 0.60)):
        trial = sweep / f"{seed}_seed={seed}"
        trial.mkdir(parents=True)
        (trial / "config.json").write_text(json.dumps({"seed": seed}))
        (trial / "results.json").write_text(json.dumps({"step": 5, "test": {"hr@10": hr}, "report": {"params/total": 7}}))
        (trial / "metrics.jsonl").write_text(json.dumps({"step": 0, "popularity/test_hr@10": 0.05}) + "\n" + json.dumps(
            {"step": 4, "train/tokens_per_sec": 900.0}) + "\n" + json.dumps({"step": 5, "train/tokens_per_sec": 1000.0}) + "\n")
    (sweep / "3_unfinished").mkdir()
    row = add_run(sweep, "t", {"run": "three seeds"}, results)
    assert row["test/hr@10"] == pytest.approx(0.3) and row["test/hr@10_std"] == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert row["popularity/test_hr@10"] == pytest.approx(0.05) and "(3 trials)" in row["_source"]
    assert add_run(sweep / "0_seed=0", "t", {"run": "one"}, results) and run_values(sweep / "0_seed=0")[
        "train_tokens_s"] == 1000.0  # the last logged throughput (an average since the compiled step)
    assert "| three seeds | 7 |  |  | 0.300 ± 0.265 | 0.050 |" in render_table(load_table("t", results))
    with pytest.raises(ResultFileError, match="1 finished trial"):
        add_run(_one_trial(tmp_path), "t", {"run": "x"}, results)


def _one_trial(tmp_path: pathlib.Path) -> pathlib.Path:
    sweep = tmp_path / "runs" / "lonely"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "results.json").write_text(json.dumps({"step": 1, "test": {}}))
    return sweep


def test_the_plots_render(tmp_path):
    pytest.importorskip("matplotlib")
    from cprec.report.plots import render_plots
    files = render_plots(out=tmp_path)
    assert [f.name for f in files] == ["pareto.png", "early-stop.png", "server.png", "rivals-synthetic30k.png",
                                         "rivals-synthetic1m.png", "rivals-ml100k.png", "rivals-synthetic30k-bytes.png",
                                         "rivals-synthetic1m-bytes.png", "rivals-ml100k-bytes.png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_every_docs_link_resolves():
    for page in doc_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            assert dest.exists(), f"{page.name}: link to missing {target}"
            if anchor:
                assert anchor in _anchors(dest.read_text()), f"{page.name}: no heading for {target}"


def test_every_config_key_is_in_docs_configs():
    from cprec.config import base_config

    lines = (ROOT / "docs" / "configs.md").read_text().splitlines()

    def documented(key: str) -> bool:  # `model.dim`, or `dim` in a row that names `model.` keys
        section, _, leaf = key.rpartition(".")
        return any(f"`{key}`" in line or (f"`{section}." in line and f"`{leaf}`" in line) for line in lines)

    def leaves(d: dict, prefix: str = "") -> list[str]:
        return [k for key, v in d.items() for k in (leaves(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])]

    missing = [k for k in leaves(base_config().to_dict()) if not documented(k)]
    assert not missing, f"add a row for each of {missing} to docs/configs.md"


def _rival_trial(sweep: pathlib.Path, name: str, embedding: str, budget: str, lr: float, seed: int, val: float,
                 mrr: float, backbone: str = "nextitnet") -> None:
    trial = sweep / name
    trial.mkdir(parents=True)
    config = {"seed": seed, "model": {"embedding": embedding, "budget": budget, "backbone": backbone}, "optim": {"lr": lr},
              "budget": {"options": {"rank": 5}} if embedding == "lowrank" else {}}
    (trial / "config.json").write_text(json.dumps(config))
    (trial / "results.json").write_text(json.dumps(
        {"step": 9, "test": {"mrr@5": mrr, "ndcg@10": mrr, "hr@10": mrr}, "report": {"params/total": 1000}}))
    (trial / "metrics.jsonl").write_text(json.dumps({"step": 9, "val/ndcg@10": val, "test/selected_step": 9,
                                                     "serve/top20_ms_batch1": 1.5}) + "\n")


def test_the_rivals_table_chooses_the_lr_on_validation_and_averages_its_seeds(tmp_path):
    from cprec.report.rivals import rival_rows, update_records

    grid, seeds = tmp_path / "grid", tmp_path / "seeds"
    # lr 3e-3 has the better validation score but the worse test score: validation must decide.
    _rival_trial(grid, "a", "lowrank", "20x", 1e-3, 0, val=0.50, mrr=0.60)
    _rival_trial(grid, "b", "lowrank", "20x", 3e-3, 0, val=0.55, mrr=0.40)
    _rival_trial(seeds, "c", "lowrank", "20x", 3e-3, 1, val=0.10, mrr=0.50)  # a later seed cannot flip the choice
    _rival_trial(grid, "d", "full", "", 1e-3, 0, val=0.70, mrr=0.70)
    records = tmp_path / "trials.jsonl"
    # trials recorded in two sessions (the seeds' run directories gone by the second) add up
    first = update_records([grid], records, with_bytes=False)
    assert len(first) == 3
    import shutil
    shutil.rmtree(grid)
    rows = rival_rows(update_records([seeds], records, with_bytes=False))
    assert [(r["method"], r["budget"]) for r in rows] == [("low-rank", "20x"), ("NextItNet (uncompressed)", "none")]
    low = rows[0]
    assert low["lr"] == 3e-3 and low["seeds"] == "0 1" and low["lrs_tried"] == "0.001, 0.003"
    assert low["test/mrr@5"] == pytest.approx(0.45) and low["test/mrr@5_std"] == pytest.approx(np.std([0.4, 0.5], ddof=1))
    assert low["size"] == "rank 5" and low["serve/top20_ms_batch1"] == 1.5
    # a rerun of one setting replaces its record instead of counting twice
    _rival_trial(tmp_path / "again", "e", "lowrank", "20x", 3e-3, 1, val=0.10, mrr=0.30)
    rows = rival_rows(update_records([tmp_path / "again"], records, with_bytes=False))
    assert rows[0]["seeds"] == "0 1" and rows[0]["test/mrr@5"] == pytest.approx(0.35)


def test_a_rate_not_yet_tried_by_every_method_at_a_budget_is_not_chosen(tmp_path):
    from cprec.report.rivals import rival_rows, update_records

    sweep = tmp_path / "tune"
    _rival_trial(sweep, "a", "lowrank", "20x", 1e-3, 0, val=0.50, mrr=0.50)
    _rival_trial(sweep, "b", "lowrank", "20x", 3e-3, 0, val=0.90, mrr=0.90)  # better, but hash lacks 3e-3 so far
    _rival_trial(sweep, "c", "hash", "20x", 1e-3, 0, val=0.30, mrr=0.30)
    _rival_trial(sweep, "d", "hash", "10x", 3e-3, 0, val=0.20, mrr=0.20)  # another budget: its own rates
    rows = {(r["method"], r["budget"]): r for r in rival_rows(update_records([sweep], tmp_path / "t.jsonl", False))}
    low = rows[("low-rank", "20x")]
    assert low["lr"] == 1e-3 and low["test/mrr@5"] == 0.50 and low["lrs_tried"] == "0.001 (+0.003)"
    assert rows[("hashing", "10x")]["lr"] == 3e-3
    # once every method at 20x has tried 3e-3, it competes
    _rival_trial(tmp_path / "later", "e", "hash", "20x", 3e-3, 0, val=0.10, mrr=0.10)
    rows = {(r["method"], r["budget"]): r for r in rival_rows(update_records([tmp_path / "later"], tmp_path / "t.jsonl", False))}
    assert rows[("low-rank", "20x")]["lr"] == 3e-3 and rows[("low-rank", "20x")]["lrs_tried"] == "0.001, 0.003"
    assert rows[("hashing", "20x")]["lr"] == 1e-3


def test_each_backbone_is_its_own_comparison_in_the_rivals_table(tmp_path):
    from cprec.report.rivals import rival_rows, update_records

    sweep = tmp_path / "grid"
    _rival_trial(sweep, "a", "lowrank", "20x", 1e-3, 0, val=0.50, mrr=0.50)
    _rival_trial(sweep, "b", "lowrank", "20x", 3e-3, 0, val=0.90, mrr=0.90)
    # SASRec's methods have tried one rate so far: that does not hold back NextItNet's second one
    _rival_trial(sweep, "c", "qr", "20x", 1e-3, 0, val=0.30, mrr=0.30, backbone="sasrec")
    _rival_trial(sweep, "d", "full", "", 1e-3, 0, val=0.40, mrr=0.40, backbone="sasrec")
    rows = {r["method"]: r for r in rival_rows(update_records([sweep], tmp_path / "t.jsonl", False))}
    assert list(rows) == ["low-rank", "QR / SASRec", "SASRec (uncompressed)"]
    assert rows["low-rank"]["lr"] == 3e-3 and rows["low-rank"]["lrs_tried"] == "0.001, 0.003"
    assert rows["QR / SASRec"]["lrs_tried"] == "0.001"


def test_recording_again_keeps_what_the_same_runs_parameters_gave(tmp_path, monkeypatch):
    """The stored bytes and the int8 test are measured once per run: re-recording an unchanged run
    reuses them, a run whose results changed (a rerun of its setting) is measured again."""
    from cprec.report import rivals

    calls = []
    monkeypatch.setattr(rivals, "stored", lambda run, earlier=None: calls.append(run.name) or {
        "bytes_float32": 8, "bytes_int8": 2, **{k: 0.5 for k in rivals.INT8}})
    sweep, records = tmp_path / "grid", tmp_path / "t.jsonl"
    _rival_trial(sweep, "a", "lowrank", "20x", 1e-3, 0, val=0.50, mrr=0.50)
    _rival_trial(sweep, "b", "qr", "20x", 1e-3, 0, val=0.50, mrr=0.40)
    rivals.update_records([sweep], records)
    assert calls == ["a", "b"]
    rivals.update_records([sweep], records)
    assert calls == ["a", "b"]
    import shutil
    shutil.rmtree(sweep / "b")
    _rival_trial(sweep, "b", "qr", "20x", 1e-3, 0, val=0.50, mrr=0.45)
    rows = {r["method"]: r for r in rivals.rival_rows(rivals.update_records([sweep], records))}
    assert calls == ["a", "b", "b"]
    assert rows["QR"]["bytes_int8"] == 2 and rows["QR"]["int8/test/mrr@5"] == 0.5
    # A new storage scheme (STORED_FORMAT raised) measures every run on disk again.
    monkeypatch.setattr(rivals, "STORED_FORMAT", rivals.STORED_FORMAT + 1)
    rivals.update_records([sweep], records)
    assert calls == ["a", "b", "b", "a", "b"]
