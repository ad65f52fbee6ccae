"""``mergekit-lite search``: known optima (a toy objective on merged tensors, and a task whose answer
flips at λ = 0.5), the grid and the seeded sampler, resuming, failed candidates, the search:
section's checks, and the best plan written elsewhere still running."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mergekit_lite.cli import main
from mergekit_lite.errors import MergeError, PlanError
from mergekit_lite.executor import Executor
from mergekit_lite.merge import Options, compile_plan
from mergekit_lite.plan.schema import load_plan, parse_plan
from mergekit_lite.quality.search import candidates, search, space_of

from conftest import REPO, load_dir, write_plan

MODELS = os.path.join(REPO, "merge_configs", "models")
NAME = "model.layers.1.mlp.up_proj.weight"


def merged(recipe, name=NAME) -> torch.Tensor:
    compiled = compile_plan(recipe, Options(device="cpu"), sink="emit", only=[name])
    return dict(Executor(compiled, device="cpu").run())[name]


@pytest.fixture(scope="module")
def inputs():
    return {m: load_dir(os.path.join(MODELS, m))[NAME] for m in ("base", "ft_math", "ft_code")}


def soup_plan(tmp_path, search_section: str = "") -> str:
    return write_plan(tmp_path, f"""\
        merge_method: linear
        models:
          - model: {MODELS}/ft_math
            parameters: {{weight: 0.5}}
          - model: {MODELS}/ft_code
            parameters: {{weight: 0.5}}
        {search_section}""")


def distance_to(target):
    """The toy objective: −‖merged − target‖² on one tensor (maximal, 0, at the target)."""
    return lambda recipe: -float(((merged(recipe) - target) ** 2).sum())


def test_grid_finds_the_known_optimum_of_a_toy_objective(tmp_path, inputs):
    plan = soup_plan(tmp_path, """search:
          models[0].weight: {min: 0.1, max: 0.9, step: 0.1}
          models[1].weight: [0.1, 0.3, 0.5, 0.7, 0.9]
        """)
    target = 0.3 * inputs["ft_math"] + 0.7 * inputs["ft_code"]  # weights 0.3 : 0.7 (normalised)
    result = search(plan, objective=distance_to(target))
    assert len(result.trials) == 9 * 5 and result.strategy == "grid"
    assert result.best.params == {"models[0].weight": 0.3, "models[1].weight": 0.7}
    assert result.best.score == pytest.approx(0.0, abs=1e-9)
    best = parse_plan(result.plan_text, plan)
    assert [m.parameters["weight"] for m in best.output.models] == [0.3, 0.7] and not best.output.search


def test_the_random_strategy_is_seeded_and_budgeted(tmp_path, inputs):
    plan = soup_plan(tmp_path, """search:
          models[0].weight: {min: 0.1, max: 0.9, step: 0.1}
          models[1].weight: {min: 0.0, max: 1.0}
        """)
    dims = space_of(load_plan(plan))
    first = list(candidates(dims, "random", 12, seed=3))
    assert first == list(candidates(dims, "random", 12, seed=3)) != list(candidates(dims, "random", 12, seed=4))
    assert len(first) == len({json.dumps(c, sort_keys=True) for c in first}) == 12
    assert all(c["models[0].weight"] in dims[0].values and 0 <= c["models[1].weight"] <= 1 for c in first)
    with pytest.raises(MergeError, match="the grid needs values or a step for models\\[1\\].weight"):
        list(candidates(dims, "grid", None, 0))
    # the whole finite space fits the budget: the sampler draws every point once, and finds the optimum
    plan2 = soup_plan(tmp_path, """search:
          models[0].weight: [0.2, 0.4, 0.6]
          models[1].weight: [0.2, 0.4, 0.6]
        """)
    target = 0.4 * inputs["ft_math"] + 0.6 * inputs["ft_code"]
    result = search(plan2, objective=distance_to(target), strategy="random", budget=100, seed=1)
    assert len(result.trials) == 9 and result.best.params == {"models[0].weight": 0.4, "models[1].weight": 0.6}


def test_results_are_resumable_and_tied_to_their_search(tmp_path, inputs):
    plan = soup_plan(tmp_path, "search:\n          models[0].weight: [0.2, 0.5, 0.8]\n")
    results = str(tmp_path / "r.jsonl")
    target = 0.8 * inputs["ft_math"] + 0.5 * inputs["ft_code"]
    first = search(plan, objective=distance_to(target), results=results)
    lines = open(results).read().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["search"]["strategy"] == "grid"

    def never(recipe):
        raise AssertionError("a finished candidate was run again")

    again = search(plan, objective=never, results=results)
    assert again.best.params == first.best.params == {"models[0].weight": 0.8}
    with open(results, "a") as fh:  # an interrupted write leaves half a line
        fh.write('{"params": {"models[0].wei')
    assert search(plan, objective=never, results=results).best.params == {"models[0].weight": 0.8}
    other = soup_plan(tmp_path, "search:\n          models[0].weight: [0.2, 0.5]\n")
    with pytest.raises(MergeError, match="holds the results of another search \\(plan_sha256 differ\\)"):
        search(other, objective=never, results=results)


def test_candidates_the_plan_checks_refuse_are_recorded_not_fatal(tmp_path, inputs):
    plan = write_plan(tmp_path, f"""\
        merge_method: della
        base_model: {MODELS}/base
        models:
          - model: {MODELS}/ft_math
          - model: {MODELS}/ft_code
        parameters:
          weight: 1.0
          epsilon: 0.3
        search:
          density: [0.2, 0.5]
        """)
    result = search(plan, objective=lambda recipe: float(merged(recipe).abs().sum()))
    bad, good = result.trials  # density 0.2 − epsilon 0.3 < 0
    assert "density" in bad.error and bad.score is None
    assert good.error is None and result.best is good


def test_search_section_problems_are_plan_errors_with_lines(tmp_path):
    plan = soup_plan(tmp_path, """search:
          lambda: [1.0]
          models[0].weight: [0.5, "heavy"]
          models[1].weight: {min: 0.9, max: 0.1}
        """)
    with pytest.raises(PlanError) as err:
        load_plan(plan)
    got = [(i.line, i.path) for i in err.value.issues]
    assert got == [(8, "search.lambda"), (9, "search.models[0].weight[1]"), (10, "search.models[1].weight")]
    assert "merge method 'linear' has no parameter 'lambda'" in err.value.issues[0].message


def test_run_ignores_the_search_section_and_says_so(tmp_path, capsys):
    plan = soup_plan(tmp_path, "search:\n          models[0].weight: [0.2, 0.5]\n")
    assert main(["run", plan, str(tmp_path / "out"), "-q"]) == 0
    assert "the search: section is for mergekit-lite search" in capsys.readouterr().err


# -- end to end on task files ----------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def test_cli_search_finds_where_the_answer_flips_and_the_best_plan_runs_elsewhere(tmp_path, monkeypatch, capsys):
    """Base continues 'b=' with 'xy', the fine-tune with 'y': the logits of x and y are (1−λ)s and λs,
    so the answer 'y' is right from λ > 0.5 on; the first grid value past it wins."""
    from quality_helpers import NEXT, save_successor

    base = save_successor(str(tmp_path / "models" / "base"))
    tuned = save_successor(str(tmp_path / "models" / "tuned"), mapping={**NEXT, "=": "y"})
    (tmp_path / "val.jsonl").write_text(json.dumps({"prompt": "b=", "answer": "y"}) + "\n")
    write_plan(tmp_path, """\
        merge_method: task_arithmetic
        base_model: models/base
        models:
          - model: models/tuned
            parameters: {weight: 1.0}
        search:
          lambda: [0.2, 0.4, 0.6, 0.8, 1.0]
        """)
    monkeypatch.chdir(tmp_path)
    assert main(["search", "plan.yml", "--tasks", "val.jsonl", "--device", "cpu",
                                   "--out-plan", "found/best.yml", "--merge", "merged", "-q"]) == 0
    out = capsys.readouterr().out
    assert 'best of 5 candidates (grid): {"lambda": 0.6}  exact 1.0000' in out
    records = [json.loads(line) for line in open("plan.search.jsonl")]
    assert [r["metrics"]["exact"] for r in records[1:]] == [0.0, 0.0, 1.0, 1.0, 1.0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", "../found/best.yml", "again", "-q"]) == 0
    want = load_dir(str(tmp_path / "merged"))
    got = load_dir(str(elsewhere / "again"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    head = load_dir(base)["lm_head.weight"] + 0.6 * (load_dir(tuned)["lm_head.weight"] - load_dir(base)["lm_head.weight"])
    assert torch.allclose(got["lm_head.weight"], head)


def test_command_line_parameters_join_the_plans_section(tmp_path):
    from mergekit_lite.plan.space import parse_cli

    assert parse_cli("lambda=0.5,1,1.5") == ("lambda", [0.5, 1, 1.5])
    assert parse_cli("models[1].weight=0.1:0.9:0.2") == ("models[1].weight", {"min": 0.1, "max": 0.9, "step": 0.2})
    assert parse_cli("sign_election=sum,count") == ("sign_election", ["sum", "count"])
    with pytest.raises(ValueError):
        parse_cli("lambda")
    plan = write_plan(tmp_path, f"""\
        name: soup
        merge_method: linear
        models:
          - model: {MODELS}/ft_math
            parameters: {{weight: 0.5}}
          - model: {MODELS}/ft_code
            parameters: {{weight: 0.5}}
        search:
          models[0].weight: [0.2, 0.8]
        ---
        merge_method: task_arithmetic
        base_model: {MODELS}/base
        models:
          - model: soup
            parameters: {{weight: 1.0}}
        """)
    recipe = load_plan(plan)
    dims = space_of(recipe, ["lambda=0.5:1.0:0.25", "soup/models[1].weight=0.3"])
    assert [(d.key, d.values) for d in dims] == [("soup/models[0].weight", (0.2, 0.8)),
                                                   ("lambda", (0.5, 0.75, 1.0)), ("soup/models[1].weight", (0.3,))]
    with pytest.raises(MergeError, match="--param nope/lambda: the plan has no step named 'nope'"):
        space_of(recipe, ["nope/lambda=1"])
    with pytest.raises(MergeError, match="--param density: merge method 'task_arithmetic' has no parameter"):
        space_of(recipe, ["density=0.5"])
    from mergekit_lite.quality.search import candidate_text

    text = candidate_text(recipe, dims, {"soup/models[0].weight": 0.2, "lambda": 0.75, "soup/models[1].weight": 0.3})
    steps = parse_plan(text, plan).steps
    assert [m.parameters["weight"] for m in steps[0].models] == [0.2, 0.3]
    assert steps[1].parameters["lambda"] == 0.75 and not any(s.search for s in steps)
