"""model.budget: the parameter formula against built models, the solver's choices and its errors."""
import json

import jax
import numpy as np
import pytest

from cprec.bench.tree_softmax import zipf_counts
from cprec.errors import ConfigError
from cprec.eval.pretrained import load_run, run_config
from cprec.model import budget as solver
from cprec.model.builder import budget_choice, build_model, count_params, init_params, model_clusters
from cprec.train import train_and_evaluate
from tests.helpers import tiny_config

V = 2000
COUNTS = np.round(zipf_counts(V, 1.0) * 1e5)  # frequency-ordered, id 0 = padding


def _count(model) -> int:
    return count_params(jax.eval_shape(lambda: init_params(model, 0)))


def _counts():
    counts = COUNTS.copy()
    counts[1:] = np.maximum(counts[1:], 1)
    return counts


LAYERS = [
    dict(embedding="blockwise", softmax="tree"),
    dict(embedding="blockwise", softmax="tree", tie_embeddings=True),
    dict(embedding="blockwise", softmax="tree", tie_embeddings=True, tie_projections=True, output_projection=True),
    dict(embedding="full", softmax="tree"),
    dict(embedding="blockwise", softmax="full", output_projection=True),
]


@pytest.mark.parametrize("model", LAYERS)
@pytest.mark.parametrize("cutoffs, ranks", [((20, V), (8, 2)), ((10, 40, 1200, V), (8, 4, 2, 1))])
def test_cluster_param_formula_equals_the_built_model(tmp_path, model, cutoffs, ranks):
    config = tiny_config(tmp_path, **model, cutoffs=cutoffs[:-1], ranks=ranks)  # the config's cutoffs leave out V
    total = _count(build_model(config, _counts()))
    probe = tiny_config(tmp_path, **model, cutoffs=(1000,), ranks=(8, 1))
    probe_total = _count(build_model(probe, _counts()))
    m = config.model
    layers = solver.Layers(V, 8, m.embedding, m.softmax, m.tie_embeddings, m.tie_projections)
    # The clusters change exactly what the formula says they do.
    assert total - probe_total == solver.cluster_params(layers, cutoffs, ranks) - solver.cluster_params(
        layers, (1000, V), (8, 1))


@pytest.mark.parametrize("model, budget", [(LAYERS[0], "4x"), (LAYERS[0], "8000"), (LAYERS[1], "2x"), (LAYERS[2], "4x"),
                                           (LAYERS[3], "1.5x")])  # a full embedding keeps V x d of its own
def test_the_choice_fits_the_budget_and_is_the_model_built(tmp_path, model, budget):
    config = tiny_config(tmp_path, **model, budget=budget)
    choice = budget_choice(config, _counts())
    assert choice.params <= choice.target
    if budget.endswith("x"):
        assert choice.target == int(choice.baseline / float(budget[:-1]))
    built = build_model(config, _counts())
    assert _count(built) == choice.params
    assert (built.cutoffs, built.ranks) == (choice.cutoffs, choice.ranks)
    assert choice.ranks[0] == 8 and list(choice.ranks) == sorted(choice.ranks, reverse=True)
    assert choice.cutoffs[-1] == V and 2 <= len(choice.cutoffs) <= solver.MAX_CLUSTERS
    assert 0 < choice.softmax_macs <= choice.full_softmax_macs


def test_more_budget_gives_more_rank_to_the_traffic(tmp_path):
    shares = [budget_choice(tiny_config(tmp_path, embedding="blockwise", softmax="tree", budget=b), _counts()).rank_share
              for b in ("6x", "3x", "1.5x")]
    assert shares == sorted(shares) and shares[0] < shares[-1]


def test_solver_is_deterministic_and_prefers_the_cheaper_of_equals():
    layers = solver.Layers(30_000, 64, "blockwise", "tree")
    counts = zipf_counts(30_000, 1.0) * 1e6
    a = solver.solve(layers, counts, 468_146, 60_000, 4_089_728)
    b = solver.solve(layers, counts, 468_146, 60_000, 4_089_728)
    assert a == b and a.params <= 468_146
    # Against every candidate with (about) the best objective, the choice is the cheapest output layer.
    others = []
    for cuts in solver._candidate_cutoffs(counts):
        try:
            others.append(solver.solve(layers, counts, 468_146, 60_000, 4_089_728, cutoffs=cuts))
        except ConfigError:  # this clustering cannot fit the budget at all
            continue
    top = max(o.rank_share for o in others)
    assert a.rank_share >= top - solver.NEAR_BEST * top
    assert all(o.softmax_macs >= a.softmax_macs for o in others if o.rank_share >= top - solver.NEAR_BEST * top)


def test_explicit_cutoffs_and_ranks_still_win(tmp_path):
    counts = _counts()
    only_cutoffs = tiny_config(tmp_path, embedding="blockwise", softmax="tree", budget="3x", cutoffs=(300, 900))
    cutoffs, ranks = model_clusters(only_cutoffs, counts)
    assert cutoffs == (300, 900, V) and ranks[0] == 8 and len(ranks) == 3
    assert budget_choice(only_cutoffs, counts).params <= budget_choice(only_cutoffs, counts).target
    both = tiny_config(tmp_path, embedding="blockwise", softmax="tree", budget="3x", cutoffs=(300, 900), ranks=(8, 8, 8))
    assert model_clusters(both, counts) == ((300, 900, V), (8, 8, 8))


@pytest.mark.parametrize("budget, message", [
    ("0.5x", "below 1x"),
    ("lots", "is invalid"),
    ("100", "cannot be reached: the smallest model of this config has"),
    ("1000x", "give a budget of at least"),
])
def test_impossible_budgets_are_one_line_errors(tmp_path, budget, message):
    config = tiny_config(tmp_path, embedding="blockwise", softmax="tree", budget=budget)
    with pytest.raises(ConfigError, match=message) as err:
        build_model(config, _counts())
    assert "\n" not in str(err.value)


def test_unreachable_budget_names_the_smallest_reachable_one(tmp_path):
    config = tiny_config(tmp_path, embedding="blockwise", softmax="tree", budget="100")
    with pytest.raises(ConfigError) as err:
        build_model(config, _counts())
    smallest = int(str(err.value).split("at least ")[1].split(" ")[0].replace(",", ""))
    ok = tiny_config(tmp_path, embedding="blockwise", softmax="tree", budget=str(smallest))
    assert budget_choice(ok, _counts()).params <= smallest
    too_small = tiny_config(tmp_path, embedding="blockwise", softmax="tree", budget=str(smallest - 1))
    with pytest.raises(ConfigError):
        build_model(too_small, _counts())


def test_ranks_without_cutoffs_and_budget_without_clusters_are_refused(tmp_path):
    from cprec.config import validate_config
    with pytest.raises(ConfigError, match="model.ranks needs model.cutoffs"):
        build_model(tiny_config(tmp_path, embedding="blockwise", softmax="tree", budget="2x", ranks=(8, 2)), _counts())
    with pytest.raises(ConfigError, match="needs a compressed layer to size"):
        validate_config(tiny_config(tmp_path, budget="2x"))


@pytest.mark.slow
def test_a_run_records_the_choice_and_loads_back_the_same_model(tmp_path, capsys):
    config = tiny_config(tmp_path / "data", embedding="blockwise", softmax="tree", budget="1.5x")  # 61 ids
    workdir = tmp_path / "run"
    train_and_evaluate(config, workdir)
    assert "budget " in capsys.readouterr().out
    stored = json.loads((workdir / "config.json").read_text())
    choice = stored["budget"]
    assert stored["report"]["params/total"] == choice["params"] <= choice["target"] == stored["report"]["params/budget"]
    # load_run pins the recorded cutoffs and ranks: the same model whatever the solver would say today.
    assert tuple(run_config(workdir).model.cutoffs) == tuple(choice["cutoffs"][:-1])
    run = load_run(workdir)
    assert (list(run.model.cutoffs), list(run.model.ranks)) == (choice["cutoffs"], choice["ranks"])
    train_and_evaluate(config, workdir)  # a finished run with a budget is recognised, not refused


def test_config_file_budget_arg_replaces_the_hand_set_clusters():
    from experiments.cprec import get_config
    m = get_config("synthetic30k,budget=20x").model
    assert (m.budget, tuple(m.cutoffs), tuple(m.ranks)) == ("20x", (), ())
    assert get_config("synthetic30k").model.budget == ""
