"""The communication ledger: interception, attribution, files — and measured == model on DeepSpeed.

Three launches serve all slow tests (module-scoped fixtures):
- ``comm_ledger_checks.py`` on 2 ranks: every torch / deepspeed.comm spelling counted once, exact bytes,
  DDP comm hook, periodic writes;
- ``comm_matrix.py`` on 2 ranks: ZeRO 0-3 x fp32/bf16 x PMA/GA (K=2, two periods), plus ZeRO-2 K=4 PMA
  and GA and ZeRO-3 bf16 PMA through the JSON ``comm_profile`` path;
- ``comm_matrix.py`` on 3 ranks with gradient clipping on: the same matrix (padding differs at N=3).
"""
import json
import os

import pytest
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from pma_dist.comm import CommLedger, active_ledger, close_all, model, parse_comm_profile
from pma_dist.comm.placement import rank_placement
from pma_dist.methods import get_method
from tests.launching import run_ranks

MATRIX = [(stage, dtype, kind) for stage in range(4) for dtype in ("fp32", "bf16") for kind in ("pma", "ga")]


# --- in-process: switching on/off, validation, files -----------------------------------------
def test_off_means_nothing_is_patched(tmp_path):
    before = (dist.all_reduce, c10d.all_gather_single, dist.reduce_scatter_tensor)
    ledger = CommLedger(str(tmp_path / "ledger"), meta={})
    assert active_ledger() is None and (dist.all_reduce, c10d.all_gather_single,
                                        dist.reduce_scatter_tensor) == before
    ledger.install()
    try:
        assert dist.all_reduce is not before[0] and dist.all_reduce is c10d.all_reduce
        assert dist.all_reduce.__wrapped__ is before[0]
    finally:
        ledger.uninstall()
        ledger.close()
    assert (dist.all_reduce, c10d.all_gather_single, dist.reduce_scatter_tensor) == before
    assert active_ledger() is None


def test_only_one_ledger_at_a_time(tmp_path):
    first = CommLedger(str(tmp_path / "a")).install()
    try:
        with pytest.raises(RuntimeError, match=r"already installed \(output_dir='.*a'\)"):
            CommLedger(str(tmp_path / "b")).install()
    finally:
        first.close()
    with pytest.raises(RuntimeError, match="is closed"):
        first.install()


def test_close_writes_the_file_runs_callbacks_once(tmp_path):
    seen = []
    ledger = CommLedger(str(tmp_path / "run"), meta={"optimizer": "AdamWPMA", "period": 4}).install()
    ledger.on_close(lambda l: seen.append(l.micro_steps))
    ledger.begin_micro_step(0, "small")
    ledger.record("all_reduce", 40, 0.5)
    ledger.record("all_reduce", 40, 0.25)
    with ledger.in_phase("step"):
        ledger.record("all_gather", 96, 0.125)
    close_all()
    ledger.close()
    data = json.load(open(tmp_path / "run" / "comm_rank0.json"))
    assert seen == [1]
    assert data["meta"] == {"optimizer": "AdamWPMA", "period": 4, "rank": 0, "micro_steps": 1,
                            "format_version": 1, "placement": rank_placement()}
    assert data["records"] == [
        {"micro_step": 0, "pma_kind": "small", "phase": "other", "op": "all_reduce", "count": 2, "bytes": 80,
         "seconds": 0.75},
        {"micro_step": 0, "pma_kind": "small", "phase": "step", "op": "all_gather", "count": 1, "bytes": 96,
         "seconds": 0.125}]
    assert not [p for p in os.listdir(tmp_path / "run") if ".tmp" in p]


def test_slow_writes_are_deferred_but_close_always_writes(tmp_path, monkeypatch):
    from pma_dist.comm import ledger as ledger_module
    monkeypatch.setattr(ledger_module, "WRITE_FREE_SECONDS", -1.0)  # every write counts as slow ...
    monkeypatch.setattr(ledger_module, "WRITE_BUDGET", 1e-12)  # ... and defers the next one for ages
    ledger = CommLedger(str(tmp_path), write_every=1)
    steps_on_disk = []
    for i in range(3):
        ledger.begin_micro_step(i, "small")
        ledger.end_micro_step()
        steps_on_disk.append(json.load(open(ledger.path))["meta"]["micro_steps"])
    assert steps_on_disk == [1, 1, 1]
    ledger.close()
    assert json.load(open(ledger.path))["meta"]["micro_steps"] == 3


@pytest.mark.parametrize("call,match", [
    (lambda l: l.mark_phase("optimizer"), "unknown phase 'optimizer'"),
    (lambda l: l.begin_micro_step(0, "big"), "unknown micro-step kind 'big'"),
])
def test_bad_attribution_is_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call(CommLedger("unused"))


@pytest.mark.parametrize("args,match", [
    (dict(output_dir=""), "output_dir must be a non-empty path, got ''"),
    (dict(output_dir="x", write_every=0), "write_every must be a positive int, got 0"),
])
def test_bad_ledger_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        CommLedger(**args)


@pytest.mark.parametrize("cfg,match", [
    ({"enabled": True}, "comm_profile.output_dir must be a non-empty path when enabled, got None"),
    ({"enabled": "yes", "output_dir": "x"}, "comm_profile.enabled must be true or false, got 'yes'"),
    ({"enabled": True, "output_dir": "x", "outdir": "y"}, r"unknown comm_profile key\(s\) \['outdir'\]"),
    ({"enabled": True, "output_dir": "x", "write_every": -1}, "write_every must be a positive int, got -1"),
    ({"enabled": True, "output_dir": "x", "report": 1}, "comm_profile.report must be true or false, got 1"),
    ({"comm_profile": ["on"]}, "comm_profile must be a dict.*got list"),
    ({"comm_profile": "runs/comm"}, "comm_profile must be a dict.*got str: 'runs/comm'"),
    ({"enabld": True, "output_dir": "x"}, r"unknown comm_profile key\(s\) \['enabld'\]"),
])
def test_bad_comm_profile_config(cfg, match):
    with pytest.raises((ValueError, TypeError), match=match):
        parse_comm_profile(cfg)


def test_comm_profile_off_or_absent_is_none():
    assert parse_comm_profile(None) is None
    assert parse_comm_profile({"enabled": False}) is None
    assert parse_comm_profile({"comm_profile": {"enabled": True, "output_dir": "o"}}).output_dir == "o"


def test_message_positions_are_torchs_signatures():
    import inspect

    from pma_dist.comm import ledger as ledger_module
    assert set(ledger_module._GROUP_POSITION) == set(ledger_module._COLLECTIVES)
    for name, (_, arg_name, position, _) in ledger_module._COLLECTIVES.items():
        params = list(inspect.signature(getattr(c10d, name)).parameters)
        if arg_name:
            assert params.index(arg_name) == position, name
        assert params.index("group") == ledger_module._GROUP_POSITION[name], name
    for name, roots in ledger_module._ROOT_ARGS.items():
        params = list(inspect.signature(getattr(c10d, name)).parameters)
        for arg_name, position in roots:
            assert params.index(arg_name) == position, (name, arg_name)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_collectives_already_wrapped_without_a_signature_are_counted(tmp_path, monkeypatch, one_rank_group):
    """Another tool got there first with ``(*args, **kwargs)`` wrappers that copy no signature."""
    import torch

    foreign_calls = []

    def foreign(original):
        def wrapper(*args, **kwargs):
            foreign_calls.append(original.__name__)
            return original(*args, **kwargs)
        return wrapper

    for name in ("all_reduce", "reduce_scatter_tensor", "gather"):
        wrapped = foreign(getattr(c10d, name))
        monkeypatch.setattr(c10d, name, wrapped)
        monkeypatch.setattr(dist, name, wrapped)
    ledger = CommLedger(str(tmp_path / "ledger"), keep_calls=True).install()
    try:
        ledger.begin_micro_step(0, "small")
        dist.all_reduce(torch.ones(5))                             # 20 bytes, positional
        dist.all_reduce(tensor=torch.ones(3, dtype=torch.float64))  # 24 bytes, keyword
        dist.reduce_scatter_tensor(torch.empty(2), torch.ones(2))  # input: 8 bytes
        dist.gather(torch.ones(4), [torch.empty(4)], 0)            # 16 bytes x group of 1
        calls = [(c["op"], c["bytes"]) for c in ledger.calls]
    finally:
        ledger.close()
    assert foreign_calls == ["all_reduce", "all_reduce", "reduce_scatter_tensor", "gather"]
    assert calls == [("all_reduce", 20), ("all_reduce", 24), ("reduce_scatter", 8), ("gather", 16)]


# --- 2 ranks: every spelling once, exact bytes ------------------------------------------------
@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    root = tmp_path_factory.mktemp("comm_checks")
    run_ranks("comm_ledger_checks.py", [root / "out.json", root / "runs"], nproc=2, timeout=300)
    return json.load(open(root / "out.json"))


@pytest.mark.slow
def test_torch_collectives_counted_once_with_nccl_tests_bytes(checks):
    n = checks["world_size"]
    assert checks["patched_while_installed"] and checks["restored_after_close"]
    assert sorted(map(tuple, checks["torch"]["records"])) == sorted([
        ("forward", "all_reduce", 2, 20 + 4),
        ("forward", "all_gather", 4, 4 * 12 * n),  # into_tensor, single, _base, list: output size
        ("backward", "reduce_scatter", 2, 2 * 12 * n),  # tensor, single: input size
        ("backward", "broadcast", 1, 56),
        ("backward", "all_reduce", 1, 16),  # async
        ("backward", "barrier", 1, 0),
    ])


@pytest.mark.slow
def test_deepspeed_comm_is_counted_once(checks):
    n = checks["world_size"]
    assert sorted(map(tuple, checks["deepspeed_comm"]["records"])) == sorted([
        ("step", "all_reduce", 1, 24), ("step", "all_gather", 1, 8 * n),
        ("step", "reduce_scatter", 1, 8 * n), ("step", "broadcast", 1, 12)])


@pytest.mark.slow
def test_ddp_comm_hook_counts_the_bucket_and_averages(checks):
    assert checks["ddp"]["records"] == [["backward", "all_reduce", 1, 23 * 4]]
    assert checks["ddp"]["grad_error"] < 1e-6


@pytest.mark.slow
def test_sub_groups_and_roots_are_recorded_for_the_link_attribution(checks):
    n = checks["world_size"]
    last = n - 1
    routed = [[(r["op"], r["bytes"], r.get("group"), r.get("root")) for r in records]
              for records in checks["routing"]["ranks"]]
    everyone = [("all_reduce", 12 + 4, None, None), ("broadcast", 20, None, last), ("reduce", 24, None, 0)]
    assert sorted(routed[0], key=str) == sorted(everyone, key=str)
    assert sorted(routed[last], key=str) == sorted(everyone + [("all_reduce", 8, [last], None),
                                                               ("broadcast", 4, [last], last)], key=str)


@pytest.mark.slow
def test_files_are_rewritten_every_period_before_close(checks):
    assert checks["periodic"]["written"] == [0, 2, 2, 4]


# --- DeepSpeed: measured == model, byte for byte ---------------------------------------------
# Every method of pma_dist.methods through DeepSpeed's JSON path (ZeRO-1 fp32, K = 4: it reduces only when
# it steps): each one's measured traffic equals the model (the Lion GA baseline, LionPMA(period=1) under
# accumulation, was once modelled as PMA).
EVERY_METHOD = ("adamw_pma_reference", "lion_pma", "lion_ga", "adamw", "lion")


@pytest.fixture(scope="module")
def matrix2(tmp_path_factory):
    root = tmp_path_factory.mktemp("comm_matrix2")
    extras = ["2:fp32:pma:4:json", "2:fp32:ga:4:json", "3:bf16:pma:2:json"]
    extras += [f"1:fp32:{method}:4:json" for method in EVERY_METHOD]
    run_ranks("comm_matrix.py", [root / "out.json", root / "runs"] + [a for e in extras for a in ("--extra", e)],
              nproc=2, timeout=900)
    return json.load(open(root / "out.json"))


@pytest.fixture(scope="module")
def matrix3(tmp_path_factory):
    root = tmp_path_factory.mktemp("comm_matrix3")
    run_ranks("comm_matrix.py", [root / "out.json", root / "runs", "--clip", "1.0"], nproc=3, timeout=1200)
    return json.load(open(root / "out.json"))


@pytest.fixture(scope="module")
def zero3_partitioned(tmp_path_factory):
    """ZeRO-3 with tensors it partitions and gathers in forward: every tensor (persistence threshold 0,
    2 ranks), and a 125,065-element weight above the default threshold of 1e5 (3 ranks, other tensors
    persistent)."""
    root = tmp_path_factory.mktemp("comm_zero3_partitioned")
    runs = {}
    for name, nproc, extra in (("threshold0_2ranks", 2, ["--persistence-threshold", "0"]),
                               ("wide_3ranks", 3, ["--width", "25013"])):
        run_ranks("comm_matrix.py", [root / f"{name}.json", root / name, "--stages", "3", *extra],
                  nproc=nproc, timeout=900)
        runs[name] = json.load(open(root / f"{name}.json"))
    return runs


def assert_matches_model(result, micro_steps=None):
    for ledger in result["ledgers"]:
        assert model.compare(ledger) == [], f"rank {ledger['meta']['rank']}"
        assert ledger["meta"]["micro_steps"] == (micro_steps or 2 * result["period"])
    # all ranks send the same collectives
    strip = [[{k: r[k] for k in ("micro_step", "phase", "op", "count", "bytes")} for r in l["records"]]
             for l in result["ledgers"]]
    assert all(s == strip[0] for s in strip)


@pytest.mark.slow
@pytest.mark.parametrize("stage,dtype,kind", MATRIX)
def test_measured_equals_model_2_ranks(matrix2, stage, dtype, kind):
    assert_matches_model(matrix2["results"][f"z{stage}_{dtype}_{kind}"])


@pytest.mark.slow
@pytest.mark.parametrize("stage,dtype,kind", MATRIX)
def test_measured_equals_model_3_ranks_with_clipping(matrix3, stage, dtype, kind):
    result = matrix3["results"][f"z{stage}_{dtype}_{kind}"]
    assert result["ledgers"][0]["meta"]["world_size"] == 3
    assert_matches_model(result)


@pytest.mark.slow
@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_measured_equals_model_through_the_json_path(matrix2, method):
    result = matrix2["results"][f"z1_fp32_{method}_k4_json"]
    assert result["attached_by_config"] and result["report_written"]
    assert_matches_model(result, micro_steps=2 * 4)
    schedule = get_method(method).schedule(4)
    meta = result["ledgers"][0]["meta"]
    assert (meta["pma"], meta["gradient_accumulation_steps"]) == (schedule.is_pma, schedule.accumulation)
    # ZeRO-1's accumulating micro-steps send nothing, so only the others have records
    kinds = {r["micro_step"]: r["pma_kind"] for r in result["ledgers"][0]["records"]}
    assert kinds == {i: schedule.kind(i) for i in kinds}
    assert set(kinds) >= {i for i in range(8) if schedule.steps_optimizer(i)}
    reduces = {r["micro_step"] for r in result["ledgers"][0]["records"] if r["op"] == "all_reduce" and r["bytes"] > 8}
    assert reduces == {i for i in range(8) if schedule.steps_optimizer(i)}


@pytest.mark.slow
@pytest.mark.parametrize("run", ["threshold0_2ranks", "wide_3ranks"])
@pytest.mark.parametrize("dtype,kind", [("fp32", "pma"), ("fp32", "ga"), ("bf16", "pma"), ("bf16", "ga")])
def test_zero3_partitioned_parameters_measured_equals_model(zero3_partitioned, run, dtype, kind):
    result = zero3_partitioned[run]["results"][f"z3_{dtype}_{kind}"]
    assert_matches_model(result)
    meta = result["ledgers"][0]["meta"]
    setup = model.Setup.from_meta(meta)
    persistent = model.zero3_persistent(setup)
    # the case is what it claims: some tensor is partitioned, so forward all-gathers it
    assert not all(persistent)
    if run == "threshold0_2ranks":
        assert not any(persistent) and meta["world_size"] == 2
    else:
        assert max(setup.param_numels) == 125_065 and meta["world_size"] == 3 and any(persistent)
    forward = [r for r in result["ledgers"][0]["records"] if r["phase"] == "forward" and r["micro_step"] >= 2]
    assert forward and all(r["op"] == "all_gather" for r in forward)


@pytest.mark.slow
def test_zero3_warmup_is_the_only_unmodelled_traffic(matrix2):
    """ZeRO-3's first two micro-steps record the module trace: not modelled, but nothing after them."""
    ledger = matrix2["results"]["z3_fp32_pma"]["ledgers"][0]
    assert model.warmup_micro_steps(model.Setup.from_meta(ledger["meta"])) == 2
    warm = {r["op"] for r in ledger["records"] if r["micro_step"] < 2}
    assert "broadcast" in warm  # the trace-consistency checks
    assert not [r for r in ledger["records"] if r["micro_step"] >= 2 and r["op"] == "broadcast"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_parameter_all_gathers_are_attributed_to_the_step(matrix2, stage):
    for kind in ("pma", "ga"):
        records = matrix2["results"][f"z{stage}_fp32_{kind}"]["ledgers"][0]["records"]
        gathers = [r for r in records if r["op"] == "all_gather"]
        assert gathers and all(r["phase"] == "step" for r in gathers)
        assert all(r["phase"] == "backward" for r in records if r["op"] == "all_reduce" and r["bytes"] > 8)


@pytest.mark.slow
def test_pma_kinds_follow_the_period(matrix2):
    records = matrix2["results"]["z2_fp32_pma_k4_json"]["ledgers"][0]["records"]
    kinds = {r["micro_step"]: r["pma_kind"] for r in records}
    assert kinds == {0: "small", 1: "small", 2: "small", 3: "large", 4: "small", 5: "small", 6: "small",
                     7: "large"}
    ga = matrix2["results"]["z2_fp32_ga_k4_json"]["ledgers"][0]["records"]
    assert {r["micro_step"]: r["pma_kind"] for r in ga} == {
        i: ("boundary" if i % 4 == 3 else "accumulate") for i in range(8)}


@pytest.mark.slow
def test_zero2_k4_measured_all_gather_ratio_pma_over_ga_is_4(matrix2):
    def gathered(name):
        records = matrix2["results"][name]["ledgers"][0]["records"]
        return sum(r["bytes"] for r in records if r["op"] == "all_gather")
    pma, ga = gathered("z2_fp32_pma_k4_json"), gathered("z2_fp32_ga_k4_json")
    assert ga > 0 and pma == 4 * ga
    assert model.pma_vs_ga(model.Setup.from_meta(
        matrix2["results"]["z2_fp32_pma_k4_json"]["ledgers"][0]["meta"]))["all_gather"]["bytes_ratio"] == 4.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z2_fp32_pma_k4_json", "z2_fp32_ga_k4_json", "z3_bf16_pma_json"])
def test_json_comm_profile_path_attaches_writes_periodically_and_reports(matrix2, name):
    result = matrix2["results"][name]
    assert result["attached_by_config"], "deepspeed.initialize did not attach the ledger from comm_profile"
    assert result["written_before_destroy"] == 2 * result["period"]  # written per period, before destroy
    assert_matches_model(result)
    assert result["report_written"]
    report = json.load(open(os.path.join(result["run_dir"], "report.json")))
    assert report["model"]["available"] and report["model"]["agree"]
