"""The ``pma-dist`` command.

``pma-dist report RUN_DIR [--baseline GA_RUN_DIR] [--topology NAME|FILE]``
    turn the per-rank communication ledgers of a run into ``report.json``, ``report.md`` and plots.
``pma-dist bandwidth [--nproc N] [--output FILE] ...``
    nccl-tests style collective micro-benchmark; writes a calibration file for ``--topology``.
``pma-dist project [--topology NAME|FILE] [--period K] ...``
    the 8xA40 projection table alone, for planning before any run.
``pma-dist topologies``
    list the topology presets with their bandwidths and sources.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List, Optional


class CliError(Exception):
    """A bad argument or input: printed as ``pma-dist: error: ...`` with exit status 2."""


# The projection prices every micro-step of a period (about 4 ms each here, so K = 4096 takes ~20 s on
# top of the imports); the papers use K <= 64. A larger K is almost surely a typo, not a plan.
MAX_PERIOD = 4096


def _check_period(value: Optional[int]) -> None:
    """The upper bound (a K below 1 is refused by the projection itself, naming the value)."""
    if value is not None and value > MAX_PERIOD:
        raise CliError(f"--period {value} is out of range: the PMA period K must be in 1..{MAX_PERIOD}")


def _check_outputs(args) -> None:
    """Every output location of the command, writable before any work (a measurement takes minutes)."""
    from ..output_paths import check_writable_dir, check_writable_file

    if args.command == "report" and args.output:
        check_writable_dir(args.output, "--output")
    elif args.command in ("bandwidth", "project") and args.output:
        check_writable_file(args.output, "--output")


def _report(args) -> int:
    from .report import write_run_report

    report = write_run_report(args.run_dir, baseline_dir=args.baseline, topology=args.topology,
                              output_dir=args.output, period=args.period, mfu=args.mfu,
                              plots=not args.no_plots)
    out = args.output or args.run_dir
    print(f"wrote {os.path.join(out, 'report.json')}, {os.path.join(out, 'report.md')}"
          + ("" if args.no_plots else f" and {len(report.get('plots', []))} plot(s)"))
    ratios = report.get("ratios_vs_baseline", {}).get("per_period", {})
    for op, r in ratios.items():
        print(f"  {op:>15}: PMA/GA bytes per period = {_fmt_ratio(r['bytes'])}, count = {_fmt_ratio(r['count'])}")
    links = report["run"].get("links", {})
    if links.get("available"):
        print(f"  links ({len(links['placement']['nodes'])} node(s)): all ranks send {links['per_period']['intra']} B "
              f"intra-node, {links['per_period']['inter']} B inter-node per period")
    return 0


def _fmt_ratio(value) -> str:
    return "n/a" if value is None else (value if isinstance(value, str) else f"{value:.3g}")


def _project(args) -> int:
    from .projection import format_projection_markdown, project

    projection = project(args.topology, period=args.period, dtype=args.dtype, mfu=args.mfu)
    print(format_projection_markdown(projection))
    if args.output:
        import json

        with open(args.output, "w") as f:
            json.dump(projection, f, indent=1)
        print(f"\nwritten to {args.output}")
    return 0


def _topologies(_args) -> int:
    from .topology import PRESETS, SOURCES

    for name, t in PRESETS.items():
        pair = f", NVLink pair {t.pair_busbw:.1f}" if t.pair_busbw else ""
        net = f", network {t.network_busbw:.2f}" if t.network_busbw else ""
        print(f"{name:>20}: {t.description} -- bus bandwidth GB/s: intra-node {t.intra_busbw:.1f}{pair}{net}")
    print("\nsources:")
    for key, text in SOURCES.items():
        print(f"  {key}: {text}")
    return 0


def _launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _bandwidth(args, argv: List[str]) -> int:
    from . import bandwidth as bw

    ops = bw.validate_options(args.ops, args.dtype, args.iters, args.warmup)
    sizes = bw.message_sizes(bw.parse_size(args.min_bytes), bw.parse_size(args.max_bytes))
    bw.check_base_topology(args.base_topology)
    from ..distributed import run_rank, setup_env_from_mpi

    setup_env_from_mpi()  # under mpirun: RANK/WORLD_SIZE/MASTER_* from MPI; no-op otherwise
    if not _launched():
        if args.nproc < 2:
            raise CliError(f"--nproc must be >= 2 to measure collectives, got {args.nproc}")
        # Not started by a launcher: start torchrun on this host with the same arguments.
        forwarded = _without_option(argv, "--nproc")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.nproc}", "-m", "pma_dist.comm.cli"] + forwarded
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        # the ranks must import this same pma_dist, installed or not
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        return subprocess.call(command, env=env)
    run_rank(lambda: bw.run_worker(args.output, ops, sizes, dtype=args.dtype, iters=args.iters, warmup=args.warmup,
                                   base_topology=args.base_topology))
    return 0  # not reached: run_rank ends the process without gloo's exit-time abort


def _without_option(argv: List[str], name: str) -> List[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == name:
            skip = True
            continue
        if item.startswith(name + "="):
            continue
        out.append(item)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pma-dist", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    report = sub.add_parser("report", help="write report.json / report.md / plots for a profiled run")
    report.add_argument("run_dir", metavar="RUN_DIR", help="folder holding comm_rank*.json (comm_profile.output_dir)")
    report.add_argument("--baseline", metavar="GA_RUN_DIR", help="a gradient-accumulation run to compare with")
    report.add_argument("--topology", metavar="NAME|FILE", default=None,
                        help="projection target: a preset (pma-dist topologies) or a calibration/topology JSON; "
                             "default a40x8")
    report.add_argument("--output", metavar="DIR", help="write the report here instead of RUN_DIR")
    report.add_argument("--period", type=int, default=None,
                        help="PMA period K for the projection (default: the run's)")
    report.add_argument("--mfu", type=float, default=None, help="assumed model FLOPs utilisation (default 0.4)")
    report.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    bandwidth = sub.add_parser("bandwidth", help="nccl-tests style collective benchmark -> calibration JSON")
    bandwidth.add_argument("--nproc", type=int, default=2, help="ranks to start when not already launched")
    bandwidth.add_argument("--output", default="bandwidth.json", help="calibration file (default bandwidth.json)")
    bandwidth.add_argument("--ops", nargs="+", default=["all_reduce", "all_gather", "reduce_scatter", "broadcast"])
    bandwidth.add_argument("--min-bytes", default="64K", help="smallest message (default 64K)")
    bandwidth.add_argument("--max-bytes", default="16M", help="largest message (default 16M)")
    bandwidth.add_argument("--dtype", default="float32")
    bandwidth.add_argument("--iters", type=int, default=10)
    bandwidth.add_argument("--warmup", type=int, default=3)
    bandwidth.add_argument("--base-topology", default="a40x8",
                           help="preset whose shape and GPU the calibration keeps (default a40x8)")

    project = sub.add_parser("project", help="projection of PMA vs GA communication onto a topology")
    project.add_argument("--topology", metavar="NAME|FILE", default=None)
    project.add_argument("--period", type=int, default=8, help="PMA period K (default 8, the paper's SFT)")
    project.add_argument("--dtype", default="bfloat16")
    project.add_argument("--mfu", type=float, default=None)
    project.add_argument("--output", metavar="FILE", help="also write the projection as JSON")

    sub.add_parser("topologies", help="list topology presets and the sources of their constants")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("report", "project"):
            _check_period(args.period)
        if args.command != "topologies":
            _check_outputs(args)
        if args.command == "report":
            return _report(args)
        if args.command == "bandwidth":
            return _bandwidth(args, argv)
        if args.command == "project":
            return _project(args)
        return _topologies(args)
    except (CliError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
        parser.exit(2, f"pma-dist: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
