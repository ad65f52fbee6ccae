"""The text table ``mergekit-lite eval`` prints: one row per model, one column per task.

A generation task shows exact match and per-character accuracy (``EM/char``, as fractions), a
perplexity task its perplexity; the last columns are the means over the tasks.
"""

from __future__ import annotations

from typing import Any


def _cell(scores: dict[str, float]) -> str:
    if "perplexity" in scores:
        return f"ppl {scores['perplexity']:.3f}"
    return f"{scores['exact_match']:.3f}/{scores['char_accuracy']:.3f}"


def format_report(report: Any) -> str:
    names = report.names()
    kinds = {t.kind for t in report.tasks}
    header = ["model"] + [f"{n} (EM/char)" if t.kind == "generation" else n for n, t in zip(names, report.tasks)]
    if "generation" in kinds and len(report.tasks) > 1:
        header += ["mean EM", "mean char"]
    if "perplexity" in kinds and len(report.tasks) > 1:
        header += ["mean ppl"]
    rows = []
    for r in report.rows:
        cells = [r.label] + [_cell(r.scores[n]) for n in names]
        if "generation" in kinds and len(report.tasks) > 1:
            cells += [f"{r.mean('exact'):.3f}", f"{r.mean('char'):.3f}"]
        if "perplexity" in kinds and len(report.tasks) > 1:
            cells += [f"{r.mean('ppl'):.3f}"]
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
