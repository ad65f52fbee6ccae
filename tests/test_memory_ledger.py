"""The memory ledger: the peak planned at compile time is the peak the executor accounts, and the
bytes measured on the real tensors (method temporaries included) never exceed it.

Every example plan (one or more per method) runs on float32 and on bfloat16 inputs under a budget
equal to its largest planned group, with the executor measuring each merge's allocations
(``Executor(measure=True)``, an allocation probe over every torch operation). For every group:

    measured ≤ planned == accounted ≤ budget

where `planned` comes from the compiler (``Compiled.needs``, a dry run of :class:`Ledger`) and
`accounted` is the peak of the ledger the executor drove while running the group. The same holds
with tensors streamed in row blocks (statistics swept and carried across groups). A method that
under-declares its workspace, or a planner that computed the peak by other rules than the ones
the executor applies, fails here.
"""

from __future__ import annotations

import glob
import os
import shutil
import time

import pytest
import torch

from mergekit_lite import methods
from mergekit_lite.examples import save_model
from mergekit_lite.executor import Executor
from mergekit_lite.graph import Compiled, Emit, Load, assemble
from mergekit_lite.io.writer import ShardedWriter
from mergekit_lite.merge import Options, compile_plan
from mergekit_lite.nodes import NodeBase, Pick, Spec, node_kind
from mergekit_lite.methods.draws import Draws

from conftest import REPO, load_dir

CONFIGS = os.path.join(REPO, "merge_configs")
PLANS = sorted(glob.glob(os.path.join(CONFIGS, "*.yml")))


@pytest.fixture(scope="module")
def bf16_configs(tmp_path_factory):
    """The example plans next to bfloat16 copies of the example models."""
    root = tmp_path_factory.mktemp("bf16")
    for name in os.listdir(os.path.join(CONFIGS, "models")):
        src = os.path.join(CONFIGS, "models", name)
        tensors = {k: v.to(torch.bfloat16) for k, v in load_dir(src).items()}
        import json

        config = json.load(open(os.path.join(src, "config.json")))
        save_model(str(root / "models" / name), tensors, config, max_shard_bytes=200_000)
    for plan in PLANS:
        shutil.copy(plan, root)
    shutil.copytree(os.path.join(CONFIGS, "adapters"), root / "adapters")  # float32 adapters of a bf16 base
    return str(root)


def run_measured(compiled: Compiled, budget: int, tmp: str):
    writers = {}
    for spec in compiled.outputs:
        folder = os.path.join(tmp, spec.key.strip("/").replace("/", "_") or "out")
        os.makedirs(folder, exist_ok=True)
        writers[spec.key] = ShardedWriter(folder, spec.layout)
    stats = Executor(compiled, device="cpu", budget=budget, writers=writers, measure=True).execute()
    for w in writers.values():
        w.finish()
    return stats


def check_peaks(compiled: Compiled, stats, budget: int) -> None:
    assert len(stats.groups) == len(compiled.groups)
    planned = dict(zip((g for g, _ in compiled.groups), compiled.needs))
    for g in stats.groups:
        assert g.planned == planned[g.group]
        assert g.accounted == g.planned, g.group  # the executor drove the ledger that planned it
        assert 0 < g.measured <= g.planned <= budget, (g.group, g.measured, g.planned)
    assert 0 < stats.peak_live_bytes <= stats.peak_reserved_bytes <= budget


def test_every_method_has_an_example_plan():
    used = {line.split(":", 1)[1].strip() for p in PLANS for line in open(p) if line.startswith("merge_method:")}
    assert set(methods.names()) <= used


@pytest.mark.parametrize("inputs", ["float32", "bfloat16"])
@pytest.mark.parametrize("plan", [os.path.basename(p) for p in PLANS])
def test_measured_peak_within_planned_within_budget(plan, inputs, bf16_configs, tmp_path):
    path = os.path.join(CONFIGS if inputs == "float32" else bf16_configs, plan)
    compiled = compile_plan(path, Options())
    budget = compiled.max_need  # as tight as the plan allows
    stats = run_measured(compiled, budget, str(tmp_path))
    check_peaks(compiled, stats, budget)


STREAMED = [(os.path.basename(p), "bfloat16") for p in PLANS] + [(p, "float32") for p in
                                                                ("ties.yml", "slerp.yml", "multistep.yml")]


@pytest.mark.parametrize("plan,inputs", STREAMED)
def test_streamed_measured_peak_within_planned_within_budget(plan, inputs, bf16_configs, tmp_path):
    """The same, with large tensors cut into row blocks: statistics swept over the blocks and
    carried from group to group, blocks merged in tiles."""
    path = os.path.join(CONFIGS if inputs == "float32" else bf16_configs, plan)
    compiled = compile_plan(path, Options(block_size=4 * 3000))
    budget = compiled.max_need
    stats = run_measured(compiled, budget, str(tmp_path))
    check_peaks(compiled, stats, budget)


def test_a_method_that_under_declares_its_workspace_is_caught(tmp_path):
    """The test above can fail: a method allocating more than it declares is measured over plan."""
    name = "_greedy_test_method"

    @methods.register(name, base="none", workspace=lambda n: 1.0)
    def greedy(tensors, base):
        scratch = [t.to(torch.float32) * 2 for t in tensors for _ in range(4)]
        return sum(scratch) / len(scratch)

    try:
        plan = tmp_path / "p.yml"
        plan.write_text(f"merge_method: {name}\nmodels:\n  - model: {CONFIGS}/models/ft_math\n"
                        f"  - model: {CONFIGS}/models/ft_code\n")
        compiled = compile_plan(str(plan), Options())
        stats = run_measured(compiled, compiled.max_need, str(tmp_path))
        assert any(g.measured > g.planned for g in stats.groups)
    finally:
        del methods.REGISTRY[name]


# -- a new node kind is one class ------------------------------------------------------------------

@node_kind
class _SVD(NodeBase):
    """Two outputs from one computation: U·diag(S) and Vh of a matrix (a factorisation)."""

    def __init__(self, value, group):
        self.value, self.group = value, group

    @property
    def args(self):
        return (self.value,)

    @property
    def outputs(self):
        m, n = self.value.shape
        k = min(m, n)
        return (Spec("us", (m, k), torch.float32), Spec("vh", (k, n), torch.float32))

    @property
    def workspace_bytes(self):
        m, n = self.value.shape
        return 4 * (m * n + 3 * (m + n) * min(m, n))  # the float32 copy, LAPACK's factors and scratch

    def run(self, ctx, args):
        with ctx.measuring():
            u, s, vh = torch.linalg.svd(args[0].to(torch.float32), full_matrices=False)
            return (u * s, vh)


def test_a_two_output_node_runs_through_the_same_executor_and_ledger():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    load_path = os.path.join(REPO, "merge_configs", "models", "base")
    name = "model.layers.0.mlp.down_proj.weight"
    from mergekit_lite.io.reader import open_model

    meta = open_model(load_path).tensors[name]
    load = Load(meta.file, name, "g", meta.shape, meta.dtype, "base", meta.offset)
    svd = _SVD(load, "g")
    sinks = [Emit("us", Pick(svd, 0, "g"), torch.float32, "g"), Emit("vh", Pick(svd, 1, "g"), torch.float32, "g")]
    graph, groups, needs = assemble(sinks)
    compiled = Compiled(None, graph, groups, needs, None, (), ())
    ex = Executor(compiled, device="cpu", measure=True)
    got = dict(ex.run())
    original = load_dir(load_path)[name]
    assert torch.allclose(got["us"] @ got["vh"], original, atol=1e-5)
    check_peaks(compiled, ex.stats, ex.budget.limit)
    del w


# -- every method's declared workspace, over its options ------------------------------------------

# values that make every part of a method work (defaults such as density 1 skip the sparsifier)
VALUES = {"weight": 0.7, "t": 0.3, "density": 0.5, "epsilon": 0.1, "lambda": 1.0, "scale": 1.0, "gamma": 0.01,
          "select_topk": 0.5}


def _option_sets(method):
    """Every combination of the method's bool and choice parameters (the rest at defaults)."""
    import itertools

    axes = []
    for p in method.params:
        if p.kind is bool:
            axes.append([(p, False), (p, True)])
        elif p.choices:
            axes.append([(p, c) for c in p.choices])
    for combo in itertools.product(*axes):
        yield dict((p.name, v) for p, v in combo)


def _kwargs(method, n, chosen, seed):
    kw = {}
    for p in method.params:
        v = chosen.get(p.name, VALUES.get(p.name, p.default))
        kw[p.pyname] = [v] * n if p.scope == "model" else v
    if method.random:
        kw["draws"] = [Draws(seed + i) for i in range(n)]
    return kw


@pytest.mark.parametrize("name", methods.names())
def test_declared_workspace_covers_measured_allocations(name):
    from mergekit_lite.probe import AllocationProbe

    method = methods.get(name)
    counts = [n for n in (1, 2, 3) if n >= method.min_models and (method.max_models is None or n <= method.max_models)]
    worst = []
    for rows, dtype, n in [(r, d, n) for r in (3, 64) for d in (torch.float32, torch.bfloat16) for n in counts]:
        g = torch.Generator().manual_seed(rows * 10 + n)
        ts = [torch.randn(rows, 256, generator=g).to(dtype) for _ in range(n)]
        base = torch.randn(rows, 256, generator=g).to(dtype) if method.base != "none" else None
        for chosen in _option_sets(method):
            probe = AllocationProbe(ts + ([base] if base is not None else []))
            try:
                with probe:
                    del_me = method.fn(ts, base, **_kwargs(method, n, chosen, rows))
                    del del_me
            except Exception as exc:  # an option combination the method refuses
                assert "must" in str(exc) or "density" in str(exc), (name, chosen, exc)
                continue
            declared = method.workspace_bytes(n + (base is not None), rows * 256)
            if probe.peak > declared:
                worst.append((rows, str(dtype), n, chosen, probe.peak / (rows * 1024), declared / (rows * 1024)))
    assert not worst, worst[:5]


def test_a_group_that_has_run_keeps_only_what_its_pending_writes_hold(tmp_path):
    """While the writer is still busy with a group's tensor, the group's reservation has already
    shrunk from its planned peak to the bytes that write holds, so the next groups can be admitted
    (a slow disk does not serialise reading and merging behind it)."""
    compiled = compile_plan(os.path.join(CONFIGS, "ties.yml"), Options())
    first_need = compiled.needs[0]
    writer = ShardedWriter(str(tmp_path), compiled.outputs[0].layout)
    executor = Executor(compiled, device="cpu", budget=2 * compiled.max_need, writers={"": writer})
    seen = []
    write = writer.write

    def slow_write(name, tensor, *args):
        if not seen:  # the first write waits until its group's reservation has shrunk, at most 5 s
            deadline = time.time() + 5
            while executor.budget.used >= first_need and time.time() < deadline:
                time.sleep(0.005)
            seen.append(executor.budget.used)
        write(name, tensor, *args)

    writer.write = slow_write
    executor.execute()
    writer.finish()
    assert seen[0] < first_need, (seen, first_need)
    assert executor.budget.used == 0  # every reservation returned in the end
