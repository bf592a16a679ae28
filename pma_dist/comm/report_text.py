"""``report.md``: the human-readable face of ``report.json`` (same numbers, nothing recomputed)."""
from __future__ import annotations

from typing import List, Optional

from .projection import format_projection_markdown


def _bytes(n) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000.0
    return f"{n} B"


def _num(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.3g}"
    return f"{int(x)}"


def _ratio(x) -> str:
    return "-- (baseline sends none)" if x is None else f"{x:.3g}"


def _run_header(title: str, run: dict) -> List[str]:
    return [
        f"## {title}: {run['optimizer']}, {run['setup']}, K={run['period']}, {run['world_size']} ranks",
        "",
        f"`{run['run_dir']}` -- backend {run.get('backend')}, dtype {run.get('dtype')}, "
        f"{run.get('param_count')} parameters ({_bytes(run.get('param_bytes') or 0)}), {run['micro_steps']} "
        f"micro-steps = {run['complete_periods']} complete period(s); per-period numbers average "
        f"{run['periods_averaged']} period(s) ({'identical messages every period' if run['steady'] else 'NOT steady: periods differ'}); "
        f"ranks {'agree' if run['ranks_agree'] else 'DISAGREE'}.",
        "",
    ]


def _collectives_table(run: dict) -> List[str]:
    lines = ["| op | count / period | bytes / period | seconds / period | count / micro-step | bytes / micro-step |",
             "|---|---|---|---|---|---|"]
    for op, c in run["collectives"].items():
        p, m = c["per_period"], c["per_micro_step"]
        lines.append(f"| {op} | {_num(p['count'])} | {_bytes(p['bytes'])} ({_num(p['bytes'])}) | {p['seconds']:.4g} | "
                     f"{_num(m['count'])} | {_bytes(m['bytes'])} |")
    if not run["collectives"]:
        lines.append("| (no collectives during training) | 0 | 0 | 0 | 0 | 0 |")
    return lines + [""]


def _phase_table(run: dict) -> List[str]:
    phases = ("forward", "backward", "step", "other")
    lines = ["Bytes per period by phase:", "", "| op | " + " | ".join(phases) + " |",
             "|---|" + "---|" * len(phases)]
    for op, by in run["by_phase_per_period"].items():
        lines.append(f"| {op} | " + " | ".join(_bytes(by[p]["bytes"]) if p in by else "-" for p in phases) + " |")
    kinds = run["by_kind_per_micro_step"]
    if kinds:
        lines += ["", "Bytes per micro-step of each kind (PMA: small/large step; GA: accumulate/boundary):", "",
                  "| kind | " + " | ".join(run["collectives"]) + " |", "|---|" + "---|" * len(run["collectives"])]
        for kind, per_op in kinds.items():
            lines.append(f"| {kind} | " + " | ".join(_bytes(per_op[op]["bytes"]) if op in per_op else "0"
                                                      for op in run["collectives"]) + " |")
    return lines + [""]


def _links_table(run: dict) -> List[str]:
    links = run.get("links")
    if not links:
        return []
    if not links.get("available"):
        return [f"Links by rank placement: not attributed -- {links.get('reason')}", ""]
    nodes = links["placement"]["nodes"]
    lines = [f"Bytes each rank sends over intra- / inter-node links ({len(nodes)} node(s): "
             + "; ".join(f"{name}: rank(s) {', '.join(map(str, ranks))}" for name, ranks in nodes.items())
             + f"). {links['algorithm']}.", "",
             "| rank | node | intra-node / period | inter-node / period | intra-node total | inter-node total |",
             "|---|---|---|---|---|---|"]
    rows = list(links["per_rank"].items()) + [("all", {"node": "", "per_period": links["per_period"],
                                                       "total": links["total"]})]
    for rank, r in rows:
        p, t = r["per_period"], r["total"]
        lines.append(f"| {rank} | {r['node']} | {_bytes(p['intra'])} ({_num(p['intra'])}) | "
                     f"{_bytes(p['inter'])} ({_num(p['inter'])}) | {_bytes(t['intra'])} | {_bytes(t['inter'])} |")
    by_op = ", ".join(f"{op} {_bytes(v['intra'])} intra / {_bytes(v['inter'])} inter"
                      for op, v in links["by_op_per_period"].items())
    if by_op:
        lines += ["", f"Per period by op (all ranks): {by_op}."]
    if links["notes"]:
        lines += [""] + [f"- {n}" for n in links["notes"]]
    return lines + [""]


def _model_lines(model: Optional[dict], title: str) -> List[str]:
    if not model:
        return []
    if not model.get("available"):
        return [f"Analytical model ({title}): not available for this set-up -- {model.get('reason')}", ""]
    verdict = "equals the model byte for byte" if model["agree"] else "DIFFERS from the model"
    first, last = model["micro_steps_checked"]
    lines = [f"Measured engine traffic ({title}; forward/backward/step, per period; every micro-step {first}..{last - 1} "
             f"checked) {verdict}:", "", "| op | measured count | model count | measured bytes | model bytes |",
             "|---|---|---|---|---|"]
    for op, r in model["per_period"].items():
        lines.append(f"| {op} | {_num(r['measured_count'])} | {_num(r['model_count'])} | "
                     f"{_num(r['measured_bytes'])} | {_num(r['model_bytes'])} |")
    lines += [f"- mismatch: {m}" for m in model["micro_step_mismatches"]]
    outside = ", ".join(f"{op} {_num(v['count'])} x ({_num(v['bytes'])} B)" for op, v in
                        model["outside_engine_per_period"].items())
    if outside:
        lines += ["", f"Outside the engine (phase \"other\": the training loop's own collectives, e.g. loss "
                      f"logging; not modelled), per period: {outside}."]
    return lines + [""]


def render_markdown(report: dict) -> str:
    run = report["run"]
    lines = ["# Communication report", ""]
    lines += _run_header("Run", run) + _collectives_table(run) + _phase_table(run) + _links_table(run)
    lines += _model_lines(report.get("model"), "run")
    if "baseline" in report:
        base = report["baseline"]
        lines += _run_header("Baseline", base) + _collectives_table(base) + _phase_table(base) + _links_table(base)
        lines += _model_lines(report.get("baseline_model"), "baseline")
        ratios = report["ratios_vs_baseline"]
        lines += ["## Run / baseline, per period", "", "| op | count ratio | bytes ratio | seconds ratio |",
                  "|---|---|---|---|"]
        for op, r in ratios["per_period"].items():
            lines.append(f"| {op} | {_ratio(r['count'])} | {_ratio(r['bytes'])} | {_ratio(r['seconds'])} |")
        t = ratios["total"]
        lines.append(f"| **all** | {_ratio(t['count'])} | {_ratio(t['bytes'])} | {_ratio(t['seconds'])} |")
        lines += [""] + [f"- {n}" for n in ratios["notes"]] + [""]
    notes = [f"run: {n}" for n in run["notes"]] + [f"baseline: {n}" for n in report.get("baseline", {}).get("notes", [])]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Projection", "",
              "Seconds on this machine (CPU, gloo) say little about GPUs; the projection prices the analytical "
              "model's bytes for the paper's model sizes on the target topology.", ""]
    lines += [format_projection_markdown(report["projection"]), ""]
    lines += ["## Recommendations", ""] + [f"- **{r['option']}**: {r['text']}" for r in report["recommendations"]]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    lines += ["", "How to read this report: docs/comm_report.md in pma-dist.", ""]
    return "\n".join(lines)
