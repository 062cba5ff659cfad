"""Sweeps: expansion, validation, slugs and workdirs, the local launcher, SLURM submission errors, summaries."""
import csv
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from cprec.sweep import expand as sweep, launch
from cprec.errors import ConfigError, CprecError
from cprec.sweep import apply_overrides
from cprec.sweep.expand import expand, product, seeds, slug, zip_

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = """\
from cprec.config import base_config
from cprec.sweep.expand import product, seeds, zip_


def get_config(arg=None):
    c = base_config()
    d = c.data
    d.name, d.cache_dir = "synthetic", {cache!r}
    d.num_users, d.num_items, d.mean_len, d.num_topics, d.max_len = 80, 60, 14, 6, 10
    d.min_user_count = d.min_item_count = 0
    c.model.dim, c.model.dilations, c.model.num_blocks = 8, (1, 2), 1
    c.train.batch_size, c.train.num_steps = 16, 8
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 4, 4, 4
    c.eval.batch_size = 32
    return c
"""


def write_config(directory: pathlib.Path, sweep_body: str | None, name: str = "tiny.py") -> pathlib.Path:
    """A tiny experiment file (trains in seconds) with `sweep_body` as the body of sweep(arg)."""
    text = TINY.format(cache=str(directory / "cache"))
    if sweep_body is not None:
        text += "\n\ndef sweep(arg=None):\n" + textwrap.indent(textwrap.dedent(sweep_body).strip(), "    ") + "\n"
    path = directory / name
    path.write_text(text)
    return path


def run_cli(args, cwd, env=None, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


# --- composing and expanding ---------------------------------------------------------------------

def test_product_zip_and_seeds_compose():
    grid = product({"model.embedding": ["full", "blockwise"]}, [{"model.sharing": "none"}, {"model.sharing": "cross_block"}])
    assert grid == [{"model.embedding": "full", "model.sharing": "none"},
                    {"model.embedding": "full", "model.sharing": "cross_block"},
                    {"model.embedding": "blockwise", "model.sharing": "none"},
                    {"model.embedding": "blockwise", "model.sharing": "cross_block"}]
    paired = zip_({"optim.lr": [1e-3, 3e-3]}, [{"model.dim": 32}, {"model.dim": 64}])
    assert paired == [{"optim.lr": 1e-3, "model.dim": 32}, {"optim.lr": 3e-3, "model.dim": 64}]
    assert product(paired, seeds(3, start=1))[-1] == {"optim.lr": 3e-3, "model.dim": 64, "seed": 3}
    assert len(product({"a": [1, 2], "b": [3, 4, 5]})) == 6
    with pytest.raises(ConfigError, match="equally long"):
        zip_({"optim.lr": [1e-3, 3e-3]}, seeds(3))
    with pytest.raises(ConfigError, match="sets 'seed' twice"):
        product(seeds(2), seeds(2))


def test_experiment_sweeps_expand_to_valid_trials():
    ablation = expand(f"{ROOT}/experiments/cprec.py:ml100k")
    assert len(ablation) == 2 * 2 * 5 * 3
    assert str(ablation[0].workdir) == ("runs/cprec-ml100k/00_embedding=full,softmax=full,sharing=none,"
                                        "tie_embeddings=false,seed=0")
    # ml100k's tuned preset ties the tables; the ablation unties every row (full/tree cannot tie)
    assert ablation[-1].overrides == {"model.embedding": "blockwise", "model.softmax": "tree",
                                      "model.sharing": "adjacent_block", "model.tie_embeddings": False, "seed": 2}
    assert len({t.workdir for t in ablation}) == len(ablation)

    clusters = expand(f"{ROOT}/experiments/cprec.py:ml100k,sweep=clusters", sweep_dir="elsewhere/c")
    assert len(clusters) == 4 * 3 * 2
    assert clusters[0].workdir.parent == pathlib.Path("elsewhere/c")
    assert clusters[0].config == f"{ROOT}/experiments/cprec.py:ml100k"  # get_config never sees 'sweep='
    assert {t.overrides["model.rank_decay"] for t in clusters} == {2, 4, 8}
    assert sweep.sweep_name("experiments/cprec.py:ml100k,sweep=clusters") == "cprec-ml100k-clusters"

    nextitnet = expand(f"{ROOT}/experiments/nextitnet.py:ml100k,sweep=width")
    assert [t.name for t in nextitnet[:2]] == ["0_lr=0.0003,dim=32", "1_lr=0.0003,dim=64"]
    assert nextitnet[0].workdir.parent == pathlib.Path("runs/nextitnet-ml100k-width")
    for variant, count in (("tuning", 18), ("decay", 6), ("seeds", 3), ("batch", 9)):
        assert len(expand(f"{ROOT}/experiments/nextitnet.py:ml100k,sweep={variant}")) == count
    for variant, count in (("tuning", 10), ("seeds", 3), ("batch", 9), ("length", 8)):
        assert len(expand(f"{ROOT}/experiments/cprec.py:ml100k,sweep={variant}")) == count
    # the earlier sweeps keep the schedule they ran with, whatever the preset says now
    tuning = expand(f"{ROOT}/experiments/nextitnet.py:ml100k,sweep=tuning")[0].overrides
    assert (tuning["train.batch_size"], tuning["train.num_epochs"], tuning["optim.name"]) == (256, 20, "adam")


def test_the_rivals_grid_keeps_its_trial_names_and_validates_for_both_backbones():
    from cprec.config import load_config_file
    grid = expand(f"{ROOT}/experiments/rivals.py:synthetic30k")
    # part 1: 5 methods x 4 budgets x 2 lrs + the baseline x 2 lrs, in the order the first runs were named
    assert len(grid) == 5 * 4 * 2 + 2 + 3 * 4 * 2
    assert grid[4].name == "04_embedding=blockwise,softmax=tree,budget=20x,lr=0.001"
    assert grid[40].overrides["model.embedding"] == "full" and grid[40].overrides["model.sharing"] == "none"
    assert {t.overrides["model.embedding"] for t in grid[42:]} == {"tt", "jpq", "prune"}  # later methods come after
    seeds = expand(f"{ROOT}/experiments/rivals.py:synthetic30k,sweep=seeds")
    assert len(seeds) == 9 * 2 and {t.overrides["seed"] for t in seeds} == {1, 2}
    # ml-100k: seeds at every budget, each at the rate chosen at that budget (MDE: 3e-3 at 5x, 1e-3 at 10x)
    ml = expand(f"{ROOT}/experiments/rivals.py:ml100k,sweep=seeds")
    assert len(ml) == (8 * 2 + 1) * 2
    mde = {t.overrides["model.budget"]: t.overrides["optim.lr"] for t in ml if t.overrides["model.embedding"] == "mde"}
    assert mde == {"5x": 3e-3, "10x": 1e-3}
    assert load_config_file(f"{ROOT}/experiments/rivals.py:ml100k,method=mde,budget=5x").optim.lr == 3e-3
    assert load_config_file(f"{ROOT}/experiments/rivals.py:ml100k,method=mde,budget=10x").optim.lr == 1e-3
    assert len(expand(f"{ROOT}/experiments/rivals.py:ml100k,backbone=sasrec")) == 5 * 2 * 2 + 2 + 3 * 2 * 2
    # the grid in three steps: every method and the baseline x the rates at 20x, then the other budgets
    tune = expand(f"{ROOT}/experiments/rivals.py:synthetic30k,sweep=tune")
    assert len(tune) == 9 * 2 and {t.overrides["model.budget"] for t in tune if "model.budget" in t.overrides} == {"20x", ""}
    budgets = expand(f"{ROOT}/experiments/rivals.py:synthetic30k,sweep=budgets")
    assert len(budgets) == 8 * 3 and "20x" not in {t.overrides["model.budget"] for t in budgets}
    # 1M items: every method and the baseline once, at the rate synthetic30k chose, the full tables sampled
    million = expand(f"{ROOT}/experiments/rivals.py:synthetic1m,sweep=chosen")
    assert len(million) == 9 and {t.overrides["optim.lr"] for t in million} == {3e-3}
    assert {t.overrides["model.softmax"] for t in million} == {"tree", "sampled"}
    sasrec = load_config_file(f"{ROOT}/experiments/rivals.py:synthetic30k,method=qr,backbone=sasrec")
    assert (sasrec.model.backbone, sasrec.model.embedding, sasrec.model.tie_embeddings) == ("sasrec", "qr", True)
    with pytest.raises(ConfigError, match="method='pq' is unknown"):
        load_config_file(f"{ROOT}/experiments/rivals.py:synthetic30k,method=pq")
    tuning = expand(f"{ROOT}/experiments/sasrec.py:ml100k")
    assert len(tuning) == 12
    # each setting is whole: the reference is RecBole's Adam without decay, not the preset's AdamW
    ref = load_config_file(f"{ROOT}/experiments/sasrec.py:ml100k")
    apply_overrides(ref, tuning[0].overrides)
    assert (ref.optim.name, ref.optim.weight_decay, ref.model.tie_embeddings) == ("adam", 0.0, True)
    assert load_config_file(f"{ROOT}/experiments/sasrec.py:synthetic30k,cprec=true").model.budget == "20x"
    # CpRec on ml-100k: the SASRec preset's schedule and optimiser, CpRec's own model keys, a reachable budget
    plain, cp = (load_config_file(f"{ROOT}/experiments/sasrec.py:ml100k{x}") for x in ("", ",cprec=true"))
    assert (cp.optim.lr, cp.train.batch_size, cp.train.num_epochs) == (plain.optim.lr, 64, 20)
    assert (cp.model.budget, cp.model.tie_embeddings, cp.model.embedding) == ("3x", True, "blockwise")
    # 1M items: the plain SASRec trains sampled with lazy-Adam tables, as NextItNet does; CpRec keeps its tree
    big, big_cp = (load_config_file(f"{ROOT}/experiments/sasrec.py:synthetic1m{x}") for x in ("", ",cprec=true"))
    assert (big.model.softmax, big.optim.sparse_tables) == ("sampled", True)
    assert (big_cp.model.softmax, big_cp.optim.sparse_tables) == ("tree", False)


def test_sampled_nextitnet_takes_the_negatives_validation_chose():
    from cprec.config import load_config_file
    # softmax=sampled: the count sweep=sampled chose per dataset; 1M items keeps the config's default
    negatives = {data: load_config_file(f"{ROOT}/experiments/nextitnet.py:{data},softmax=sampled").model.num_negatives
                 for data in ("ml100k", "synthetic30k", "synthetic1m")}
    assert negatives == {"ml100k": 256, "synthetic30k": 4096, "synthetic1m": 1024}
    assert load_config_file(f"{ROOT}/experiments/nextitnet.py:synthetic30k").model.softmax == "full"


def test_slugs_are_short_safe_and_distinct():
    safe = re.compile(r"^[A-Za-z0-9._=+,-]+$")
    a = slug({"model.cutoffs": (20_000, 60_000, 150_000), "optim.lr": 3e-4, "data.path": "/a b/c.csv"})
    assert a == "cutoffs=20k-60k-150k,lr=0.0003,path=a-b-c.csv"
    assert slug({"model.dropout": 0.1, "data.dropout": 0.2}) == "model.dropout=0.1,data.dropout=0.2"
    long1 = slug({"data.path": "x" * 200 + "1"})
    long2 = slug({"data.path": "x" * 200 + "2"})
    assert len(long1) <= sweep.MAX_SLUG and long1 != long2 and safe.match(long1)
    assert slug({}) == "base"


def test_trial_args_parse_back_to_the_same_values(tmp_path):
    """The command line a trial runs with gives config_flags exactly the sweep's values."""
    path = write_config(tmp_path, """return [{"model.cutoffs": (0.1, 0.35), "optim.lr": 3e-4, "model.softmax": "tree",
            "model.dilations": (1,), "train.num_steps": 5, "model.capacity_margin": 2}]""")
    (trial,) = expand(str(path), shared={"data.max_len": 12})
    argv = ["prog", *[a for a in trial.args() if not a.startswith("--workdir")]]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    fv(argv)
    c = holder.value
    assert c.model.cutoffs == (0.1, 0.35) and c.optim.lr == 3e-4 and c.model.softmax == "tree"
    assert c.model.dilations == (1,) and c.train.num_steps == 5 and c.model.capacity_margin == 2.0
    assert c.data.max_len == 12


@pytest.mark.parametrize(
    "body,message",
    [
        ('return [{"model.dimm": 8}]', "unknown config key 'model.dimm' (did you mean 'model.dim'?)"),
        ("return []", "returned no trials"),
        (None, "defines no sweep(arg)"),
        ('return [{"model.dim": "wide"}]', "sweep trial 0: config.model.dim='wide' has the wrong type"),
        ('return [{"model.dim": 8}, {"model.dim": 0}]', "sweep trial 1 (dim=0): config.model.dim=0 is invalid"),
        ('return [{"seed": 1}, {"seed": 1}]', "sweep trials 0 and 1 are identical"),
        ('return {"seed": 1}', "must return a list of dicts"),
    ],
)
def test_bad_sweeps_are_config_errors(tmp_path, body, message):
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        expand(str(path))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "args,message",
    [
        # Two in CI (the other flags' checks are a few lines of run.py; 2-3 s of imports each).
        pytest.param(["--sweep", "--config.model.dimm=3"], "unknown config key 'model.dimm'", marks=pytest.mark.slow),
        (["--sweep", "--config.seed=3"], "--config.seed is set by the sweep itself"),
        pytest.param(["--launcher=local"], "launches a sweep; add --sweep", marks=pytest.mark.slow),
        pytest.param(["--sweep", "--workdir=runs/x"], "--workdir is for a single run", marks=pytest.mark.slow),
        (["--config=ARG_SWEEP", "--workdir=runs/x"], "names a sweep variant; add --sweep"),
        pytest.param(["--sweep", "--launcher=local", "--parallel=0"], "--parallel=0 is invalid", marks=pytest.mark.slow),
        pytest.param(["--summarize=nowhere"], "nowhere is not a directory", marks=pytest.mark.slow),
    ],
)
def test_cli_sweep_errors_are_one_line(tmp_path, args, message):
    path = write_config(tmp_path, 'return seeds(2)')
    args = [a.replace("ARG_SWEEP", f"{path}:sweep=x") for a in args]
    if not any(a.startswith("--config=") or a.startswith("--summarize") for a in args):
        args = [f"--config={path}", *args]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_lists_trials_without_running_them(tmp_path):
    path = write_config(tmp_path, 'return product({"model.sharing": ["none", "cross_layer"]}, seeds(2))')
    result = run_cli([f"--config={path}", "--sweep", "--sweep_dir=runs/mine"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sweep of 4 trials in runs/mine/" in result.stdout
    assert "runs/mine/3_sharing=cross_layer,seed=1  model.sharing=cross_layer seed=1" in result.stdout
    assert not (tmp_path / "runs").exists()


# --- the local launcher and summaries -------------------------------------------------------------

@pytest.mark.slow
def test_local_launcher_records_failures_skips_finished_and_summarizes(tmp_path):
    path = write_config(tmp_path, """
        good = product({"model.sharing": ["none", "cross_layer"]})
        return good + [{"data.name": "csv", "data.path": "/nonexistent/ratings.csv"}]  # fails at run time
    """)
    args = [f"--config={path}", "--sweep", "--launcher=local", "--parallel=2", "--config.train.num_steps=6"]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 1, first.stderr
    assert "2 finished, 1 failed" in first.stdout
    root = tmp_path / "runs" / "tiny"
    good = [root / "0_sharing=none", root / "1_sharing=cross_layer"]
    bad = root / "2_name=csv,path=nonexistent-ratings.csv"
    for workdir in good:
        assert (workdir / "results.json").exists() and (workdir / "metrics.jsonl").exists()
        assert json.loads((workdir / "status.json").read_text())["status"] == "finished"
        assert "step 6/6" in (workdir / "log.txt").read_text()
    status = json.loads((bad / "status.json").read_text())
    assert status["status"] == "failed" and status["returncode"] == 2
    assert status["error"] == "error: data file /nonexistent/ratings.csv not found; check data.path"
    assert json.loads((root / "sweep.json").read_text())["trials"][2]["overrides"]["data.name"] == "csv"
    # TensorBoard's HParams tab: a session in the trial's own run, no per-run experiment summary
    # (which would hide which hparams differ between trials).
    events = b"".join(p.read_bytes() for p in good[0].glob("events.out.tfevents.*"))
    assert b"_hparams_/session_start_info" in events and b"_hparams_/experiment" not in events
    assert not (good[0] / "hparams").exists()

    # An interrupted trial (results gone, status left 'running' by a dead process) resumes on rerun.
    (good[1] / "results.json").unlink()
    running = {**json.loads((good[1] / "status.json").read_text()), "status": "running", "pid": 2**22 + 7}
    (good[1] / "status.json").write_text(json.dumps(running))
    second = run_cli(args, cwd=tmp_path)
    assert second.returncode == 1
    assert "0_sharing=none: finished already, skipped" in second.stdout
    assert (good[0] / "log.txt").read_text().count("==> ") == 1  # not run again
    assert "resuming from checkpoint at step 6" in (good[1] / "log.txt").read_text()
    assert (good[1] / "results.json").exists()
    assert (bad / "log.txt").read_text().count("==> ") == 2  # a failed trial is retried

    summary = run_cli([f"--summarize={root}"], cwd=tmp_path)
    assert summary.returncode == 0, summary.stderr
    lines = summary.stdout.splitlines()
    assert lines[0].split()[:4] == ["#", "overrides", "status", "params"]
    assert re.match(r"0\s+model.sharing=none\s+finished\s+1,840\s+1.00x", lines[2])
    assert "data.name=csv data.path=/nonexistent/ratings.csv  failed" in lines[4]
    assert "3 trials: 2 finished, 1 failed" in summary.stdout
    with open(root / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["finished", "finished", "failed"]
    assert rows[1]["set.model.sharing"] == "cross_layer" and float(rows[1]["compression_ratio"]) > 1
    results = json.loads((good[0] / "results.json").read_text())
    assert float(rows[0]["test_hr@10"]) == pytest.approx(results["test"]["hr@10"])
    assert float(rows[0]["params_total"]) == results["report"]["params/total"]
    assert "not found" in rows[2]["error"]


def test_a_sweep_dir_holding_another_sweep_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = expand(str(write_config(tmp_path, "return seeds(2)")), sweep_dir="runs/s")
    launch._record_sweep(first, "a")
    other = expand(str(write_config(tmp_path, "return seeds(3)", name="other.py")), sweep_dir="runs/s")
    with pytest.raises(CprecError, match="holds another sweep"):
        launch._record_sweep(other, "b")


# --- SLURM submission without a cluster -----------------------------------------------------------

def fake_slurm(directory: pathlib.Path, sbatch: str) -> dict[str, str]:
    """PATH with stand-ins for sbatch, srun and squeue: enough to test submission, not to run."""
    bin_dir = directory / "fakebin"
    bin_dir.mkdir()
    for name, body in {"sbatch": sbatch, "srun": "exit 0", "squeue": "exit 0"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def test_slurm_submission_prints_the_job_id_and_sbatch_parameters(tmp_path):
    path = write_config(tmp_path, 'return seeds(2)')
    env = fake_slurm(tmp_path, 'echo "Submitted batch job 4242"')
    result = run_cli([f"--config={path}", "--sweep", "--launcher=slurm", "--slurm_partition=gpu", "--slurm_gpus=1",
                      "--slurm_cpus=3", "--slurm_mem_gb=8", "--slurm_time_min=30", "--slurm_array_parallelism=1"],
                     cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "submitted SLURM job 4242: 2 trials" in result.stdout
    root = tmp_path / "runs" / "tiny"
    statuses = [json.loads((root / f"{i}_seed={i}" / "status.json").read_text()) for i in range(2)]
    assert [(s["status"], s["job_id"]) for s in statuses] == [("submitted", "4242_0"), ("submitted", "4242_1")]
    script = (root / ".submitit" / "4242_submission.sh").read_text()
    for line in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=3", "--mem=8GB", "--time=30",
                 "--array=0-1%1", "--signal=USR2@90"):
        assert f"#SBATCH {line}" in script
    assert f"export PYTHONPATH={ROOT}" in script


def test_slurm_submission_failure_and_missing_slurm_are_one_line(tmp_path, monkeypatch):
    path = write_config(tmp_path, 'return seeds(2)')
    args = [f"--config={path}", "--sweep", "--launcher=slurm"]
    env = fake_slurm(tmp_path, 'echo "sbatch: error: invalid partition specified: nope" >&2; exit 1')
    result = run_cli(args, cwd=tmp_path, env=env)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "SLURM submission of 2 trials failed" in result.stderr and "invalid partition" in result.stderr
    assert not (tmp_path / "runs" / "tiny" / "0_seed=0" / "status.json").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(args, cwd=tmp_path, env={"PATH": str(empty)})
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "`sbatch` is not on PATH" in result.stderr

    monkeypatch.setitem(sys.modules, "submitit", None)  # as if it were not installed
    with pytest.raises(CprecError, match="needs submitit"):
        launch._require_slurm()


def test_slurm_options_merge_flags_over_config_section():
    options = launch.SlurmOptions.merge({"partition": "a", "gpus": 2}, partition="b", cpus=None, time_min=10)
    assert (options.partition, options.gpus, options.cpus, options.time_min) == ("b", 2, None, 10)
    with pytest.raises(CprecError, match="config.slurm.gpu is unknown"):
        launch.SlurmOptions.merge({"gpu": 1})


def test_tuned_presets_tie_and_tuned_false_is_the_untied_preset():
    from cprec.config import load_config_file
    tuned = load_config_file(f"{ROOT}/experiments/nextitnet.py:ml100k")
    plain = load_config_file(f"{ROOT}/experiments/nextitnet.py:ml100k,tuned=false")
    assert tuned.model.tie_embeddings and tuned.model.output_projection and tuned.train.num_epochs == 8
    assert (tuned.train.batch_size, tuned.eval.topk_batches) == (64, ())
    assert not plain.model.tie_embeddings and plain.train.num_epochs == 40 and plain.optim.name == "adam"
    assert (plain.train.batch_size, plain.eval.topk_batches) == (256, (1, 256))
    cprec = load_config_file(f"{ROOT}/experiments/cprec.py:ml100k")
    assert cprec.model.tie_embeddings and cprec.model.tie_projections
    # a tuned preset's tying is dropped where the layers cannot tie
    mixed = load_config_file(f"{ROOT}/experiments/cprec.py:ml100k,emb=full")
    assert not mixed.model.tie_embeddings
    assert load_config_file(f"{ROOT}/experiments/cprec.py:synthetic30k,tie=true").model.tie_embeddings


def test_over_seeds_gives_mean_and_sample_std_per_setting():
    from cprec.sweep.summarize import format_seeds_table, over_seeds

    def row(lr, seed, val, mrr, status="finished"):
        return {"status": status, "set.optim.lr": lr, "set.seed": seed, "best_val": val, "test_mrr@10": mrr}

    rows = [row("0.001", 0, 0.10, 0.030), row("0.001", 1, 0.20, 0.040), row("0.001", 2, 0.60, 0.020),
            row("0.003", 0, 0.50, 0.050), row("0.003", 1, 0.90, 0.090, status="failed"),  # one seed left
            row("0.01", 0, 0.30, 0.010)]
    seeded = over_seeds(rows)
    assert [r["overrides"] for r in seeded] == ["optim.lr=0.001"]
    (r,) = seeded
    assert r["seeds"] == "0 1 2"
    assert r["best_val_mean"] == pytest.approx(0.3) and r["best_val_std"] == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert r["test_mrr@10_mean"] == pytest.approx(0.03) and r["test_mrr@10_std"] == pytest.approx(0.01)
    table = format_seeds_table(seeded, "ndcg@10")
    assert "0.3000 ± 0.2646" in table and "0.0300 ± 0.0100" in table
    assert over_seeds([row("0.001", 0, 0.1, 0.03), {"status": "finished", "set.optim.lr": "0.001", "best_val": 0.2}]) == []
