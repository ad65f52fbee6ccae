"""``mergekit-lite bench``: throughput and peak memory against the machine's limits, side by side
with mergekit when installed.

Synthetic Llama-shaped checkpoints of a chosen size are generated once (and reused). The bench
first measures the machine's limits (:mod:`.limits`: interpreter start-up with torch, a warm read
of the inputs, writing an output-sized file with fdatasync), then runs each scenario in a fresh
process per tool, the tools alternating run after run (``--repeat``; the fastest run is kept, and
the largest peak RSS):

- ``linear`` (and any other method named with ``--methods``): one merge of N fine-tunes;
- ``upscale``: a SOLAR-style depthwise upscale of one model (two copies, a quarter of the layers
  dropped at the seam), written as slices for mergekit;
- ``multistep``: a 3-step recipe (SLERP, then TIES, then task arithmetic), run by mergekit-lite in
  one pass and as three separate runs, and by ``mergekit-multi`` when installed;
- the largest-tensor comparison (``--largest-vocab``): the linear merge again on checkpoints whose
  embedding is 1 GB in float32, to show that peak memory does not grow with the largest tensor.

For each run it reports wall time, throughput (GB written per second), peak RSS (and above the
interpreter's baseline, next to the streaming bound) and, with ``--device cuda``, the peak device
memory. Machines are noisy: compare the ratios in one run, not absolute times across runs.
"""

from __future__ import annotations

import os
import shutil
import sys
from math import prod as numel  # not dtypes.numel: building the CLI parser must not import torch
from typing import Any

from .dropin import mergekit_command
from .limits import OURS, machine_limits, measure

def add_arguments(p) -> None:
    p.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "mergekit-lite-bench"),
                   help="work folder for the generated models and outputs [$TMPDIR/mergekit-lite-bench]")
    p.add_argument("--size-gb", type=float, default=1.0, help="size of each generated checkpoint [1.0]")
    p.add_argument("--models", type=int, default=3, help="number of fine-tunes merged [3]")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="storage dtype of the generated checkpoints [bfloat16]")
    p.add_argument("--methods", default="linear,ties", help="comma-separated methods to time [linear,ties]")
    p.add_argument("--multistep", action="store_true", help="also time a 3-step recipe (SLERP, TIES, task "
                   "arithmetic) against mergekit-multi")
    p.add_argument("--upscale", action="store_true", help="also time a SOLAR-style depth upscale of one model")
    p.add_argument("--mergekit", default=None, metavar="PATH",
                   help="mergekit-yaml executable [found on PATH; skipped when absent]")
    p.add_argument("--compare", default=None, metavar="DIR",
                   help="another checkout of mergekit-lite (a folder holding mergekit_lite/) timed side by side, "
                        "e.g. before and after a change")
    p.add_argument("--device", default="cpu", help="device for every tool [cpu]")
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement, the tools alternating; the "
                   "fastest is kept [1]")
    p.add_argument("--largest-vocab", type=int, default=0, metavar="N",
                   help="also time linear on checkpoints of the same size with a vocabulary of N (128256: a 1 GB "
                        "float32 embedding) and compare peak RSS with the default vocabulary's [0: skip]")
    p.add_argument("--hidden", type=int, default=HIDDEN, help=f"hidden size of the generated models [{HIDDEN}]")
    p.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary size of the generated models [{VOCAB}]")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


# ------------------------------------------------------------------------------------------------
# synthetic models


HIDDEN, VOCAB = 2048, 32000


def _shapes(size_gb: float, itemsize: int, h: int = HIDDEN, vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    """Llama-like shapes (by default hidden 2048, vocab 32000) with as many layers as fit in `size_gb`."""
    inter = (h * 11 // 4 + 63) // 64 * 64
    per_layer = (4 * h * h + 3 * h * inter + 2 * h) * itemsize
    fixed = (2 * vocab * h + h) * itemsize
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                       p + "self_attn.k_proj.weight": (h, h), p + "self_attn.v_proj.weight": (h, h),
                       p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    return shapes


def _make_models(work: str, n: int, size_gb: float, dtype_name: str, h: int = HIDDEN, vocab: int = VOCAB
                 ) -> dict[str, str]:
    import torch

    from .examples import LLAMA_CONFIG, save_model

    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shapes = _shapes(size_gb, itemsize, h, vocab)
    layers = sum(1 for k in shapes if k.endswith("input_layernorm.weight"))
    heads = max(1, h // 128)
    cfg = dict(LLAMA_CONFIG, hidden_size=h, intermediate_size=shapes["model.layers.0.mlp.up_proj.weight"][0],
               vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
               head_dim=h // heads, torch_dtype=dtype_name)
    tag = f"{size_gb:g}gb-{dtype_name}-h{h}-v{vocab}"
    paths = {}
    for i, name in enumerate(["base"] + [f"ft{j}" for j in range(n)]):
        folder = os.path.join(work, "models", tag, name)
        paths[name] = folder
        if os.path.exists(os.path.join(folder, "config.json")):
            continue
        gen = torch.Generator().manual_seed(1234 + i)
        base_gen = torch.Generator().manual_seed(1234)
        tensors = {}
        for key, shape in shapes.items():
            t = torch.randn(shape, generator=base_gen) * 0.02
            if i:
                t += torch.randn(shape, generator=gen) * 0.002
            tensors[key] = t.to(dtype)
        save_model(folder + ".tmp", tensors, cfg, max_shard_bytes=2_000_000_000, tokenizer=False)
        os.replace(folder + ".tmp", folder)
        del tensors
    return paths


def _largest_f32(shapes: dict[str, tuple[int, ...]]) -> int:
    return max(4 * numel(s) for s in shapes.values())


# ------------------------------------------------------------------------------------------------
# plans


def _plan_single(method: str, paths: dict[str, str], n: int, dtype: str) -> str:
    fts = [paths[f"ft{j}"] for j in range(n)]
    if method == "linear":
        models = "".join(f"  - model: {p}\n    parameters: {{weight: {1.0 / n:.4f}}}\n" for p in fts)
        return f"merge_method: linear\nmodels:\n{models}dtype: {dtype}\n"
    params = {"ties": "weight: 1.0, density: 0.5", "dare_ties": "weight: 1.0, density: 0.5",
              "dare_linear": "weight: 1.0, density: 0.5", "task_arithmetic": "weight: 0.5",
              "breadcrumbs": "weight: 1.0, density: 0.9, gamma: 0.01",
              "della": "weight: 1.0, density: 0.5", "della_linear": "weight: 1.0, density: 0.5"}.get(method, "weight: 1.0")
    models = "".join(f"  - model: {p}\n    parameters: {{{params}}}\n" for p in fts)
    return f"merge_method: {method}\nbase_model: {paths['base']}\nmodels:\n{models}dtype: {dtype}\n"


def _plan_steps(paths: dict[str, str], dtype: str, inter: dict[str, str] | None) -> list[str]:
    """The 3-step recipe (SLERP of two fine-tunes, TIES of that with a third, task arithmetic), as
    one multi-document plan (`inter` None) or as three separate plans whose intermediates live in
    the folders `inter` names."""
    a, b, c, base = paths["ft0"], paths["ft1"], paths.get("ft2", paths["ft0"]), paths["base"]
    s1 = f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n" \
         f"parameters: {{t: 0.5}}\ndtype: {dtype}\n"
    one = inter["one"] if inter else "one"
    s2 = f"merge_method: ties\nbase_model: {base}\nmodels:\n" \
         f"  - {{model: {one}, parameters: {{weight: 1.0, density: 0.5}}}}\n" \
         f"  - {{model: {c}, parameters: {{weight: 1.0, density: 0.5}}}}\ndtype: {dtype}\n"
    two = inter["two"] if inter else "two"
    s3 = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n" \
         f"  - {{model: {two}, parameters: {{weight: 0.8}}}}\n" \
         f"  - {{model: {a}, parameters: {{weight: 0.2}}}}\ndtype: {dtype}\n"
    if inter is None:
        return ["name: one\n" + s1 + "---\nname: two\n" + s2 + "---\n" + s3]
    return [s1, s2, s3]


# ------------------------------------------------------------------------------------------------
# measuring


def _mergekit_python(mk: str) -> str:
    with open(mk, "rb") as fh:
        first = fh.readline().decode(errors="replace").strip()
    return first[2:].strip() if first.startswith("#!") else sys.executable


def _row(name: str, tool: str, result: dict, baseline: int, written: int, bound: int) -> dict:
    extra = max(0, result["maxrss"] - baseline)
    return {"scenario": name, "tool": tool, "seconds": round(result["seconds"], 3),
            "gb_per_s": round(written / 1e9 / result["seconds"], 4), "peak_rss": result["maxrss"],
            "peak_rss_over_baseline": extra, "device_peak": result.get("device_peak", 0),
            "bound": bound, "within_bound": extra <= bound}


class _Tool:
    """One engine to time: its command line for a plan (and for a multi-document recipe, when it
    has one), its environment, its import-only RSS."""

    def __init__(self, name: str, command, env: dict[str, str] | None, baseline_cmd: list[str], multi=None):
        self.name = name
        self.command = command  # (plan, out) -> argv
        self.multi = multi  # (plan, out, intermediates) -> argv, or None
        self.env = env
        self.baseline = measure(baseline_cmd, env)["maxrss"]


def _tools(args) -> list[_Tool]:
    """mergekit-lite; another checkout of it (``--compare``); mergekit (and mergekit-multi) when installed."""
    here = [sys.executable, "-c", "import torch, mergekit_lite.merge, mergekit_lite.executor"]

    def ours(plan: str, out: str) -> list[str]:
        return [sys.executable, "-c", OURS, "run", plan, out, "--overwrite", "-q", "--device", args.device]

    tools = [_Tool("mergekit-lite", ours, None, here)]
    if args.compare:
        src = os.path.abspath(args.compare)
        if not os.path.isdir(os.path.join(src, "mergekit_lite")):
            raise SystemExit(f"--compare {args.compare}: no mergekit_lite package there")
        tools.append(_Tool(f"mergekit-lite ({os.path.basename(src)})", ours, {"PYTHONPATH": src}, here))
    mk = args.mergekit or mergekit_command()  # mergekit's, not our mergekit-yaml entry point
    if mk and not os.path.exists(mk):
        raise SystemExit(f"--mergekit {mk}: not found")
    if mk:
        extra = ["--cuda"] if args.device.startswith("cuda") else []
        multi = os.path.join(os.path.dirname(mk), "mergekit-multi")
        tools.append(_Tool("mergekit", lambda plan, out: [mk, plan, out, *extra], None,
                           [_mergekit_python(mk), "-c", "import mergekit.merge, mergekit.scripts.run_yaml"],
                           (lambda plan, out, inter: [multi, plan, "--out-path", out, "-I", inter, *extra])
                           if os.path.exists(multi) else None))
    return tools


class _Bench:
    """The scenarios of one ``bench`` run, every tool on each, rows in the order measured."""

    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.dir)
        os.makedirs(os.path.join(self.work, "plans"), exist_ok=True)
        self.n = args.models
        self.paths = _make_models(self.work, max(self.n, 3 if args.multistep else self.n), args.size_gb, args.dtype,
                                  args.hidden, args.vocab)
        self.tools = _tools(args)
        self.itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
        self.shapes = _shapes(args.size_gb, self.itemsize, args.hidden, args.vocab)
        self.largest = _largest_f32(self.shapes)
        self.written = sum(numel(s) for s in self.shapes.values()) * self.itemsize
        self.rows: list[dict] = []
        self.notes: list[str] = []

    def plan(self, name: str, text: str) -> str:
        path = os.path.join(self.work, "plans", name)
        with open(path, "w") as fh:
            fh.write(text)
        return path

    def limits(self) -> dict[str, float]:
        """The machine's limits for the linear merge: its inputs, an output of its size."""
        return machine_limits(sys.executable, [self.paths[f"ft{j}"] for j in range(self.n)], self.work, self.written)

    def alternate(self, scenario: str, runs: list[tuple[str, _Tool, Any, list[str]]], written: int,
                  bound: int) -> None:
        """Time each (label, tool, argv or a function giving a result, folders to clear) `--repeat`
        times, the tools alternating; keep each one's fastest time and largest peak memory."""
        best: dict[str, dict[str, Any]] = {}
        for _ in range(max(1, self.args.repeat)):
            for name, tool, cmd, cleanup in runs:
                for path in cleanup:
                    shutil.rmtree(path, ignore_errors=True)
                r = cmd() if callable(cmd) else measure(cmd, tool.env)
                old = best.setdefault(name, r)
                best[name] = min(old, r, key=lambda x: x["seconds"]) | {"maxrss": max(old["maxrss"], r["maxrss"]),
                                                                       "device_peak": max(old.get("device_peak", 0),
                                                                                          r.get("device_peak", 0))}
        for name, tool, _, cleanup in runs:
            self.rows.append(_row(scenario, name, best[name], tool.baseline, written, bound))
            for path in cleanup:
                shutil.rmtree(path, ignore_errors=True)

    def time_all(self, scenario: str, plan: str, written: int, bound: int) -> None:
        out = os.path.join(self.work, "out")
        self.alternate(scenario, [(t.name, t, t.command(plan, out), [out]) for t in self.tools], written, bound)

    def single(self, method: str, paths: dict[str, str] | None = None, label: str = "") -> None:
        from . import methods as registry

        registry.get(method)
        text = _plan_single(method, paths or self.paths, self.n, self.args.dtype)
        plan = self.plan(f"{method}{label}.yml".replace(" ", "-"), text)
        bound = (self.n + (method != "linear") + 3) * self.largest
        self.time_all(f"{method} {self.n}x{self.args.size_gb:g}GB{label}", plan, self.written, bound)

    def upscale(self) -> None:
        layers = sum(1 for k in self.shapes if k.endswith("input_layernorm.weight"))
        drop = max(1, layers // 4) if layers > 2 else 0
        ranges = [(0, layers - drop), (drop, layers)]
        plan = self.plan("upscale.yml", "merge_method: passthrough\nslices:\n" + "".join(
            f"  - sources: [{{model: {self.paths['base']}, layer_range: [{a}, {b}]}}]\n" for a, b in ranges)
            + f"dtype: {self.args.dtype}\n")
        per_layer = sum(numel(v) for k, v in self.shapes.items() if ".layers.0." in k) * self.itemsize
        self.time_all(f"upscale {self.args.size_gb:g}GB x2", plan, self.written + (layers - 2 * drop) * per_layer,
                      4 * self.largest)

    def multistep(self) -> None:
        """Ours in one pass and in three runs; mergekit-multi (or mergekit's three runs)."""
        name = f"3-step recipe {self.args.size_gb:g}GB"
        plan = self.plan("multistep.yml", _plan_steps(self.paths, self.args.dtype, None)[0])
        out, inter = os.path.join(self.work, "out"), os.path.join(self.work, "intermediates")
        runs = []
        for tool in self.tools:
            if tool.name.startswith("mergekit-lite"):
                runs.append((tool.name + " (one pass)", tool, tool.command(plan, out), [out]))
            if tool.multi is not None:
                runs.append((tool.name + "-multi", tool, tool.multi(plan, out, inter), [out, inter]))
            else:
                runs.append((tool.name + " (3 runs)", tool, lambda t=tool: self.staged(t), []))
        self.alternate(name, runs, self.written, (4 + 3) * self.largest)

    def staged(self, tool: _Tool) -> dict[str, Any]:
        """The recipe as three runs with intermediates on disk: total time, largest RSS."""
        inter = {"one": os.path.join(self.work, "inter-one"), "two": os.path.join(self.work, "inter-two")}
        targets = [inter["one"], inter["two"], os.path.join(self.work, "out-stages")]
        total = {"seconds": 0.0, "maxrss": 0, "device_peak": 0}
        for i, (text, target) in enumerate(zip(_plan_steps(self.paths, self.args.dtype, inter), targets)):
            shutil.rmtree(target, ignore_errors=True)
            r = measure(tool.command(self.plan(f"stage{i + 1}.yml", text), target), tool.env)
            total["seconds"] += r["seconds"]
            total["maxrss"] = max(total["maxrss"], r["maxrss"])
            total["device_peak"] = max(total["device_peak"], r.get("device_peak", 0))
        for t in targets:
            shutil.rmtree(t, ignore_errors=True)
        return total

    def largest_tensor(self) -> None:
        """Linear again on checkpoints of the same size whose vocabulary makes the largest tensor
        ``--largest-vocab`` rows (mergekit-lite only: its peak memory is the question)."""
        vocab = self.args.largest_vocab
        paths = _make_models(self.work, self.n, self.args.size_gb, self.args.dtype, self.args.hidden, vocab)
        plan = self.plan("linear-largest.yml", _plan_single("linear", paths, self.n, self.args.dtype))
        out = os.path.join(self.work, "out")
        shapes = _shapes(self.args.size_gb, self.itemsize, self.args.hidden, vocab)
        written = sum(numel(s) for s in shapes.values()) * self.itemsize
        label = f"linear, largest {_size(_largest_f32(shapes))}"
        ours = self.tools[0]
        self.alternate(label, [(ours.name, ours, ours.command(plan, out), [out])], written,
                       (self.n + 3) * _largest_f32(shapes))
        self.notes.append(_largest_note(self.rows, self.largest, _largest_f32(shapes)))


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _largest_note(rows: list[dict], small: int, big: int) -> str:
    mine = [r for r in rows if r["tool"] == "mergekit-lite" and r["scenario"].startswith("linear")]
    first, last = mine[0], mine[-1]
    return (f"linear, largest tensor {_size(small)} vs {_size(big)} in float32: peak RSS "
            f"{first['peak_rss'] / 2**20:.0f} MiB vs {last['peak_rss'] / 2**20:.0f} MiB")


def run_bench(args) -> dict[str, Any]:
    bench = _Bench(args)
    limits = bench.limits()
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        bench.single(method)
    if args.largest_vocab:
        bench.largest_tensor()
    if args.upscale:
        bench.upscale()
    if args.multistep:
        bench.multistep()
    report = _report(bench.rows, limits, args.device)
    report["text"] += "".join("\n" + n for n in bench.notes)
    if not any(t.name == "mergekit" for t in bench.tools):
        report["text"] += "\nmergekit not found (pip install mergekit, or pass --mergekit PATH): its columns are skipped"
    report.update(largest_tensor_f32=bench.largest, bytes_written=bench.written, limits=limits,
                  baseline_rss={t.name: t.baseline for t in bench.tools})
    return report


def _limits_line(limits: dict[str, float]) -> str:
    return (f"machine limits: python + import torch {limits['startup']:.2f} s, warm read of the inputs "
            f"({limits['read_bytes'] / 1e9:.2f} GB) {limits['read']:.2f} s, write + fdatasync of "
            f"{limits['write_bytes'] / 1e9:.2f} GB {limits['write']:.2f} s: {limits['total']:.2f} s in all")


def _report(rows: list[dict], limits: dict[str, float], device: str = "cpu") -> dict[str, Any]:
    """The limits, the table, and each other tool's time and RSS as ratios to mergekit-lite's
    (the first row of each scenario); linear's time as a multiple of the machine's limit."""
    dev = device.startswith("cuda")
    lines = [_limits_line(limits),
             f"{'scenario':<30} {'tool':<30} {'seconds':>8} {'GB/s':>7} {'peak RSS':>10} {'- base':>9} {'bound':>9}"
             + (f" {'device peak':>12}" if dev else "")]
    for r in rows:
        lines.append(f"{r['scenario']:<30} {r['tool']:<30} {r['seconds']:>8.2f} {r['gb_per_s']:>7.3f} "
                     f"{r['peak_rss'] / 2**20:>6.0f} MiB {r['peak_rss_over_baseline'] / 2**20:>5.0f} MiB "
                     f"{r['bound'] / 2**20:>5.0f} MiB" + (f" {r['device_peak'] / 2**20:>8.0f} MiB" if dev else "")
                     + ("" if r["within_bound"] else "  (over)"))
    ratios = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        group = [r for r in rows if r["scenario"] == scenario]
        lite = group[0]
        if scenario.startswith("linear ") and lite["tool"] == "mergekit-lite" and limits.get("total"):
            lines.append(f"{scenario}: mergekit-lite took {lite['seconds'] / limits['total']:.2f}x the machine's limit")
        for other in group[1:]:
            ratios.append({"scenario": scenario, "versus": other["tool"],
                           "speedup": round(other["seconds"] / lite["seconds"], 2),
                           "rss_ratio": round(lite["peak_rss"] / max(1, other["peak_rss"]), 2)})
            lines.append(f"{scenario}: mergekit-lite is {ratios[-1]['speedup']}x as fast as {other['tool']}, "
                         f"peak RSS {ratios[-1]['rss_ratio']}x of it")
    return {"rows": rows, "ratios": ratios, "text": "\n".join(lines)}
