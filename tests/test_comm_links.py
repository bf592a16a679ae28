"""Intra- vs inter-node bytes by rank placement: the ring attribution, placements, the report's links section.

Expected numbers are worked out by hand in the comments (a ring over n ranks; each rank sends to its
successor: all-reduce 2(n-1)/n x S, all-gather / reduce-scatter (n-1)/n x S, broadcast S except the
root's predecessor, reduce S except the root), not read from pma_dist.
"""
import json
from fractions import Fraction

import pytest

from pma_dist.comm import links, placement, projection, report
from pma_dist.comm.report_text import render_markdown
from pma_dist.comm.topology import PRESETS

S = 1200  # message bytes: divisible by 2, 3 and 4, so every per-rank share is whole

# placement -> op -> {rank: (intra, inter)} for one collective of S bytes over all ranks, root 0
EXPECTED = {
    # 1 node x 2: the ring 0 -> 1 -> 0 never leaves the node
    (1, 2): {"all_reduce": {0: (1200, 0), 1: (1200, 0)},          # 2(2-1)/2 x 1200 = 1200 each
             "all_gather": {0: (600, 0), 1: (600, 0)},            # (2-1)/2 x 1200 = 600 each
             "reduce_scatter": {0: (600, 0), 1: (600, 0)},
             "broadcast": {0: (1200, 0), 1: (0, 0)},              # chain 0 -> 1: rank 1 sends nothing
             "reduce": {0: (0, 0), 1: (1200, 0)}},                # chain 1 -> 0: the root sends nothing
    # 2 nodes x 1: both hops cross
    (2, 1): {"all_reduce": {0: (0, 1200), 1: (0, 1200)},
             "all_gather": {0: (0, 600), 1: (0, 600)},
             "reduce_scatter": {0: (0, 600), 1: (0, 600)},
             "broadcast": {0: (0, 1200), 1: (0, 0)},
             "reduce": {0: (0, 0), 1: (0, 1200)}},
    # 2 nodes x 2 (ranks 0,1 | 2,3): ring 0 -> 1 -> 2 -> 3 -> 0; ranks 1 and 3 send across
    (2, 2): {"all_reduce": {0: (1800, 0), 1: (0, 1800), 2: (1800, 0), 3: (0, 1800)},  # 2(4-1)/4 x 1200 = 1800
             "all_gather": {0: (900, 0), 1: (0, 900), 2: (900, 0), 3: (0, 900)},      # 3/4 x 1200 = 900
             "reduce_scatter": {0: (900, 0), 1: (0, 900), 2: (900, 0), 3: (0, 900)},
             "broadcast": {0: (1200, 0), 1: (0, 1200), 2: (1200, 0), 3: (0, 0)},     # chain 0 -> 1 -> 2 -> 3
             "reduce": {0: (0, 0), 1: (0, 1200), 2: (1200, 0), 3: (0, 1200)}},       # chain 1 -> 2 -> 3 -> 0
    # 3 nodes x 1: every hop crosses
    (3, 1): {"all_reduce": {0: (0, 1600), 1: (0, 1600), 2: (0, 1600)},  # 2(3-1)/3 x 1200 = 1600
             "all_gather": {0: (0, 800), 1: (0, 800), 2: (0, 800)},     # 2/3 x 1200 = 800
             "reduce_scatter": {0: (0, 800), 1: (0, 800), 2: (0, 800)},
             "broadcast": {0: (0, 1200), 1: (0, 1200), 2: (0, 0)},      # chain 0 -> 1 -> 2
             "reduce": {0: (0, 0), 1: (0, 1200), 2: (0, 1200)}},        # chain 1 -> 2 -> 0
}


@pytest.mark.parametrize("shape", sorted(EXPECTED))
@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce"])
def test_ring_attribution_per_placement(shape, op):
    node_of = placement.grid_node_map(*shape)
    got = links.sent_bytes(op, S, sorted(node_of), node_of, root=0)
    assert got == {r: (Fraction(a), Fraction(b)) for r, (a, b) in EXPECTED[shape][op].items()}


def test_two_nodes_of_one_rank_is_all_inter_one_node_of_two_all_intra():
    for op in links.ATTRIBUTED_OPS:
        assert links.summed(links.sent_bytes(op, S, [0, 1], placement.grid_node_map(2, 1)))[0] == 0
        assert links.summed(links.sent_bytes(op, S, [0, 1], placement.grid_node_map(1, 2)))[1] == 0


def test_the_root_decides_how_often_a_chain_crosses():
    node_of = placement.grid_node_map(2, 2)  # ranks 0,1 | 2,3
    # broadcast from 1 (last of its node): chain 1 -> 2 -> 3 -> 0 crosses twice (1->2, 3->0); from 0 once
    assert links.summed(links.sent_bytes("broadcast", S, [0, 1, 2, 3], node_of, root=1)) == (1200, 2400)
    assert links.summed(links.sent_bytes("broadcast", S, [0, 1, 2, 3], node_of, root=0)) == (2400, 1200)
    # reduce to 1: chain 2 -> 3 -> 0 -> 1 crosses once (3->0)
    assert links.summed(links.sent_bytes("reduce", S, [0, 1, 2, 3], node_of, root=1)) == (2400, 1200)


def test_ring_groups_each_nodes_ranks_together_and_sub_groups_use_their_members():
    interleaved = {0: "a", 1: "b", 2: "a", 3: "b"}  # a launcher that numbered ranks round-robin
    assert links.ring_order([3, 2, 1, 0], interleaved) == [0, 2, 1, 3]
    # ring 0 -> 2 -> 1 -> 3 -> 0: ranks 2 (to 1) and 3 (to 0) cross; 1800 B each as on 2x2
    got = links.sent_bytes("all_reduce", S, [0, 1, 2, 3], interleaved)
    assert got == {0: (1800, 0), 2: (0, 1800), 1: (1800, 0), 3: (0, 1800)}
    node_of = placement.grid_node_map(2, 2)
    assert links.sent_bytes("all_reduce", 60, [1, 2], node_of) == {1: (0, 60), 2: (0, 60)}  # across the boundary
    assert links.sent_bytes("all_reduce", 60, [2, 3], node_of) == {2: (60, 0), 3: (60, 0)}  # inside node 1


def test_a_third_of_a_byte_stays_exact():
    # 2(3-1)/3 x 4 B = 16/3 B per rank
    assert links.sent_bytes("all_reduce", 4, [0, 1, 2], placement.grid_node_map(3, 1))[0] == (0, Fraction(16, 3))


@pytest.mark.parametrize("call, match", [
    (lambda: links.sent_bytes("all_to_all", S, [0, 1], {0: "a", 1: "b"}), "no link model for 'all_to_all'"),
    (lambda: links.sent_bytes("all_reduce", S, [0, 1], {0: "a"}), r"no placement for rank\(s\) \[1\]"),
    (lambda: links.sent_bytes("broadcast", S, [0, 1], {0: "a", 1: "b"}, root=5), "root 5 is not in its group"),
    (lambda: links.sent_bytes("all_reduce", S, [], {}), r"at least one rank, got group \[\]"),
    (lambda: placement.grid_node_map(0, 8), "at least 1 node"),
])
def test_bad_attribution_inputs_name_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- placement: what each launcher sets ---------------------------------------------------------
@pytest.mark.parametrize("env, node_rank, source, local_rank, local_size", [
    ({"GROUP_RANK": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, 1, "GROUP_RANK", 0, 1),  # torchrun
    ({"CROSS_RANK": "2", "CROSS_SIZE": "3", "LOCAL_RANK": "1", "LOCAL_SIZE": "4"}, 2, "CROSS_RANK", 1, 4),  # deepspeed
    ({"SLURM_NODEID": "5", "SLURM_LOCALID": "3"}, 5, "SLURM_NODEID", 3, None),                  # srun
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, None, None, 1, 2),  # mpirun
    ({}, None, None, None, None),
])
def test_placement_reads_each_launchers_variables(env, node_rank, source, local_rank, local_size):
    p = placement.rank_placement(env, hostname="gpu07")
    assert p == {"host": "gpu07", "node_rank": node_rank, "node_rank_from": source, "local_rank": local_rank,
                 "local_world_size": local_size}
    assert placement.node_name(p) == ("gpu07" if node_rank is None else f"gpu07/node{node_rank}")


def test_bad_launcher_variable_is_named():
    with pytest.raises(ValueError, match=r"GROUP_RANK='x' is not an integer"):
        placement.rank_placement({"GROUP_RANK": "x"}, hostname="h")


# --- the report's links section -------------------------------------------------------------------
def write_placed_run(run_dir, hosts, node_ranks, *, period=2, periods=3):
    """4 ranks, ZeRO-2-like: per micro-step an all-reduce of 1000 B (world), a broadcast of 400 B from rank 0,
    an all-reduce of 60 B on the sub-group [1, 2], a 10 B send on rank 0 (no link model) and a barrier;
    one 5000 B broadcast before training (left out)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    world = len(hosts)
    for rank in range(world):
        records = [{"micro_step": -1, "pma_kind": "none", "phase": "other", "op": "broadcast", "root": 0,
                    "count": 1, "bytes": 5000, "seconds": 0.0}]
        for i in range(period * periods):
            kind = "large" if (i + 1) % period == 0 else "small"
            base = {"micro_step": i, "pma_kind": kind, "seconds": 1e-3}
            records += [dict(base, phase="backward", op="all_reduce", count=1, bytes=1000),
                        dict(base, phase="step", op="broadcast", root=0, count=1, bytes=400),
                        dict(base, phase="other", op="barrier", count=1, bytes=0)]
            if rank in (1, 2):
                records.append(dict(base, phase="step", op="all_reduce", group=[1, 2], count=1, bytes=60))
            if rank == 0:
                records.append(dict(base, phase="other", op="send", count=1, bytes=10))
        meta = {"backend": "deepspeed", "optimizer": "AdamWPMA", "pma": True, "zero_stage": 2, "period": period,
                "world_size": world, "dtype": "float32", "param_count": 250, "param_bytes": 1000, "rank": rank,
                "micro_steps": period * periods, "format_version": 1,
                "placement": {"host": hosts[rank], "node_rank": node_ranks[rank],
                              "node_rank_from": None if node_ranks[rank] is None else "GROUP_RANK",
                              "local_rank": rank % 2, "local_world_size": 2}}
        (run_dir / f"comm_rank{rank}.json").write_text(json.dumps({"meta": meta, "records": records}))
    return run_dir


def test_report_splits_each_ranks_bytes_by_placement(tmp_path):
    run = write_placed_run(tmp_path / "run", ["a", "a", "b", "b"], [None] * 4)
    links_section = report.summarize(report.load_run(run))["links"]
    # Per micro-step, ring 0 -> 1 -> 2 -> 3 (nodes a: 0,1 | b: 2,3):
    #   all-reduce 1000 B: every rank sends 2(4-1)/4 x 1000 = 1500, ranks 1 and 3 across the boundary;
    #   broadcast 400 B from 0: chain 0 -> 1 -> 2 -> 3, ranks 0 (intra), 1 (inter), 2 (intra) send 400;
    #   sub-group [1, 2] all-reduce 60 B: ranks 1 and 2 send 2(2-1)/2 x 60 = 60, across.
    # Two micro-steps per period: rank 0 intra 2 x (1500 + 400) = 3800; rank 1 inter 2 x (1500 + 400 + 60)
    # = 3920; rank 2 intra 3800, inter 120; rank 3 inter 3000.
    per_period = {r: (v["per_period"]["intra"], v["per_period"]["inter"]) for r, v in links_section["per_rank"].items()}
    assert per_period == {"0": (3800, 0), "1": (0, 3920), "2": (3800, 120), "3": (0, 3000)}
    assert links_section["per_period"] == {"intra": 7600, "inter": 7040}
    # total: 6 micro-steps = 3 periods (the broadcast before training is left out)
    assert links_section["total"] == {"intra": 3 * 7600, "inter": 3 * 7040}
    assert links_section["by_op_per_period"] == {
        "all_reduce": {"intra": 2 * 1500 * 2, "inter": 2 * (1500 * 2 + 60 * 2)},
        "broadcast": {"intra": 2 * 800, "inter": 2 * 400}}
    assert links_section["unattributed_per_period"] == {"send": 20}
    assert links_section["placement"]["nodes"] == {"a": [0, 1], "b": [2, 3]}
    assert not any("loopback" in n for n in links_section["notes"])


def test_one_host_emulating_nodes_is_said_and_ranks_on_one_node_are_all_intra(tmp_path):
    emulated = report.summarize(report.load_run(write_placed_run(tmp_path / "emu", ["h"] * 4, [0, 0, 1, 1])))
    assert emulated["links"]["placement"]["nodes"] == {"h/node0": [0, 1], "h/node1": [2, 3]}
    assert emulated["links"]["per_period"] == {"intra": 7600, "inter": 7040}  # same split as two real hosts
    assert any("2 nodes on 1 host(s)" in n and "GROUP_RANK" in n for n in emulated["links"]["notes"])
    one_node = report.summarize(report.load_run(write_placed_run(tmp_path / "one", ["h"] * 4, [0] * 4)))
    # all four on one node: intra = everything sent, 4 x 2 x 1500 + 3 x 2 x 400 + 2 x 2 x 60
    assert one_node["links"]["per_period"] == {"intra": 12000 + 2400 + 240, "inter": 0}


def test_ledgers_without_placement_are_reported_not_attributed(tmp_path):
    run = write_placed_run(tmp_path / "run", ["a", "a", "b", "b"], [None] * 4)
    first = run / "comm_rank3.json"
    data = json.loads(first.read_text())
    del data["meta"]["placement"]
    first.write_text(json.dumps(data))
    built = report.build_report(run)
    assert built["run"]["links"] == {"available": False, "reason": "no placement for rank(s) [3]: their ledger "
                                     "files are missing or were written before the ledger recorded placements"}
    assert "not attributed -- no placement for rank(s) [3]" in render_markdown(built)


def test_report_markdown_shows_the_split(tmp_path):
    built = report.build_report(write_placed_run(tmp_path / "run", ["a", "a", "b", "b"], [None] * 4))
    text = render_markdown(built)
    assert "| 1 | a | 0 B (0) | 3.92 KB (3920) |" in text
    assert "| all |  | 7.6 KB (7600) | 7.04 KB (7040) |" in text


def test_cli_report_prints_the_split(tmp_path, capsys):
    from pma_dist.comm import cli

    run = write_placed_run(tmp_path / "run", ["a", "a", "b", "b"], [None] * 4)
    assert cli.main(["report", str(run), "--no-plots"]) == 0
    assert "links (2 node(s)): all ranks send 7600 B intra-node, 7040 B inter-node per period" in capsys.readouterr().out


# --- the projection uses the same attribution -------------------------------------------------------
def test_projection_link_bytes_follow_the_ring_on_one_and_two_nodes():
    records = [{"micro_step": 0, "phase": "backward", "op": "all_reduce", "count": 1, "bytes": 1600},
               {"micro_step": 0, "phase": "step", "op": "all_gather", "count": 1, "bytes": 3200},
               {"micro_step": 0, "phase": "other", "op": "barrier", "count": 1, "bytes": 0}]
    # 1 node x 8: all-reduce 8 x 2(7)/8 x 1600 = 22400, all-gather 8 x 7/8 x 3200 = 22400, all intra
    assert projection.link_bytes(records, PRESETS["a40x8"]) == {"intra": 44800, "inter": 0}
    # 2 nodes x 8: 16 ranks, all-reduce 2(15)/16 x 1600 = 3000 per rank, all-gather 15/16 x 3200 = 3000;
    # 2 of the 16 ring hops cross (rank 7 -> 8, 15 -> 0)
    assert projection.link_bytes(records, PRESETS["a40x8-2node-100g"]) == {"intra": 14 * 6000, "inter": 2 * 6000}


def test_projection_rows_carry_link_bytes_and_the_price_is_the_slowest_hop():
    topo = PRESETS["a40x8-2node-100g"]
    row = next(r for r in projection.project(topo, period=8)["rows"] if r["setup"] == "ZeRO-0")
    # ZeRO-0 GA: one bf16 gradient all-reduce of P x 2 bytes per period; each of 16 ranks sends 2(15)/16 of it
    params = projection.MODEL_SIZES[row["model"]]
    per_rank = Fraction(2 * 15, 16) * 2 * params
    assert row["ga"]["link_bytes"] == {"intra": links.as_number(14 * per_rank), "inter": links.as_number(2 * per_rank)}
    # the ring's bandwidth term: every hop carries per_rank bytes, the inter-node hop is the slowest
    slowest = max(float(per_rank) / (topo.intra_busbw * 1e9), float(per_rank) / (topo.network_busbw * 1e9))
    priced = topo.collective_seconds("all_reduce", 2 * params) - topo.latency("all_reduce", 16, 2)
    assert priced == pytest.approx(slowest, rel=1e-12)  # float rounding of one division only
