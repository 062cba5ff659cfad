import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.sweep import apply_overrides
from cprec.train.batching import WindowBatcher
from cprec.data import load_dataset
from cprec.errors import ConfigError, DataError, WorkdirError
from cprec.model.builder import build_model, init_params
from cprec.train import TrainingDiverged, make_optimizer, make_train_step, new_train_state, train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _snapshot(path: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_train_step_compiles_once(tiny, micro_batches):
    config = tiny()
    data = load_dataset(config.data, verbose=False)
    model = build_model(config, data.item_counts)
    tx = make_optimizer(config, 10)
    params = init_params(model, 0)
    state = new_train_state(params, tx)
    step = make_train_step(model, tx, 0, micro_batches)
    batcher = WindowBatcher(data.train, config.train.batch_size, 0)
    for i in range(3 * batcher.steps_per_epoch):  # crosses epochs and their padded last batches
        state, metrics = step(state, jnp.asarray(batcher.batch(i)))
    assert step._cache_size() == 1
    assert np.isfinite(metrics["loss"])


def test_batches_depend_only_on_step():
    windows = np.arange(70 * 3, dtype=np.int32).reshape(70, 3)
    a, b = WindowBatcher(windows, 16, 5), WindowBatcher(windows, 16, 5)
    for step in (0, 3, 4, 9, 4):
        np.testing.assert_array_equal(a.batch(step), b.batch(step))
    epoch = np.concatenate([a.batch(s) for s in range(a.steps_per_epoch)])
    padding = np.all(epoch == 0, axis=1)  # every window here has a non-zero id (the first is 0, 1, 2)
    assert padding.sum() == a.steps_per_epoch * 16 - len(windows)  # only the last batch is filled up
    assert sorted(map(tuple, epoch[~padding])) == sorted(map(tuple, windows))  # each window once per epoch


def test_train_and_evaluate_outputs_and_no_retrain(tiny, tmp_path, capsys):
    workdir = tmp_path / "run"
    test = train_and_evaluate(tiny(), workdir)
    assert set(test) >= {"hr@5", "ndcg@10", "mrr@20"}
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*lines)
    assert {"step", "train/loss", "train/tokens_per_sec", "val/mrr@5", "test/hr@10", "test/ndcg@20",
            "params/total", "serve/top20_ms_batch1", "serve/top20_ms_batch4"} <= keys
    assert json.loads((workdir / "config.json").read_text())["model"]["dim"] == 8
    val = [(line["val/ndcg@10"], -line["step"]) for line in lines if "val/ndcg@10" in line]
    assert lines[-1]["test/selected_step"] == -max(val)[1]  # first step with the best validation score
    walls = [line["val/wall_s"] for line in lines if "val/wall_s" in line]
    results = json.loads((workdir / "results.json").read_text())
    assert len(walls) == len(val) and walls == sorted(walls) and 0 < walls[0]
    assert results["wall_s"] > walls[-1] and results["wall_s_resumed_from_step"] == 0
    assert list(workdir.glob("events.out.tfevents.*"))
    assert (workdir / "checkpoints" / "12").is_dir()
    before = _snapshot(workdir)
    assert train_and_evaluate(tiny(), workdir) == test
    assert "already finished" in capsys.readouterr().out
    assert _snapshot(workdir) == before


def test_other_experiment_in_workdir_is_refused(tiny, tmp_path):
    workdir = tmp_path / "run"
    config = tiny()
    config.train.num_steps = 4
    train_and_evaluate(config, workdir)
    before = _snapshot(workdir)
    with pytest.raises(WorkdirError, match=r"holds another experiment \(config differs at model.dim: 8 vs 16\)"):
        train_and_evaluate(tiny(dim=16), workdir)
    assert _snapshot(workdir) == before


def test_logging_and_checkpoint_frequency_may_change_on_resume(tiny, tmp_path, capsys):
    workdir = tmp_path / "run"
    config = tiny()
    config.train.num_steps = 4
    train_and_evaluate(config, workdir)
    config.train.log_every, config.train.checkpoint_every, config.train.keep_checkpoints = 3, 1, 5
    train_and_evaluate(config, workdir)  # not refused: the run is recognised as the same experiment
    assert "already finished" in capsys.readouterr().out
    config.train.eval_every += 1  # changes which checkpoint is selected: a different experiment
    with pytest.raises(WorkdirError, match=r"config differs at train.eval_every"):
        train_and_evaluate(config, workdir)


def test_corrupted_checkpoint_is_a_clear_error(tiny, tmp_path):
    workdir = tmp_path / "run"
    config = tiny()
    train_and_evaluate(config, workdir)
    (workdir / "results.json").unlink()  # pretend it was interrupted after the last checkpoint
    for f in (workdir / "checkpoints" / "12").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f):
            f.write_bytes(b"garbage")
    before = _snapshot(workdir)
    with pytest.raises(WorkdirError, match="checkpoint .*12 is corrupted"):
        train_and_evaluate(config, workdir)
    assert _snapshot(workdir) == before


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    workdir = tmp_path / "run"
    config = tiny()
    config.optim.name, config.optim.lr, config.optim.clip_norm = "sgd", 1e38, 0.0
    config.train.num_steps, config.train.log_every, config.train.checkpoint_every = 40, 1, 1
    with pytest.raises(TrainingDiverged, match="loss became .* last good checkpoint"):
        train_and_evaluate(config, workdir)
    assert not (workdir / "results.json").exists()
    _assert_finite_checkpoints(config, workdir, at_least=1)


def test_nan_guard_runs_before_a_checkpoint_between_log_steps(tiny, tmp_path, monkeypatch):
    # The state turns NaN in step 5; step 6 is a checkpoint step but not a log step (every 7).
    config = tiny()
    config.train.num_steps, config.train.log_every, config.train.checkpoint_every, config.train.eval_every = 12, 7, 2, 100
    config.train.keep_checkpoints = 5

    def poison(state, metrics):
        if int(jax.device_get(state["step"])) >= 5:
            state = {**state, "params": jax.tree.map(lambda x: x * jnp.nan, state["params"])}
            metrics = {**metrics, "loss": metrics["loss"] * jnp.nan}
        return state, metrics

    _wrap_train_step(monkeypatch, after=poison)
    with pytest.raises(TrainingDiverged, match="loss became nan at or before step 6"):
        train_and_evaluate(config, tmp_path / "run")
    assert _assert_finite_checkpoints(config, tmp_path / "run", at_least=2) == [2, 4]


def _assert_finite_checkpoints(config, workdir, at_least: int) -> list[int]:
    from cprec.runtime.checkpointing import Checkpointer

    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) >= at_least, steps
    data = load_dataset(config.data, verbose=False)
    like = new_train_state(init_params(build_model(config, data.item_counts), 0), make_optimizer(config, 1))
    ckpt = Checkpointer(workdir, 2)
    try:
        for step in steps:
            restored = ckpt.restore(step, like)
            assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored["params"])), step
    finally:
        ckpt.close()
    return steps


def _run_cli(args, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, **kw)


def _tiny_flags(cache):
    return [f"--config={ROOT / 'experiments/nextitnet.py'}", f"--config.data.cache_dir={cache}",
            "--config.data.num_users=80", "--config.data.num_items=60", "--config.data.mean_len=14",
            "--config.data.num_topics=6", "--config.data.max_len=10", "--config.data.min_user_count=0",
            "--config.data.min_item_count=0", "--config.model.dim=8",
            "--config.model.num_blocks=1", "--config.train.batch_size=16", "--config.eval.batch_size=32"]


# Each bad value is a ConfigError raised before anything is written (checked in-process: a
# subprocess per value costs 2-3 s of imports); two of them also through the CLI, where a
# ConfigError becomes one line on stderr and exit status 2.
BAD_CONFIGS = [
    ({"model.dim": 0}, "config.model.dim=0 is invalid: must be > 0"),
    ({"model.dilations": ()}, "config.model.dilations=() is invalid: must not be empty"),
    ({"model.dilations": (1, 0)}, "every dilation must be >= 1"),
    ({"data.max_len": 1}, "config.data.max_len=1 is invalid: L must be >= 2"),
    ({"model.sharing": "foo"}, "valid choices: none, cross_layer"),
    ({"train.micro_batch_size": -1}, "config.train.micro_batch_size=-1 is invalid: must be >= 0"),
    ({"train.micro_batch_size": 5}, "micro_batch_size=5 does not divide the 16 rows"),
    ({"eval.ks": (0,)}, "config.eval.ks=(0,) is invalid: must be a non-empty tuple of positive cut-offs"),
]


@pytest.mark.parametrize("override,message", BAD_CONFIGS)
def test_bad_config_is_a_config_error_before_anything_is_written(tiny, tmp_path, override, message):
    config = tiny()
    apply_overrides(config, override)
    with pytest.raises(ConfigError) as info:
        train_and_evaluate(config, str(tmp_path / "run"))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.model.dimm=3", "unknown config key 'model.dimm' (did you mean 'model.dim'?)"),
        ("--config.model.dilations=(1,0)", "every dilation must be >= 1"),
    ],
)
def test_cli_bad_config_is_one_line(tmp_path, override, message):
    result = _run_cli([*_tiny_flags(tmp_path / "cache"), f"--workdir={tmp_path / 'run'}", override])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_workdir_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    result = _run_cli([*_tiny_flags(tmp_path / "cache"), f"--workdir={path}"])
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert f"--workdir {path} is a file, not a directory" in result.stderr
    assert path.read_text() == "keep me"


@pytest.mark.slow  # 45 s; test_a_resumed_run_does_what_an_uninterrupted_one_does covers resuming in CI
def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    """SIGKILL a run mid-way, rerun the same command, and compare with an uninterrupted run."""
    cache = tmp_path / "cache"
    common = [*_tiny_flags(cache), "--config.train.num_steps=1200", "--config.train.log_every=20",
              "--config.train.checkpoint_every=100", "--config.train.eval_every=400"]
    full = _run_cli([*common, f"--workdir={tmp_path / 'full'}"], timeout=600)
    assert full.returncode == 0, full.stderr

    workdir = tmp_path / "killed"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *common, f"--workdir={workdir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("step 260/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "results.json").exists()

    resumed = _run_cli([*common, f"--workdir={workdir}"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from checkpoint at step" in resumed.stdout
    a = json.loads((tmp_path / "full" / "results.json").read_text())["test"]
    b = json.loads((workdir / "results.json").read_text())["test"]
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_failed_start_leaves_no_workdir(tiny, tmp_path):
    config = tiny()
    config.data.name, config.data.path = "csv", str(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="missing.csv"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compression_report_is_saved(tiny, tmp_path):
    config = tiny(embedding="blockwise", softmax="tree", sharing="cross_block", cutoffs=(20, 40))
    config.train.num_steps = 4
    train_and_evaluate(config, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "config.json").read_text())["report"]
    parts = report["params/embedding"] + report["params/residual_stack"] + report["params/output"]
    assert report["params/total"] == parts
    assert report["params/bytes"] == 4 * parts
    assert report["params/compression_ratio"] == pytest.approx(report["params/baseline_total"] / parts)
    assert report["params/compression_ratio"] > 1.5
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["params/total"] == parts


class _Interrupt(Exception):
    pass


def _wrap_train_step(monkeypatch, before=None, after=None) -> None:
    """Runs ``before(state)`` ahead of and ``after(state, metrics)`` behind every jitted train step of the next runs."""
    import cprec.train.loop as loop

    def wrap(real):
        def make(*args, **kwargs):
            step = real(*args, **kwargs)

            def wrapped(state, batch):
                if before:
                    before(state)
                out = step(state, batch)
                return after(*out) if after else out
            return wrapped
        return make

    for name in ("make_train_step", "make_sparse_train_step"):  # the dense step, and optim.sparse_tables'
        monkeypatch.setattr(loop, name, wrap(getattr(loop, name)))


def _interrupted_after(monkeypatch, steps: int) -> None:
    """Makes the next run stop (as if killed) before its step number ``steps`` + 1, with every save finished."""
    def stop(state):
        if int(jax.device_get(state["step"])) >= steps:
            raise _Interrupt

    _wrap_train_step(monkeypatch, before=stop)


def _validated_steps(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if "val/ndcg@10" in line], [line["step"] for line in lines if "train/loss" in line]


@pytest.mark.parametrize("stop_at,eval_every,softmax,sparse", [(11, 6, "full", False),
                                                                pytest.param(5, 1, "full", False, marks=pytest.mark.slow),
                                                                pytest.param(7, 6, "sampled", False, marks=pytest.mark.slow),
                                                                (7, 6, "sampled", True)])
def test_a_resumed_run_does_what_an_uninterrupted_one_does(tiny, tmp_path, monkeypatch, stop_at, eval_every, softmax,
                                                           sparse):
    # (11, 6): resumed one step before the end, whose first step is the last; it must still validate,
    # checkpoint and select. (5, 1): validation every step, the first after the resume included.
    # Sampled: the resumed steps draw the negatives the uninterrupted run drew; sparse: and the lazy
    # Adam's table moments come back from the checkpoint.
    config = tiny(softmax=softmax, num_negatives=8)
    config.optim.sparse_tables = sparse
    config.train.eval_every, config.train.checkpoint_every, config.train.log_every = eval_every, 1, 1
    whole = train_and_evaluate(config, tmp_path / "whole")
    with monkeypatch.context() as m:
        _interrupted_after(m, stop_at)
        with pytest.raises(_Interrupt):
            train_and_evaluate(config, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "results.json").exists()
    resumed = train_and_evaluate(config, tmp_path / "resumed")
    assert _validated_steps(tmp_path / "resumed") == _validated_steps(tmp_path / "whole")
    results = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1]) for run in ("whole", "resumed")]
    assert results[0]["test/selected_step"] == results[1]["test/selected_step"]
    assert sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.isdigit())[-1] == 12
    for key in whole:
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-9), key


def _logged_steps(workdir) -> list[tuple[int, str]]:
    """(step, key) of every scalar in metrics.jsonl, and of every scalar TensorBoard shows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    jsonl = [(line["step"], key) for line in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
             for key in line if key != "step"]
    acc = EventAccumulator(str(workdir), size_guidance={"scalars": 0})
    acc.Reload()
    board = [(e.step, tag) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]
    return sorted(jsonl), sorted(board)


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tiny, tmp_path, monkeypatch):
    config = tiny()
    config.train.log_every, config.train.eval_every, config.train.checkpoint_every = 2, 3, 100  # saved at the end only
    with monkeypatch.context() as m:
        _interrupted_after(m, 7)  # steps 2, 4, 6 logged and 3, 6 validated: no checkpoint yet
        with pytest.raises(_Interrupt):
            train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    train_and_evaluate(config, tmp_path / "run")
    train_and_evaluate(config, tmp_path / "whole")
    jsonl, board = _logged_steps(tmp_path / "run")
    assert len(jsonl) == len(set(jsonl)) and len(board) == len(set(board))  # every (step, key) once
    whole_jsonl, whole_board = _logged_steps(tmp_path / "whole")
    assert jsonl == whole_jsonl and board == whole_board


def _validation_scores(monkeypatch, score) -> None:
    """Makes validation report ndcg@10 = score(step) (the selection metric); the rest as computed."""
    import cprec.train.loop as loop

    real = loop._Validator.__call__
    monkeypatch.setattr(loop._Validator, "__call__", lambda self, split, params, step: {
        **real(self, split, params, step), **({"ndcg@10": score(step)} if split == "val" else {})})


def _best_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "best").iterdir() if p.name.isdigit())


def _killed_and_resumed(config, workdir, monkeypatch, stop_at: int, before, after) -> list[int]:
    """Runs ``config`` until killed before step ``stop_at`` + 1 with validation scores ``before(step)``,
    then resumes it with ``after(step)``; returns the steps best/ held at the kill."""
    with monkeypatch.context() as m:
        _interrupted_after(m, stop_at)
        _validation_scores(m, before)
        with pytest.raises(_Interrupt):
            train_and_evaluate(config, workdir)
    kept = _best_steps(workdir)
    _validation_scores(monkeypatch, after)
    train_and_evaluate(config, workdir)
    return kept


def test_a_resumed_run_keeps_the_better_of_a_replayed_best_step(tiny, tmp_path, monkeypatch):
    # Checkpoints at 4 and 8, validation every 2: best/ holds step 10 when the run is killed before
    # step 11; the resumed run replays 9-12 and validates step 10 again, scoring it higher.
    from cprec.eval.pretrained import load_run
    from cprec.runtime.checkpointing import Checkpointer

    config = tiny()
    config.train.eval_every, config.train.checkpoint_every, config.train.log_every = 2, 4, 2
    replayed = {10: 0.5, 12: 0.2}  # the replay of step 10 scores higher than the 0.10 saved; 12 lower
    assert _killed_and_resumed(config, tmp_path / "run", monkeypatch, 10, lambda step: step / 100,
                               lambda step: replayed.get(step, step / 100)) == [10]
    assert _best_steps(tmp_path / "run") == [10]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["test/selected_step"] == 10
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test_params"] == {"source": "best", "step": 10}
    ckpt = Checkpointer(tmp_path / "run", None, subdir="best", read_only=True)
    try:
        saved = ckpt.restore(10, {"score": jnp.zeros(()), "step": jnp.zeros((), jnp.int32)}, partial=True)
    finally:
        ckpt.close()
    assert float(saved["score"]) == pytest.approx(0.5) and int(saved["step"]) == 10
    assert load_run(tmp_path / "run").step == 10


def test_a_replayed_lower_step_that_scores_higher_replaces_a_later_best(tiny, tmp_path, monkeypatch):
    # Validation every step, checkpoints at 4 and 8: killed before step 12, best/ holds step 11 (0.11).
    # The resume replays from 8 and step 9 now scores 0.9: it must be saved although it lies below the
    # kept step (the checkpoint manager alone skips such a save silently), and step 11 removed.
    config = tiny()
    config.train.eval_every, config.train.checkpoint_every, config.train.log_every = 1, 4, 2
    assert _killed_and_resumed(config, tmp_path / "run", monkeypatch, 11, lambda step: step / 100,
                               lambda step: 0.9 if step == 9 else 0.0) == [11]
    assert _best_steps(tmp_path / "run") == [9]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test_params"] == {"source": "best", "step": 9}
