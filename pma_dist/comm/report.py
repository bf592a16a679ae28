"""Turn a profiled run's per-rank ledgers into ``report.json``, ``report.md`` and PNG plots.

Rank 0 calls :func:`write_run_report` when the engine is destroyed (``pma_dist.comm.deepspeed_attach``),
and ``pma-dist report RUN_DIR [--baseline GA_RUN_DIR] [--topology NAME|FILE]`` calls it on finished runs.

Steady state. Micro-step ``i`` (0-based, the engine's counter) belongs to period ``i // K``; for PMA the
large step closes each period and for GA the boundary does. The per-period numbers are the mean over
the complete periods after the first (the first carries one-time set-up traffic: ZeRO's first step,
ZeRO-3's two trace-recording micro-steps -- ``model.warmup_micro_steps``); with too few periods the last
one is used as is. ``steady`` says whether every counted period sent exactly the same messages, i.e.
whether the per-period bytes are exact rather than a mean.
Counts and bytes are rank 0's (``ranks_agree`` says whether all ranks logged the same); seconds are
the mean over ranks. How to read the report: ``docs/comm_report.md``.
"""
from __future__ import annotations

import glob
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..schedule import MicroStepSchedule
from .report_links import link_summary

REPORT_KIND = "pma-dist/report"
SUPPORTED_FORMATS = (1,)
REQUIRED_META = ("optimizer", "zero_stage", "period", "world_size", "micro_steps")
_RANK_FILE = re.compile(r"comm_rank(\d+)\.json$")

Key = Tuple[int, str, str, str]  # (micro_step, kind, phase, op)


class ReportError(ValueError):
    """A run folder or ledger file that cannot be reported on; the message names it."""


#: (micro_step, op, group's global ranks or None for the world, root or None) -> message bytes
RouteKey = Tuple[int, str, Optional[Tuple[int, ...]], Optional[int]]


@dataclass
class RankLedger:
    path: str
    meta: dict
    records: Dict[Key, Tuple[int, int, float]]
    routes: Dict[RouteKey, int] = field(default_factory=dict)  # what the link attribution reads


@dataclass
class Run:
    """All ranks' ledgers of one run."""
    run_dir: str
    ranks: Dict[int, RankLedger]
    notes: List[str] = field(default_factory=list)

    @property
    def meta(self) -> dict:
        return self.ranks[min(self.ranks)].meta


# --- loading -------------------------------------------------------------------------------------
def _load_rank_file(path: str) -> RankLedger:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ReportError(f"ledger file {path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict) or not isinstance(data.get("records"), list):
        raise ReportError(f"ledger file {path!r} must be an object with 'meta' and 'records' "
                          "(written by pma_dist.comm.CommLedger)")
    meta = data["meta"]
    version = meta.get("format_version")
    if version not in SUPPORTED_FORMATS:
        raise ReportError(f"ledger file {path!r} has format_version {version!r}; this pma-dist reads "
                          f"{SUPPORTED_FORMATS}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ReportError(f"ledger file {path!r} lacks meta field(s) {missing}")
    for key in ("zero_stage", "period", "world_size", "micro_steps"):
        value = meta[key]
        if key == "zero_stage" and value is None and meta.get("backend") != "deepspeed":
            continue  # FSDP2 / DDP runs have no ZeRO stage
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (key in ("period", "world_size") and value < 1):
            raise ReportError(f"ledger file {path!r}: meta.{key} must be a {'positive' if key in ('period', 'world_size') else 'non-negative'} int, got {value!r}")
    records: Dict[Key, Tuple[int, int, float]] = {}
    routes: Dict[RouteKey, int] = defaultdict(int)
    for i, r in enumerate(data["records"]):
        try:
            key = (int(r["micro_step"]), str(r["pma_kind"]), str(r["phase"]), str(r["op"]))
            value = (int(r["count"]), int(r["bytes"]), float(r["seconds"]))
            group = r.get("group")
            group = None if group is None else tuple(int(g) for g in group)
            root = None if r.get("root") is None else int(r["root"])
        except (KeyError, TypeError, ValueError):
            raise ReportError(f"ledger file {path!r}: records[{i}] must have micro_step, pma_kind, phase, op, "
                              f"count, bytes, seconds (and optionally group: a list of ranks, root: a rank); "
                              f"got {r!r}") from None
        old = records.get(key, (0, 0, 0.0))
        records[key] = (old[0] + value[0], old[1] + value[1], old[2] + value[2])
        routes[(key[0], key[3], group, root)] += value[1]
    return RankLedger(path, meta, records, dict(routes))


def load_run(run_dir) -> Run:
    """Read every ``comm_rank*.json`` in ``run_dir``; errors name the folder or file at fault."""
    run_dir = str(run_dir)
    if not os.path.exists(run_dir):
        raise ReportError(f"run folder {run_dir!r} does not exist")
    if not os.path.isdir(run_dir):
        raise ReportError(f"run folder {run_dir!r} is not a directory")
    ranks: Dict[int, RankLedger] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "comm_rank*.json"))):
        match = _RANK_FILE.search(path)
        if match:
            ranks[int(match.group(1))] = _load_rank_file(path)
    if not ranks:
        raise ReportError(f"run folder {run_dir!r} holds no comm_rank*.json ledger files "
                          "(enable \"comm_profile\" in the DeepSpeed config, or point at its output_dir)")
    run = Run(run_dir, ranks)
    first = run.meta
    for rank, ledger in ranks.items():
        for key in ("optimizer", "zero_stage", "period", "world_size"):
            if ledger.meta.get(key) != first.get(key):
                raise ReportError(f"{ledger.path}: meta.{key}={ledger.meta.get(key)!r} differs from rank "
                                  f"{min(ranks)}'s {first.get(key)!r}; are two runs mixed in {run_dir!r}?")
    missing = sorted(set(range(first["world_size"])) - set(ranks))
    if missing:
        run.notes.append(f"ledger files of rank(s) {missing} are missing; seconds are averaged over the others")
    return run


# --- aggregation ---------------------------------------------------------------------------------
def _zero() -> dict:
    return {"count": 0, "bytes": 0, "seconds": 0.0}


def _add(target: dict, count: int, nbytes: int, seconds: float) -> None:
    target["count"] += count
    target["bytes"] += nbytes
    target["seconds"] += seconds


def _scaled(entry: dict, factor: float) -> dict:
    out = {"count": entry["count"] * factor, "bytes": entry["bytes"] * factor, "seconds": entry["seconds"] * factor}
    for key in ("count", "bytes"):
        if float(out[key]).is_integer():
            out[key] = int(out[key])
    return out


def _mean_seconds(run: Run) -> Dict[Key, float]:
    """Seconds per record key, averaged over the ranks that logged it."""
    sums: Dict[Key, List[float]] = defaultdict(list)
    for ledger in run.ranks.values():
        for key, (_, _, seconds) in ledger.records.items():
            sums[key].append(seconds)
    return {key: sum(values) / len(values) for key, values in sums.items()}


def setup_label(meta: dict) -> str:
    """"ZeRO-2" for DeepSpeed runs, the backend's name ("FSDP2", "DDP") otherwise."""
    if meta.get("zero_stage") is not None:
        return f"ZeRO-{meta['zero_stage']}"
    return str(meta.get("backend") or "unknown").upper()


def warmup_micro_steps(meta: dict) -> int:
    """Micro-steps whose traffic is one-time (ZeRO-3 records its module trace in the first two)."""
    from . import model

    try:
        return model.warmup_micro_steps(model.Setup.from_meta(meta))
    except (KeyError, ValueError, TypeError):
        return 0


def summarize(run: Run) -> dict:
    """The per-run section of ``report.json``."""
    meta = run.meta
    period = meta["period"]
    schedule = MicroStepSchedule.from_cycle(period, bool(meta.get("pma")))
    micro_steps = meta["micro_steps"]
    reference = run.ranks[min(run.ranks)]
    seconds = _mean_seconds(run)
    ranks_agree = all({k: v[:2] for k, v in ledger.records.items() if k[0] >= 0}
                      == {k: v[:2] for k, v in reference.records.items() if k[0] >= 0}
                      for ledger in run.ranks.values())
    notes = list(run.notes)
    if not ranks_agree:
        notes.append("ranks logged different training collectives; counts and bytes are rank "
                     f"{min(run.ranks)}'s")

    complete = schedule.complete_cycles(micro_steps)
    if complete == 0:
        raise ReportError(f"run {run.run_dir!r} has {micro_steps} micro-step(s), fewer than one period "
                          f"(K={period}); train at least K micro-steps")
    if not schedule.ends_cycle(micro_steps):
        notes.append(f"{micro_steps - complete * period} micro-step(s) after the last complete period are left "
                     "out of the per-period numbers")
    skip = max(1, -(-warmup_micro_steps(meta) // period))  # periods holding one-time set-up traffic
    counted = list(range(skip, complete)) if complete > skip else [complete - 1]
    if complete <= skip:
        notes.append(f"only {complete} complete period(s): per-period numbers include one-time set-up traffic "
                     f"(the first {skip} period(s) are normally left out)")
    per_period_list: List[Dict[str, dict]] = [defaultdict(_zero) for _ in range(complete)]
    by_phase: Dict[str, Dict[str, dict]] = defaultdict(lambda: defaultdict(_zero))
    by_kind: Dict[str, Dict[str, dict]] = defaultdict(lambda: defaultdict(_zero))
    kind_steps: Dict[str, set] = defaultdict(set)
    before: Dict[str, dict] = defaultdict(_zero)
    total: Dict[str, dict] = defaultdict(_zero)
    for key, (count, nbytes, _) in sorted(reference.records.items()):
        micro_step, kind, phase, op = key
        sec = seconds.get(key, 0.0)
        if micro_step < 0:
            _add(before[op], count, nbytes, sec)
            continue
        _add(total[op], count, nbytes, sec)
        index = schedule.cycle_of(micro_step)
        if index >= complete:
            continue
        _add(per_period_list[index][op], count, nbytes, sec)
        if index in counted:
            _add(by_phase[op][phase], count, nbytes, sec)
            _add(by_kind[kind][op], count, nbytes, sec)
            kind_steps[kind].add(micro_step)

    ops = sorted(total)
    n = len(counted)
    steady = all({op: (per_period_list[i][op]["count"], per_period_list[i][op]["bytes"]) for op in ops}
                 == {op: (per_period_list[counted[0]][op]["count"], per_period_list[counted[0]][op]["bytes"])
                     for op in ops} for i in counted)
    collectives = {}
    for op in ops:
        summed = _zero()
        for i in counted:
            entry = per_period_list[i][op]
            _add(summed, entry["count"], entry["bytes"], entry["seconds"])
        per_period = _scaled(summed, 1.0 / n)
        collectives[op] = {"per_period": per_period, "per_micro_step": _scaled(per_period, 1.0 / period),
                           "total": dict(total[op])}
    kinds_expected = schedule.kinds_per_cycle
    by_kind_out = {}
    for kind, per_op in by_kind.items():
        # micro-steps of this kind per period: from the schedule, since a kind that sent nothing has no record
        steps_of_kind = kinds_expected.get(kind, len(kind_steps[kind]) / n) * n
        by_kind_out[kind] = {op: _scaled(v, 1.0 / steps_of_kind) for op, v in sorted(per_op.items())} \
            if steps_of_kind else {}
    out = {
        "run_dir": os.path.abspath(run.run_dir),
        "backend": meta.get("backend"),
        "optimizer": meta["optimizer"],
        "pma": bool(meta.get("pma", False)),
        "zero_stage": meta["zero_stage"],
        "setup": setup_label(meta),
        "period": period,
        "world_size": meta["world_size"],
        "micro_steps": micro_steps,
        "complete_periods": complete,
        "periods_averaged": n,
        "first_counted_period": counted[0],
        "steady": steady,
        "dtype": meta.get("dtype"),
        "param_count": meta.get("param_count"),
        "param_bytes": meta.get("param_bytes"),
        "ranks": sorted(run.ranks),
        "ranks_agree": ranks_agree,
        "collectives": collectives,
        "by_phase_per_period": {op: {ph: _scaled(v, 1.0 / n) for ph, v in sorted(phases.items())}
                                for op, phases in sorted(by_phase.items())},
        "by_kind_per_micro_step": by_kind_out,
        "before_training": {op: dict(v) for op, v in sorted(before.items())},
        "totals_per_period": _scaled(_sum_entries(c["per_period"] for c in collectives.values()), 1.0),
        "notes": notes,
    }
    out["links"] = link_summary(run, out)
    return out


def _sum_entries(entries) -> dict:
    out = _zero()
    for e in entries:
        _add(out, e["count"], e["bytes"], e["seconds"])
    return out


def _ratio(a, b):
    if b:
        return a / b
    return None if a else 1.0


def compare(run: dict, baseline: dict) -> dict:
    """PMA / GA ratios per op, per period (bytes, count, seconds); None where GA sends nothing."""
    notes = []
    for key in ("world_size", "setup", "period", "dtype"):
        if run.get(key) != baseline.get(key):
            notes.append(f"{key} differs: run {run.get(key)!r} vs baseline {baseline.get(key)!r} -- ratios "
                         "compare unlike set-ups")
    if baseline.get("pma"):
        notes.append("the baseline is itself a PMA run")
    per_period = {}
    for op in sorted(set(run["collectives"]) | set(baseline["collectives"])):
        mine = run["collectives"].get(op, {}).get("per_period", _zero())
        theirs = baseline["collectives"].get(op, {}).get("per_period", _zero())
        per_period[op] = {k: _ratio(mine[k], theirs[k]) for k in ("count", "bytes", "seconds")}
        if not theirs["count"] and mine["count"]:
            notes.append(f"{op}: the baseline sends none per period, PMA sends {mine['count']} "
                         f"({mine['bytes']} B); ratio undefined")
    totals = {k: _ratio(run["totals_per_period"][k], baseline["totals_per_period"][k])
              for k in ("count", "bytes", "seconds")}
    return {"per_period": per_period, "total": totals, "notes": notes}


# --- the analytical model ----------------------------------------------------------------------
ENGINE_PHASES = ("forward", "backward", "step")


def model_check(summary: dict, run: Run) -> dict:
    """Measured per-period counts and bytes next to :mod:`pma_dist.comm.model`'s, plus its per-micro-step check.

    The model covers what the training engine sends in forward / backward / step; collectives in phase
    "other" (a training loop's loss logging, evaluation) are user traffic and listed apart. Only the
    complete periods are checked.
    """
    from . import model

    period = summary["period"]
    checked = summary["complete_periods"] * period
    meta = dict(run.meta, micro_steps=checked)
    records = [{"micro_step": k[0], "pma_kind": k[1], "phase": k[2], "op": k[3], "count": c, "bytes": b}
               for k, (c, b, _) in run.ranks[min(run.ranks)].records.items()
               if k[2] in ENGINE_PHASES and k[0] < checked]
    try:
        setup = model.Setup.from_meta(meta)
        predicted = model.period_totals(setup)
        measured_steps = model.measured_totals(records)
        # the micro-steps of the counted periods (the first period's one-time traffic is not modelled)
        first = max(model.warmup_micro_steps(setup), summary["first_counted_period"] * period)
        problems = []
        for i in range(first, checked):
            got, want = measured_steps.get(i, {}), model.micro_step_totals(setup, i)
            if got != want:
                problems.append(f"micro-step {i}: measured {sorted(got.items())} != model {sorted(want.items())}")
    except (KeyError, ValueError, TypeError) as exc:  # a set-up the model does not cover is reported, not fatal
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    rows, agree, outside = {}, True, {}
    for op in sorted(set(predicted) | set(summary["collectives"])):
        by_phase = summary["by_phase_per_period"].get(op, {})
        measured = _sum_entries(v for phase, v in by_phase.items() if phase in ENGINE_PHASES)
        if "other" in by_phase:
            outside[op] = by_phase["other"]
        count, nbytes = predicted.get(op, (0, 0))
        same = measured["count"] == count and measured["bytes"] == nbytes
        agree &= same
        rows[op] = {"measured_count": measured["count"], "model_count": count,
                    "measured_bytes": measured["bytes"], "model_bytes": nbytes, "equal": same}
    return {"available": True, "agree": agree and not problems, "per_period": rows,
            "micro_step_mismatches": problems[:10], "micro_steps_checked": [first, checked],
            "outside_engine_per_period": outside}


# --- writing -------------------------------------------------------------------------------------
def build_report(run_dir, baseline_dir=None, topology=None, *, period: Optional[int] = None,
                 mfu: Optional[float] = None) -> dict:
    from .projection import project, recommendations

    run = load_run(run_dir)
    summary = summarize(run)
    report = {"kind": REPORT_KIND, "version": 1, "run": summary, "model": model_check(summary, run)}
    if baseline_dir is not None:
        baseline_run = load_run(baseline_dir)
        baseline = summarize(baseline_run)
        report["baseline"] = baseline
        report["baseline_model"] = model_check(baseline, baseline_run)
        report["ratios_vs_baseline"] = compare(summary, baseline)
    projection = project(topology, period=summary["period"] if period is None else period, mfu=mfu)
    report["projection"] = projection
    report["recommendations"] = recommendations(projection)
    return report


def write_run_report(run_dir, baseline_dir=None, topology=None, *, output_dir=None, period: Optional[int] = None,
                     mfu: Optional[float] = None, plots: bool = True) -> dict:
    """Write ``report.json``, ``report.md`` and (``plots``) PNGs into ``output_dir`` (default ``run_dir``)."""
    from .report_text import render_markdown

    report = build_report(run_dir, baseline_dir, topology, period=period, mfu=mfu)
    out = str(output_dir or run_dir)
    os.makedirs(out, exist_ok=True)
    report["plots"] = []
    if plots:
        try:
            from .report_plots import write_plots
            report["plots"] = write_plots(report, out)
        except ImportError as exc:  # matplotlib missing: still write the numbers
            report["run"]["notes"].append(f"plots skipped: {exc}")
    _atomic_write(os.path.join(out, "report.json"), json.dumps(report, indent=1))
    _atomic_write(os.path.join(out, "report.md"), render_markdown(report))
    return report


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
