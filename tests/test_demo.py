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
    plans = ["merge_configs/demo/best/task_arithmetic.yml", "merge_configs/demo/best/iso_c.yml"]
    report = evaluate([os.path.join(REPO, x) for x in labels + plans], TASKS, device="cpu")
    for label, row in zip(labels + [f"output of {p}" for p in plans], report.rows):
        want = recorded(label)
        for task, scores in row.scores.items():
            for metric in ("exact_match", "char_accuracy"):
                assert scores[metric] == pytest.approx(want[task][metric], abs=TOLERANCE), (label, task, metric)


# -- parity with mergekit 0.1.5 ------------------------------------------------------------------

def test_mergekit_merges_of_the_best_plans_score_like_ours(tmp_path):
    from test_parity_mergekit import MERGEKIT, run_mergekit

    if not (MERGEKIT and os.path.exists(MERGEKIT)):
        pytest.skip("mergekit-yaml not found (set MERGEKIT_YAML to run the parity tests)")
    from mergekit_lite.quality.evaluate import evaluate

    shutil.copytree(os.path.join(DEMO, "models"), tmp_path / "models")
    jobs, ours = [], []
    for method in ("task_arithmetic", "ties"):
        plan = tmp_path / "best" / f"{method}.yml"
        plan.parent.mkdir(exist_ok=True)
        shutil.copy(os.path.join(DEMO, "best", f"{method}.yml"), plan)
        jobs.append((str(plan), str(tmp_path / f"mk-{method}"), []))
        ours.append(str(plan))
    run_mergekit(jobs, str(tmp_path))
    report = evaluate(ours + [out for _, out, _ in jobs], TASKS, device="cpu")
    half = len(ours)
    for mine, theirs in zip(report.rows[:half], report.rows[half:]):
        for task in mine.scores:
            assert mine.scores[task]["exact_match"] == pytest.approx(theirs.scores[task]["exact_match"], abs=0.004)
