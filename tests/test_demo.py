"""The demo (merge_configs/demo): the shipped models' accuracies reproduce from their weights, the
task splits are what the training script writes, the plans and what search found run, and (with
mergekit installed) mergekit 0.1.5's merges of the same plans score what ours score."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from mergekit_lite import demo
from mergekit_lite.plan.schema import load_plan

from conftest import REPO

DEMO = os.path.join(REPO, "merge_configs", "demo")
TASKS = [os.path.join(DEMO, "tasks", f"{t}.test.jsonl") for t in demo.TASKS]
RECORDED = json.load(open(os.path.join(DEMO, "accuracy.json"), encoding="utf-8"))
TOLERANCE = 0.02  # absolute, per task: other BLAS builds may flip a near-tie or two


def recorded(label: str) -> dict:
    return next(m for m in RECORDED["models"] if m["label"] == label)["scores"]


def test_task_splits_are_what_the_training_script_writes(tmp_path):
    demo.write_splits(str(tmp_path), seed=0)
    for name in os.listdir(os.path.join(DEMO, "tasks")):
        assert (tmp_path / "tasks" / name).read_text() == open(os.path.join(DEMO, "tasks", name)).read(), name
    held_out = {json.loads(line)["prompt"] for name in os.listdir(tmp_path / "tasks")
                for line in open(tmp_path / "tasks" / name)}
    rng = random.Random(0)
    drawn = [demo.TASKS[t](rng) for t in demo.TASKS for _ in range(200)]
    assert all(a == _solve(p) for p, a in drawn)  # the generators answer correctly
    assert len(held_out) == 3 * 500


def _solve(prompt: str) -> str:
    op, arg = prompt[:-1].split(":")
    if op == "rev":
        return arg[::-1]
    if op == "srt":
        return "".join(sorted(arg))
    a, b = arg.split("+")
    return str(int(a) + int(b))


def test_every_demo_plan_and_best_plan_is_valid():
    plans = [os.path.join(DEMO, p) for p in os.listdir(DEMO) if p.endswith(".yml")]
    best = [os.path.join(DEMO, "best", p) for p in os.listdir(os.path.join(DEMO, "best"))]
    assert len(plans) == len(best) == 8
    for p in plans:
        assert load_plan(p).output.search, p
    for p in best:
        assert not load_plan(p).output.search, p


transformers = pytest.importorskip("transformers")


def test_shipped_models_and_merges_reproduce_their_recorded_accuracies():
    from mergekit_lite.quality.evaluate import evaluate

    labels = ["merge_configs/demo/models/base", "merge_configs/demo/models/add"]
    plans = ["merge_configs/demo/best/tsv.yml"]
    report = evaluate([os.path.join(REPO, x) for x in labels + plans], TASKS, device="cpu")
    for label, row in zip(labels + [f"output of {p}" for p in plans], report.rows):
        want = recorded(label)
        for task, scores in row.scores.items():
            for metric in ("exact_match", "char_accuracy"):
                assert scores[metric] == pytest.approx(want[task][metric], abs=TOLERANCE), (label, task, metric)


# -- parity with mergekit 0.1.5 ------------------------------------------------------------------

def test_mergekit_merges_of_the_best_plans_score_like_ours(tmp_path):
    """Task arithmetic and TIES: the same answers (the merges agree to float32 rounding); DARE: our
    seed-0 merge scores within the spread of mergekit's seeds 0-2 (both draw random masks)."""
    from test_parity_mergekit import MERGEKIT, run_mergekit

    if not (MERGEKIT and os.path.exists(MERGEKIT)):
        pytest.skip("mergekit-yaml not found (set MERGEKIT_YAML to run the parity tests)")
    from mergekit_lite.quality.evaluate import evaluate

    shutil.copytree(os.path.join(DEMO, "models"), tmp_path / "models")
    shutil.copytree(os.path.join(DEMO, "best"), tmp_path / "best")
    plan = {m: str(tmp_path / "best" / f"{m}.yml") for m in ("task_arithmetic", "ties", "dare_linear")}
    jobs = [(plan["task_arithmetic"], str(tmp_path / "mk-ta"), []), (plan["ties"], str(tmp_path / "mk-ties"), [])]
    jobs += [(plan["dare_linear"], str(tmp_path / f"mk-dare-{s}"), ["--random-seed", str(s)]) for s in range(3)]
    run_mergekit(jobs, str(tmp_path))  # without tokenizer files: the base's are the same for all
    for _, out, _ in jobs:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tmp_path / "models" / "base" / name, out)
    ours = [plan["task_arithmetic"], plan["ties"], plan["dare_linear"]]
    report = evaluate(ours + [out for _, out, _ in jobs], TASKS, device="cpu", limit=100)
    rows = report.rows
    for mine, theirs in ((rows[0], rows[3]), (rows[1], rows[4])):
        assert mine.scores == theirs.scores, mine.label
    spread = [r.mean("exact") for r in rows[5:]]
    assert min(spread) - 0.02 <= rows[2].mean("exact") <= max(spread) + 0.02, (rows[2].mean("exact"), spread)
