"""DARE (dare_linear, dare_ties) and DELLA (della, della_linear): the drop/rescale steps, the
paper's formulas in numpy float64 given the same masks, statistics on 10^6 entries, and seeding."""

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite import cli, methods
from mergekit_lite.errors import PlanError
from mergekit_lite.methods.dare import dare_linear, dare_ties
from mergekit_lite.methods.della import della, della_linear
from mergekit_lite.methods.draws import Draws
from mergekit_lite.methods.drops import bernoulli_mask, drop_and_rescale, magprune
from mergekit_lite.methods.task_arithmetic import task_arithmetic
from mergekit_lite.methods.ties import ties

from conftest import load_dir, write_plan


def gens(*seeds):
    return [Draws(s) for s in seeds]


def np_uniforms(seed, n):
    """The draws in plain numpy: the j-th 32-bit word of PCG64(seed) (low half of each 64-bit
    output first) read as a signed integer w, u = floor((w + 2^31) / 2^8) / 2^24."""
    words = np.random.PCG64(seed).random_raw((n + 1) // 2).view(np.int32)[:n]
    return ((words.astype(np.int64) + 2 ** 31) >> 8).astype(np.float64) / 2.0 ** 24


gen = torch.Generator().manual_seed(5)
BASE = torch.randn(30, 20, generator=gen)
MODELS = [BASE + 0.05 * torch.randn(30, 20, generator=gen) for _ in range(3)]


# -- DARE ---------------------------------------------------------------------------------------

def test_drop_and_rescale_survivors_are_divided_by_density():
    tau = torch.tensor([2.0, -4.0, 6.0, 8.0, -1.0, 3.0])
    kept = drop_and_rescale(tau, 0.5, gens(3)[0])
    out = kept.apply_(tau.clone())
    mask = kept.mask.bool()
    assert out[mask].tolist() == (tau[mask] * 2).tolist() and (out[~mask] == 0).all()
    assert drop_and_rescale(tau, 1.0, gens(3)[0]) is None


def test_dare_linear_hand_worked_with_a_pinned_seed():
    """Pins the mask stream: seed 1 draws u = 0.9732, 0.0118, 0.2552, 0.4505, 0.5349, 0.6442 (np_uniforms), so at
    density 0.5 entries 1, 2 and 3 survive (u < 0.5), doubled; a changed stream fails here."""
    base = torch.ones(6)
    model = base + torch.tensor([2.0, -4.0, 6.0, 8.0, -1.0, 3.0])
    out = dare_linear([model], base, weight=[0.5], density=[0.5], draws=gens(1))
    # θ = 1 + 0.5·(m ⊙ τ / 0.5) = 1 + m ⊙ τ
    assert out.tolist() == [1.0, -3.0, 7.0, 9.0, 1.0, 1.0]


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_a_fraction_within_one_percent_of_density(density):
    mask = bernoulli_mask((1000, 1000), density, Draws(17))
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    assert abs(mask.float().mean().item() - density) < 0.01 * density


def test_dare_expectation_equals_the_undropped_delta():
    # on 10^6 entries: the mean of τ̂ matches the mean of τ (σ of the estimate ~1e-3 relative)
    g = torch.Generator().manual_seed(2)
    tau = 1.0 + 0.5 * torch.rand(1_000_000, generator=g)
    out = drop_and_rescale(tau, 0.3, Draws(2)).apply_(tau.clone())
    assert abs(out.double().mean().item() / tau.double().mean().item() - 1) < 0.01
    # entry by entry: the average over many independent draws converges to τ
    small = torch.tensor([0.5, -1.0, 2.0, 0.25]).repeat(4000, 1)  # 4000 independent draws per column
    draws = drop_and_rescale(small, 0.4, Draws(6)).apply_(small.clone())
    np.testing.assert_allclose(draws.double().mean(0).numpy(), small[0].numpy(), rtol=0.08)


def test_dare_l1_option_preserves_the_l1_norm():
    tau = torch.randn(10_000, generator=torch.Generator().manual_seed(4))
    out = drop_and_rescale(tau, 0.3, gens(1)[0], mode="l1").apply_(tau.clone())
    assert abs(out.abs().sum().item() / tau.abs().sum().item() - 1) < 1e-5
    plain = drop_and_rescale(tau, 0.3, gens(1)[0], rescale=False).apply_(tau.clone())
    assert torch.equal(plain != 0, out != 0)  # same mask, only the scale differs


def np_masks(seeds, shape, densities):
    """The masks the methods draw: u < density, u from :func:`np_uniforms`."""
    n = int(np.prod(shape))
    return [np_uniforms(s, n).reshape(shape) < d for s, d in zip(seeds, densities)]


def test_dare_linear_matches_numpy_formula_given_the_masks():
    w, d = [0.6, -0.3, 1.1], [0.5, 0.2, 0.9]
    out = dare_linear(MODELS, BASE, weight=w, density=d, draws=gens(1, 2, 3), lambda_=0.8)
    base = BASE.double().numpy()
    masks = np_masks([1, 2, 3], BASE.shape, d)
    ref = base + 0.8 * sum(wi * m * (x.double().numpy() - base) / di
                           for wi, m, x, di in zip(w, masks, MODELS, d))
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_dare_ties_matches_numpy_formula_given_the_masks():
    w, d = [1.0, 0.7, 0.5], [0.5, 0.5, 0.8]
    out = dare_ties(MODELS, BASE, weight=w, density=d, draws=gens(4, 5, 6), normalize=True)
    base = BASE.double().numpy()
    wt = [wi * m * (x.double().numpy() - base) / di
          for wi, m, x, di in zip(w, np_masks([4, 5, 6], BASE.shape, d), MODELS, d)]
    elected = np.where(sum(wt) >= 0, 1.0, -1.0)
    agree = [np.sign(x) == elected for x in wt]
    div = sum(np.where(a, wi, 0.0) for a, wi in zip(agree, w))
    ref = base + sum(np.where(a, x, 0.0) for a, x in zip(agree, wt)) / np.where(div == 0, 1, div)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_dare_at_density_one_is_task_arithmetic_and_ties():
    w = [0.6, -0.3, 1.1]
    ta = task_arithmetic(MODELS, BASE, weight=w, lambda_=0.7, normalize=False)
    assert torch.equal(dare_linear(MODELS, BASE, weight=w, density=[1.0] * 3, draws=gens(1, 2, 3),
                                   lambda_=0.7), ta)
    tt = ties(MODELS, BASE, weight=w, density=[1.0] * 3, normalize=False)
    assert torch.equal(dare_ties(MODELS, BASE, weight=w, density=[1.0] * 3, draws=gens(1, 2, 3)), tt)


def test_dare_same_seed_same_bits_different_seed_different_bits():
    kw = dict(weight=[1.0, 1.0], density=[0.5, 0.5])
    a = dare_ties(MODELS[:2], BASE, draws=gens(1, 2), **kw)
    b = dare_ties(MODELS[:2], BASE, draws=gens(1, 2), **kw)
    c = dare_ties(MODELS[:2], BASE, draws=gens(1, 3), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_ties_is_symmetric_in_model_order():
    w, d = [1.0, 0.5, 0.8], [0.5, 0.7, 0.6]
    out = dare_ties(MODELS, BASE, weight=w, density=d, draws=gens(1, 2, 3), normalize=True)
    p = [2, 0, 1]
    out2 = dare_ties([MODELS[i] for i in p], BASE, weight=[w[i] for i in p], density=[d[i] for i in p],
                     draws=gens(*[[1, 2, 3][i] for i in p]), normalize=True)
    torch.testing.assert_close(out, out2, rtol=1e-6, atol=1e-7)


# -- DELLA --------------------------------------------------------------------------------------

ROW = torch.tensor([0.1, -0.5, 0.3, 0.9, -0.2])
# ranks by |τ|: 0.1 -> 0, -0.2 -> 1, 0.3 -> 2, -0.5 -> 3, 0.9 -> 4;
# keep probability at density 0.5, epsilon 0.2: 0.3 + 0.4·r/4
ROW_P = [0.3, 0.6, 0.5, 0.7, 0.4]


def test_magprune_keep_frequencies_follow_the_magnitude_ranks():
    rows = ROW.repeat(6000, 1)  # each row is ranked on its own: 6000 independent draws per column
    freq = magprune(rows, 0.5, 0.2, Draws(8), rescale=False).mask.double().mean(0)
    np.testing.assert_allclose(freq.numpy(), ROW_P, atol=0.025)


def test_magprune_density_mode_divides_each_survivor_by_its_probability():
    kept = magprune(ROW, 0.5, 0.2, Draws(1), mode="density")
    out = kept.apply_(ROW.clone())
    for x, p, y in zip(ROW.tolist(), ROW_P, out.tolist()):
        assert y == 0.0 or y == pytest.approx(x / p, rel=1e-6)
    assert (out != 0).any()
    # unbiased: averaged over draws, τ̂ -> τ
    rows = ROW.repeat(6000, 1)
    mean = magprune(rows, 0.5, 0.2, Draws(9), mode="density").apply_(rows.clone()).mean(0)
    np.testing.assert_allclose(mean.numpy(), ROW.numpy(), rtol=0.1, atol=0.01)


def test_magprune_l1_mode_preserves_the_l1_norm_and_ranks_rows_separately():
    x = torch.randn(8, 500, generator=torch.Generator().manual_seed(3))
    out = magprune(x, 0.4, 0.1, Draws(2), mode="l1").apply_(x.clone())
    assert abs(out.abs().sum().item() / x.abs().sum().item() - 1) < 1e-5
    # a row scaled by 1000 gets the same ranks (per-row ranking), so the keep rate per row ~ density
    x[3] *= 1000
    kept = magprune(x, 0.4, 0.1, Draws(2), rescale=False).mask
    rates = kept.float().mean(1)
    assert ((rates - 0.4).abs() < 0.1).all()


def test_della_default_rescale_is_mergekits_l1_and_the_papers_is_about_5_percent_smaller():
    """Pins the decision documented in della's docstring."""
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(1000, 1000, generator=g) * 0.01 + 0.003
    paper = magprune(tau, 0.5, 0.15, Draws(1), mode="density").apply_(tau.clone())
    l1 = magprune(tau, 0.5, 0.15, Draws(1), mode="l1").apply_(tau.clone())
    ratio = paper.norm().item() / l1.norm().item()
    assert 0.93 < ratio < 0.97
    assert abs(paper.double().mean().item() / tau.double().mean().item() - 1) < 0.02  # unbiased


def np_magprune(tau, density, eps, seed):
    """DELLA's MagPrune in numpy (one row block): keep where u < p(rank), survivors / p."""
    rows = tau.reshape(tau.shape[0], -1) if tau.ndim >= 2 else tau.reshape(1, -1)
    m = rows.shape[1]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    p = density - eps + 2 * eps * ranks / (m - 1)
    u = np_uniforms(seed, rows.size).reshape(rows.shape)
    return np.where(u < p, rows / p, 0.0).reshape(tau.shape)


def test_della_linear_and_della_match_numpy_formula_given_the_masks():
    w, d, e = [0.6, 0.9, -0.4], [0.5, 0.4, 0.7], [0.1, 0.2, 0.15]
    base = BASE.double().numpy()
    pruned = [np_magprune(x.double().numpy() - base, di, ei, s) for x, di, ei, s in zip(MODELS, d, e, [1, 2, 3])]
    out = della_linear(MODELS, BASE, weight=w, density=d, epsilon=e, draws=gens(1, 2, 3),
                       rescale_mode="density", lambda_=1.2)
    np.testing.assert_allclose(out.numpy(), base + 1.2 * sum(wi * x for wi, x in zip(w, pruned)), rtol=1e-5, atol=1e-5)

    out = della(MODELS, BASE, weight=w, density=d, epsilon=e, draws=gens(1, 2, 3), rescale_mode="density")
    wt = [wi * x for wi, x in zip(w, pruned)]
    elected = np.where(sum(wt) >= 0, 1.0, -1.0)
    agree = [np.sign(x) == elected for x in wt]
    div = sum(np.where(a, wi, 0.0) for a, wi in zip(agree, w))
    ref = base + sum(np.where(a, x, 0.0) for a, x in zip(agree, wt)) / np.where(div == 0, 1, div)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_della_same_seed_same_bits_different_seed_different_bits_and_density_one():
    kw = dict(weight=[1.0, 0.5], density=[0.5, 0.6], epsilon=[0.1, 0.1])
    a = della(MODELS[:2], BASE, draws=gens(1, 2), **kw)
    assert torch.equal(a, della(MODELS[:2], BASE, draws=gens(1, 2), **kw))
    assert not torch.equal(a, della(MODELS[:2], BASE, draws=gens(7, 2), **kw))
    full = della_linear(MODELS[:2], BASE, weight=[1.0, 0.5], density=[1.0, 1.0], epsilon=[0.1, 0.1],
                        draws=gens(1, 2))
    assert torch.equal(full, task_arithmetic(MODELS[:2], BASE, weight=[1.0, 0.5], lambda_=1.0, normalize=False))


def test_magprune_one_entry_rows_and_one_element_tensors_are_finite():
    one = torch.tensor([0.7])
    outs = [magprune(one, 0.5, 0.2, Draws(s), mode="density").apply_(one.clone())
            for s in range(200)]
    vals = {round(o.item(), 6) for o in outs}
    assert vals == {0.0, 1.4}  # kept with p = density, rescaled by 1/density
    col = torch.randn(6, 1)
    out = magprune(col, 0.5, 0.2, Draws(1)).apply_(col.clone())
    assert torch.isfinite(out).all()


# -- plans: seeds, order, threads ---------------------------------------------------------------

def _plan(models, tmp_path, method, seed_line, extra="", order=("a", "b", "c"), name="plan.yml"):
    p = models["paths"]
    params = {"a": "weight: 1.0, density: 0.5", "b": "weight: 0.7, density: 0.3", "c": "weight: 0.4, density: 0.6"}
    entries = "\n".join(f"          - model: {p[k]}\n            parameters: {{{params[k]}}}" for k in order)
    return write_plan(tmp_path, f"""
        merge_method: {method}
        base_model: {p['base']}
        models:
{entries}
        {seed_line}
        {extra}
        dtype: float32
        """, name)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_plan_seed_reproduces_bits_and_changes_masks(models, tmp_path, method):
    extra = "parameters: {epsilon: 0.1}" if method == "della" else ""
    outs = {}
    for tag, seed in (("x", 1), ("y", 1), ("z", 2)):
        plan = _plan(models, tmp_path, method, f"seed: {seed}", extra, name=f"{tag}.yml")
        mergekit_lite.run(plan, str(tmp_path / tag))
        outs[tag] = load_dir(str(tmp_path / tag))
    for k in outs["x"]:
        assert torch.equal(outs["x"][k], outs["y"][k]), k
    assert sum(not torch.equal(outs["x"][k], outs["z"][k]) for k in outs["x"]) > 30


def test_dare_ties_output_does_not_depend_on_model_order_threads_or_schedule(models, tmp_path):
    a = _plan(models, tmp_path, "dare_ties", "seed: 3", name="a.yml")
    b = _plan(models, tmp_path, "dare_ties", "seed: 3", order=("c", "a", "b"), name="b.yml")
    mergekit_lite.run(a, str(tmp_path / "a"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        mergekit_lite.run(a, str(tmp_path / "a1"), max_memory="64MB")
    finally:
        torch.set_num_threads(threads)
    mergekit_lite.run(b, str(tmp_path / "b"))
    ra, ra1, rb = (load_dir(str(tmp_path / x)) for x in ("a", "a1", "b"))
    for k in ra:
        assert torch.equal(ra[k], ra1[k]), k
        torch.testing.assert_close(ra[k], rb[k], rtol=1e-6, atol=1e-7)


def test_cli_seed_overrides_the_plan_seed(models, tmp_path):
    plan = _plan(models, tmp_path, "dare_linear", "seed: 5", name="p5.yml")
    other = _plan(models, tmp_path, "dare_linear", "seed: 9", name="p9.yml")
    mergekit_lite.run(plan, str(tmp_path / "five"))
    assert cli.main(["run", other, str(tmp_path / "cli"), "--seed", "5", "-q", "--device", "cpu"]) == 0
    x, y = load_dir(str(tmp_path / "five")), load_dir(str(tmp_path / "cli"))
    assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", [dare_ties, della])
def test_random_methods_give_the_same_bits_on_cuda_and_cpu(method):
    kw = dict(weight=[1.0, 0.5], density=[0.5, 0.6])
    if method is della:
        kw["epsilon"] = [0.1, 0.1]
    cpu = method(MODELS[:2], BASE, draws=gens(1, 2), **kw)
    gpu = method([m.cuda() for m in MODELS[:2]], BASE.cuda(), draws=gens(1, 2), **kw)
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("bad", ["density: 0.5, epsilon: 0.6", "density: 0.9, epsilon: 0.2"])
def test_della_probabilities_outside_unit_interval_are_a_plan_error(models, tmp_path, bad):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: della
        base_model: {p['base']}
        models:
          - model: {p['a']}
            parameters: {{weight: 1.0, {bad}}}
        """)
    with pytest.raises(PlanError, match="epsilon"):
        mergekit_lite.run(plan, str(tmp_path / "out"))


# -- pieces: tiles, row blocks and threads give the bits of the whole-tensor call -------------------

def test_draws_are_addressed_by_position():
    whole = Draws(11).words(1001)
    for start, n in [(0, 1), (1, 10), (37, 500), (999, 2), (500, 501)]:
        assert torch.equal(Draws(11, start).words(n), whole[start:start + n])
        assert torch.equal(Draws(11).shifted(start).words(n), whole[start:start + n])
    np.testing.assert_array_equal(whole.numpy().view(np.uint32), np.random.PCG64(11).random_raw(501).view(np.uint32)[:1001])
    assert Draws(11).bernoulli((5,), 1.0).all() and not Draws(11).bernoulli((5,), 0.0).any()
    assert Draws(11).bernoulli((5,), 1 - 2.0 ** -40).all()  # the threshold would overflow int32


BIG = (1500, 700)  # 1.05 M entries: five tiles of 374 rows (the last one short)


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    from mergekit_lite.examples import LLAMA_CONFIG, save_model
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(12)
    base = {"model.embed_tokens.weight": torch.randn(BIG, generator=g), "model.norm.weight": torch.randn(700, generator=g)}
    paths = {"base": save_model(str(root / "base"), base, LLAMA_CONFIG)}
    for k in ("a", "b", "c"):
        paths[k] = save_model(str(root / k), {n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in base.items()},
                              LLAMA_CONFIG)
    return paths


@pytest.mark.parametrize("method,extra", [("dare_ties", "rescale_mode: l1"), ("dare_linear", "rescale_mode: density"),
                                          ("della", "epsilon: 0.1"), ("della_linear", "{epsilon: 0.1, rescale_mode: density}")])
def test_tiles_row_blocks_and_threads_give_the_whole_tensor_bits(big_models, tmp_path, method, extra):
    """The engine merges these tensors tile by tile on its compute threads (and, with a small block
    size, in row blocks after the L1 statistic's sweep); a direct call of the method on the whole
    tensors with the same seeds must give the same bits."""
    from mergekit_lite.merge import Options, compile_plan
    from mergekit_lite.compute import Merge
    extra = extra if extra.startswith("{") else "{" + extra + "}"
    plan = _plan({"paths": big_models}, tmp_path, method, "seed: 4", f"parameters: {extra}")
    mergekit_lite.run(plan, str(tmp_path / "tiled"))
    mergekit_lite.run(plan, str(tmp_path / "blocks"), block_size=4 * 300 * 700)
    tiled, blocked = load_dir(str(tmp_path / "tiled")), load_dir(str(tmp_path / "blocks"))
    compiled = compile_plan(plan, Options())
    merges = {n.tensor: n for _, nodes in compiled.groups for n in nodes if isinstance(n, Merge)}
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        node = merges[name]
        assert node.tiled == (name == "model.embed_tokens.weight")
        ins = [load_dir(big_models[k])[name] for k in ("a", "b", "c")]
        kw = {methods.get(method).param(p).pyname: v for p, v in node.param_values().items()}
        whole = methods.get(method).fn(ins, load_dir(big_models["base"])[name], draws=gens(*node.seeds), **kw)
        assert torch.equal(tiled[name], whole), name
        assert torch.equal(blocked[name], whole), name


def test_l1_statistic_hands_its_masks_to_pieces_of_any_grouping():
    """Swept in two pieces of rows, the masks kept (a bit per entry) join up for a merge of the
    whole block (the CUDA path merges a row block whole), equal the masks drawn at once, and the
    norms give the ratio of the whole tensor; a piece the sweep did not cover is drawn again."""
    from mergekit_lite.methods.della import l1_statistic
    from mergekit_lite.methods.drops import della_mask, l1_norms
    tau = [m - BASE for m in MODELS[:2]]
    params = {"density": [0.5, 0.6], "epsilon": [0.1, 0.2], "rescale": True, "rescale_mode": "l1",
              "draws": gens(3, 4)}
    stat = l1_statistic(params, tuple(BASE.shape))
    for first, stop in [(0, 13), (13, 30)]:
        stat.observe(0, [m[first:stop] for m in MODELS[:2]], BASE[first:stop], first * 20)
    piece = stat.at(0)
    for i in range(2):
        whole = della_mask(tau[i], params["density"][i], params["epsilon"][i], gens(3, 4)[i])
        assert torch.equal(piece.mask(i, tuple(BASE.shape)), whole)
        before, after = l1_norms(tau[i], whole)
        assert float(piece.scale(i)) == np.float32(before / after)
    assert stat.at(0).mask(0, tuple(BASE.shape)) is None  # handed over once
    assert l1_statistic(dict(params, rescale_mode="density"), tuple(BASE.shape)) is None


def test_row_ranks_equal_a_stable_argsort_with_ties_zeros_and_signs():
    """MagPrune's ranks on the CPU come from sorting int64 keys (|τ| bits, then position): they must
    be a stable sort's ranks, ties (|−x| = |x|, ±0) broken by position."""
    from mergekit_lite.methods.drops import row_ranks
    x = torch.randn(7, 300, generator=torch.Generator().manual_seed(9))
    x[0, :40] = 0.0
    x[0, 40:50] = -0.0
    x[1, 10], x[1, 200] = 0.25, -0.25
    x[2] = 1.5
    x[3, ::3] = -x[3, 1::3][:100]
    want = torch.empty(7, 300, dtype=torch.int64).scatter_(
        1, torch.argsort(x.abs(), dim=1, stable=True), torch.arange(300).expand(7, 300))
    assert torch.equal(row_ranks(x), want)
    assert row_ranks(x)[2].tolist() == list(range(300))
