"""Human-readable descriptions: what a plan will do (``mergekit-lite plan``), and the methods
(``mergekit-lite methods``, which reads the registry only and so answers without importing torch)."""

from __future__ import annotations

import json

from . import methods
from .errors import MergeError


def plan_report(plan_path: str, *, device: str = "auto", max_memory=None, seed=None, as_json: bool = False,
                block_size=None) -> str:
    from .graph import describe  # imported here: methods_report must not import torch
    from .io.sizes import human_size
    from .merge import Options, compile_plan

    options = Options(device=device, max_memory=max_memory, seed=seed, block_size=block_size)
    compiled = compile_plan(plan_path, options)
    info = describe(compiled)
    budget = options.budget(compiled)
    info["budget_bytes"] = budget
    # read-ahead fills the budget at most, and never more than all groups' needs together
    info["estimated_peak_bytes"] = min(budget, sum(compiled.needs))
    steps = [{"name": st.name or "(output)", "method": st.method, "base_model": st.base_model,
              "models": list(st.models), "depends_on": list(st.depends_on), "tensors": st.tensors,
              "save": st.save, "expanded": st.expanded, "vocabulary": st.vocabulary,
              **dict(st.details)} for st in compiled.steps]
    info["steps"] = steps
    info["warnings"] = list(compiled.warnings)
    if as_json:
        return json.dumps(info, indent=2)
    lines = [f"plan: {compiled.recipe.file}"]
    for s in steps:
        head = f"step {s['name']}: {s['method']}"
        if s["base_model"]:
            head += f" on base {s['base_model']}"
        lines.append(head)
        lines.append(f"  models: {', '.join(s['models'])}")
        if s["depends_on"]:
            lines.append(f"  uses steps: {', '.join(s['depends_on'])} (computed in the same pass, not written)")
        if s["save"]:
            lines.append(f"  also saved to: {s['save']}")
        if s["vocabulary"]:
            lines.append(f"  vocabulary: {s['vocabulary']} (embedding and lm_head rows aligned token by token)")
        lines.append(f"  output tensors: {s['tensors']}")
        lines.extend(moe_lines(s))
        if s["expanded"]:
            lines.append("  expands to:")
            lines.extend("    " + ln for ln in s["expanded"].rstrip().splitlines())
    ins = (f"{info['min_inputs_per_tensor']}" if info["min_inputs_per_tensor"] == info["max_inputs_per_tensor"]
           else f"{info['min_inputs_per_tensor']}-{info['max_inputs_per_tensor']}")
    lines += [
        f"output tensors: {info['output_tensors']}",
        f"inputs per merged tensor: {ins}",
        f"tensor reads: {info['loads']} ({human_size(info['bytes_read'])})"
        + (f", in {info['blocks']} row blocks and statistic sweeps" if info["blocks"] > info["output_tensors"] else ""),
        f"bytes written: {human_size(info['bytes_written'])}",
        f"largest single step needs: {human_size(info['peak_step_bytes'])}",
        f"memory budget: {human_size(budget)}{' (auto)' if max_memory in (None, 'auto') else ''}",
        f"estimated peak tensor memory: {human_size(info['estimated_peak_bytes'])}",
    ]
    lines += [f"warning: {w}" for w in compiled.warnings]
    return "\n".join(lines)


def moe_lines(step: dict) -> list[str]:
    """A mixture of experts' output, routing and experts (nothing for other steps)."""
    if "gate_mode" not in step:
        return []
    lines = [f"  mixture of experts: {step['architecture']}, gate_mode {step['gate_mode']}, "
             f"{step['experts_per_token']} of {len(step['experts'])} experts per token"]
    for i, e in enumerate(step["experts"]):
        extra = "".join(f", {k} {e[k]}" for k in ("noise_scale", "residual_scale") if e[k] is not None)
        lines.append(f"    expert {i}: {e['model']} ({e['positive_prompts']} positive, "
                     f"{e['negative_prompts']} negative prompts{extra})")
    lines += [f"    shared expert: {e['model']} ({e['positive_prompts']} positive prompts)" for e in step["shared_experts"]]
    return lines


def methods_report(name: str | None = None) -> str:
    """Every method with its parameters, or one in detail; an unknown name is a MergeError that
    lists the known names. Reads only the registry: torch is not imported."""
    try:
        shown = [methods.get(name)] if name else [methods.get(n) for n in methods.names()]
    except KeyError as exc:
        raise MergeError(exc.args[0]) from None
    lines = []
    for m in shown:
        base = {"required": "needs base_model", "optional": "base_model optional", "none": "no base model"}[m.base]
        count = (f"{m.min_models}" if m.max_models == m.min_models else
                 f"{m.min_models}+" if m.max_models is None else f"{m.min_models}-{m.max_models}")
        lines.append(f"{m.name}: {count} model(s), {base}{', random (seeded)' if m.random else ''}")
        for p in m.params:
            default = "required" if p.required else f"default {p.default!r}"
            lines.append(f"    {p.name} ({p.scope}, {p.kind.__name__}, {default}){': ' + p.doc if p.doc else ''}")
        if name:
            lines.append("")
            lines.append(m.doc)
            if m.paper:
                lines.append(f"paper: {m.paper}")
    return "\n".join(lines)
