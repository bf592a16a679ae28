"""launch/train.py's job as 2 nodes x 1 rank on this host (two torchrun agents meeting at a c10d rendezvous).

Each agent is one "node" (its own GROUP_RANK, LOCAL_WORLD_SIZE 1); the job must finish and give the
same numbers as 1 node x 2 ranks: the same global ranks read the same data and gloo reduces the same
two tensors in the same order, so the tolerance is 0.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launching import REPO, WORKERS, free_port, rank_env, require_shared_data, run_ranks

pytestmark = pytest.mark.slow


def _read(out):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_nodes_of_one_rank_match_one_node_of_two(tmp_path):
    shared = require_shared_data("models", "stories260K").parents[1]
    require_shared_data("sft", "alpaca_mix_train.jsonl")
    two_nodes = tmp_path / "two_nodes"
    two_nodes.mkdir()
    port = free_port()
    torchrun = str(Path(sys.executable).parent / "torchrun")
    agents = [subprocess.Popen([torchrun, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                                f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
                                str(WORKERS / "scale_two_nodes.py"), str(two_nodes), str(shared)],
                               cwd=REPO, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True) for _ in range(2)]
    try:
        results = [a.communicate(timeout=400) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    for agent, (_, err) in zip(agents, results):
        assert agent.returncode == 0, err[-4000:]
    ranks = _read(two_nodes)
    assert sorted(r["placement"]["GROUP_RANK"] for r in ranks) == ["0", "1"]  # one rank on each node
    assert all(r["placement"]["LOCAL_WORLD_SIZE"] == "1" and r["placement"]["WORLD_SIZE"] == "2" for r in ranks)

    one_node = tmp_path / "one_node"
    one_node.mkdir()
    run_ranks("scale_two_nodes.py", [one_node, shared], nproc=2, launcher="torchrun", timeout=400)
    single = _read(one_node)
    assert all(r["placement"]["LOCAL_WORLD_SIZE"] == "2" for r in single)
    for key in ("eval_loss", "optimizer_steps", "world_size", "samples"):
        assert ranks[0]["summary"][key] == single[0]["summary"][key], key
    assert _train_losses(two_nodes) and _train_losses(two_nodes) == _train_losses(one_node)

    # The comm report puts the same traffic on inter-node links for 2 x 1 and on intra-node links for 1 x 2.
    for out, crossing, staying in ((two_nodes, "inter", "intra"), (one_node, "intra", "inter")):
        links = json.loads((out / "comm" / "report.json").read_text())["run"]["links"]
        assert links["available"], links
        assert len(links["placement"]["nodes"]) == (2 if out is two_nodes else 1)
        for rank in range(2):
            want = _ring_bytes_sent_by_two_ranks(out / "comm" / f"comm_rank{rank}.json", rank)
            assert want > 0
            assert links["per_rank"][str(rank)]["total"] == {crossing: want, staying: 0}, (out.name, rank)
        assert links["total"][staying] == 0 and links["total"][crossing] > 0


def _ring_bytes_sent_by_two_ranks(ledger_file, rank):
    """What ``rank`` of a 2-rank ring sends over its one link during training, from its own ledger: each step
    of the ring moves S/2; all-reduce takes 2 steps (S), all-gather / reduce-scatter 1 (S/2); a broadcast
    is sent only by its root, a reduce only by the other rank."""
    sent = 0
    for r in json.loads(Path(ledger_file).read_text())["records"]:
        if r["micro_step"] < 0 or r.get("group") is not None:
            continue
        sent += {"all_reduce": r["bytes"], "all_gather": r["bytes"] // 2, "reduce_scatter": r["bytes"] // 2,
                 "broadcast": r["bytes"] if r.get("root") == rank else 0,
                 "reduce": r["bytes"] if r.get("root") != rank else 0}.get(r["op"], 0)
    return sent


def _train_losses(out):
    records = [json.loads(x) for x in (out / "job" / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if r["kind"] == "train"]
