"""Checkpoint hashing in shares: the partition, the one-process manifest and verdicts, and 2 ranks on ZeRO-2."""
import hashlib
import json
import random

import pytest
import torch

from recipes.posttrain import checkpoints
from tests.launching import run_ranks


def _check_partition(sizes, world):
    parts = checkpoints.shares(sizes, world)
    names = [name for name, _ in sizes]
    assert sorted(n for part in parts for n in part) == sorted(names)  # every file once, by one rank
    for part in parts:  # listing order kept within a share
        assert part == [n for n in names if n in set(part)]
    size = dict(sizes)
    loads = [sum(size[n] for n in part) for part in parts]
    # greedy largest-first: the rank that got the last file had the least load then, so no rank ends
    # more than one file (the largest) above the least-loaded, and each is within it of the mean
    biggest = max(size.values())
    assert max(loads) - min(loads) <= biggest
    mean = sum(loads) / world
    assert all(abs(load - mean) <= biggest for load in loads)
    return parts, loads


def test_shares_balance_a_zero2_layout():
    # 2-rank ZeRO-2: the full weights in one file, each rank's optimizer shard in its own
    sizes = [("mp_rank_00_model_states.pt", 400), ("zero_pp_rank_0_mp_rank_00_optim_states.pt", 600),
             ("zero_pp_rank_1_mp_rank_00_optim_states.pt", 600)]
    parts, loads = _check_partition(sizes, 2)
    assert parts == [["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
                     ["zero_pp_rank_1_mp_rank_00_optim_states.pt"]]
    assert loads == [1000, 600]  # the best split of {400, 600, 600}


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shares_are_a_balanced_deterministic_partition(world):
    rng = random.Random(world)
    sizes = [(f"f{i:03d}.pt", rng.randint(1, 10_000)) for i in range(37)]
    parts, _ = _check_partition(sizes, world)
    assert checkpoints.shares(list(sizes), world) == parts
    assert checkpoints.shares([("a", 5), ("b", 5)], 2) == [["a"], ["b"]]  # ties by name, then rank
    assert checkpoints.shares([], world) == [[] for _ in range(world)]
    assert checkpoints.shares([("only", 1)], world)[0] == ["only"]


def _reference_manifest(tag_dir, client_state) -> str:
    """What the manifest must be: every file's size and sha256 in path order (written independently here)."""
    files = {}
    for path in sorted(tag_dir.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            files[str(path.relative_to(tag_dir))] = {"bytes": path.stat().st_size,
                                                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return json.dumps({"files": files, "client_state": client_state}, indent=1)


def _tag(tmp_path):
    tag = tmp_path / "micro00000004"
    (tag / "sub").mkdir(parents=True)
    torch.save({"w": torch.arange(300.0)}, tag / "mp_rank_00_model_states.pt")
    torch.save({"m": torch.ones(500)}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tag / "sub" / "extra.bin").write_bytes(b"x" * 77)
    return tag


def test_one_process_manifest_is_the_reference_and_old_manifests_verify(tmp_path):
    tag = _tag(tmp_path)
    checkpoints.write_manifest(tag, {"micro_step": 4})
    assert (tag / "manifest.json").read_text() == _reference_manifest(tag, {"micro_step": 4})
    (tag / "manifest.json").write_text(_reference_manifest(tag, {"micro_step": 4, "old": True}))  # as old code wrote
    assert checkpoints.verify(tag) == {"micro_step": 4, "old": True}


def test_several_bad_files_name_the_first_and_count_the_rest(tmp_path):
    tag = _tag(tmp_path)
    checkpoints.write_manifest(tag, {})
    (tag / "sub" / "extra.bin").write_bytes(b"y" * 77)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(checkpoints.CheckpointError, match=r"^checkpoint file corrupted: .*extra\.bin"):
        checkpoints.verify(tag)  # alone: the first bad one in manifest order
    manifest = json.loads((tag / "manifest.json").read_text())
    manifest["files"]["sub/extra.bin"] = {"bytes": "77"}
    (tag / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoints.CheckpointError, match=r"manifest\.json is corrupted"):
        checkpoints.verify(tag)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint_shares")
    run_ranks("checkpoint_shares.py", [out], nproc=2, launcher="deepspeed", timeout=400)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_ranks_write_the_reference_manifest_hashing_half_each(two_ranks):
    out, reports = two_ranks
    for tag_name in ("micro00000004", "micro00000008"):
        tag = out / "run" / "checkpoints" / tag_name
        written = (tag / "manifest.json").read_text()
        state = json.loads(written)["client_state"]
        if tag_name == "micro00000008":  # the worker corrupted one file of this tag after verifying it
            assert reports[0]["verified_state"] == reports[1]["verified_state"] == state
            continue
        assert written == _reference_manifest(tag, state)
    manifests = [json.loads((out / "run" / "checkpoints" / t / "manifest.json").read_text())["files"]
                 for t in ("micro00000004", "micro00000008")]
    assert len(manifests[1]) >= 3  # model states and one optimizer shard per rank
    for phase, saved in (("save", manifests), ("verify", manifests[1:])):
        total = sum(entry["bytes"] for files in saved for entry in files.values())
        biggest = max(entry["bytes"] for files in saved for entry in files.values())
        hashed = [r[phase]["bytes"] for r in reports]
        assert sum(hashed) == total  # every file hashed once, by one rank
        assert sorted(reports[0][phase]["files"] + reports[1][phase]["files"]) == sorted(
            name for files in saved for name in files)
        for b in hashed:  # each about half: per tag within the largest file of the mean (see test_shares_*)
            assert abs(b - total / 2) <= len(saved) * biggest
            assert b > 0


@pytest.mark.slow
def test_a_corrupted_file_of_rank1s_share_is_the_same_error_on_both_ranks(two_ranks):
    out, (first, second) = two_ranks
    victim = first["victim"]
    assert victim == second["victim"] and victim not in first["verify"]["files"]  # only rank 1 hashes it
    assert victim in second["verify"]["files"]
    assert first["resume_error"] == second["resume_error"]
    tag = out / "run" / "checkpoints" / "micro00000008"
    assert first["resume_error"].startswith(f"checkpoint file corrupted: {tag / victim} (sha256 differs")
    assert f"the older checkpoint {tag.parent / 'micro00000004'} is intact" in first["resume_error"]
