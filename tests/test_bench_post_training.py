"""benchmarks/post_training.py without training: the jobs it builds, the committed results, and the report's numbers."""
import json

import pytest

from tests.launching import load_script

bench = load_script("benchmarks/post_training.py")


def _args(tmp_path, *extra):
    return bench.parse_args(["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
                             "--page", str(tmp_path / "page.md"), "--name", "tiny", *extra])


def _flag(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_each_arm_builds_its_own_job(tmp_path):
    args = _args(tmp_path, "--regime", "paper", "--periods", "4", "16")
    pma = bench.train_argv(args, "sft_alpaca", "adamw_pma-periodic", 16, 3e-3, 2)
    assert (_flag(pma, "--optimizer"), _flag(pma, "--period"), _flag(pma, "--lr-decay")) == ("adamw_pma", "16", "periodic")
    # the paper regime: one 256-token sequence per rank; the two held-out splits; variance per 16 micro-steps
    assert (_flag(pma, "--micro-batch-size"), _flag(pma, "--max-length"), _flag(pma, "--micro-steps")) == ("1", "256", "256")
    assert (_flag(pma, "--select-size"), _flag(pma, "--eval-size"), _flag(pma, "--variance-every")) == ("64", "64", "16")
    assert _flag(pma, "--output-dir") == str(tmp_path / "runs" / "sft_alpaca__paper__constant__adamw_pma-periodic__K16__lr0.003__s2")
    plain = bench.train_argv(args, "sft_alpaca", "adamw", 1, 1e-3, 0)
    assert _flag(plain, "--optimizer") == "adamw" and "--period" not in plain and "--lr-decay" not in plain
    ga = bench.train_argv(args, "sft_alpaca", "adamw_ga", 4, 1e-3, 0)
    assert (_flag(ga, "--optimizer"), _flag(ga, "--period"), _flag(ga, "--lr-decay")) == ("adamw_ga", "4", None)
    dpo = bench.train_argv(_args(tmp_path, "--regime", "today", "--schedule", "warmup_cosine"), "dpo_gpt4", "adamw_pma", 8,
                           1e-4, 0)
    assert _flag(dpo, "--model") == str(tmp_path / "runs" / "sft_base" / "model")  # DPO starts from the SFT base
    assert (_flag(dpo, "--micro-batch-size"), _flag(dpo, "--lr-schedule"), _flag(dpo, "--lr-decay")) == ("2", "warmup_cosine", "none")
    # DPO holds out 256 pairs per split (accuracy on 64 moves by 1/64 per pair), a half-length run
    assert (_flag(dpo, "--eval-size"), _flag(dpo, "--select-size"), _flag(dpo, "--eval-every"),
            _flag(dpo, "--micro-steps")) == ("256", "256", "32", "128")


def test_every_job_argv_is_one_the_trainer_accepts(tmp_path):
    from recipes.posttrain import config

    args = _args(tmp_path, "--family", "adamw", "lion", "--periods", "8")
    for task, arm, k, lr, seed in bench.plan_stage_a(args, tmp_path, "sft_alpaca"):
        cfg = config.resolve(bench.train_argv(args, task, arm, k, lr, seed))
        method, lr_decay = bench.ARMS[arm]
        assert (cfg.optimizer, cfg.period, cfg.optimizer_params.get("lr_decay")) == (method, k, lr_decay)
    assert sorted({(a, k) for _, a, k, _, _ in bench.plan_stage_a(args, tmp_path, "sft_alpaca")}) == sorted(
        [("adamw_pma", 8), ("adamw_pma-periodic", 8), ("adamw_ga", 8), ("adamw", 1), ("lion_pma", 8), ("lion_ga", 8),
         ("lion", 1)])
    cost = bench.step_cost_argv(args, "sft_alpaca", "adamw_pma", 8, 0)
    assert "--log-update-variance" not in cost and "--variance-every" not in cost and _flag(cost, "--micro-steps") == "32"
    config.resolve(cost)
    dpo_cost = bench.step_cost_argv(args, "dpo_gpt4", "adamw_ga", 8, 2)  # each task is timed on its own micro-steps
    assert (_flag(dpo_cost, "--task"), _flag(dpo_cost, "--micro-batch-size"), _flag(dpo_cost, "--eval-every")) == (
        "dpo", "1", "0")
    assert _flag(dpo_cost, "--output-dir") == str(tmp_path / "runs" / "step_cost" / "dpo_gpt4__paper__adamw_ga__K8__r2")


@pytest.mark.parametrize("flags, message", [
    (["--periods", "1", "8"], "K must be >= 2"),
    (["--grid", "1e-3", "0"], "learning rates must be > 0"),
    (["--name", "a/b"], "use letters, digits"),
])
def test_bad_flags_are_named(capsys, tmp_path, flags, message):
    with pytest.raises(SystemExit):
        _args(tmp_path, *flags)
    assert message in capsys.readouterr().err


def test_a_single_seed_ga_run_reaches_its_own_final_loss_through_the_committed_csv(tmp_path):
    args = _args(tmp_path)
    _fake_run(tmp_path / "runs", _rid("adamw_ga", 8, 1e-3), [4.0, 3.1, 3.0037160396575928], select=3.0)
    bench.collect(args)
    (row,) = bench.report(args)
    assert row["samples_to_target"] == [200.0]


def _fake_run(out, rid, evals, select, samples_per_eval=100):
    """A finished run: an eval curve (one point per ``samples_per_eval`` samples) and its final select loss."""
    (out / rid).mkdir(parents=True)
    rows = [{"kind": "eval", "micro_step": i, "eval_loss": loss, "select_loss": select, "samples": i * samples_per_eval,
             "wall_clock": float(i)} for i, loss in enumerate(evals)]
    rows.append({"kind": "update_variance", "micro_step": 1, "samples": 0, "wall_clock": 0.0, "update_variance": 2e-6,
                 "update_sq_norm": 1e-3, "update_mean_sq_norm": 4e-4, "update_noise_to_signal": 0.5})
    (out / rid / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / rid / "summary.json").write_text(json.dumps({"eval_loss": evals[-1], "select_loss": select,
                                                        "samples": rows[len(evals) - 1]["samples"], "optimizer_steps": 1,
                                                        "micro_steps": 2, "wall_clock": 1.0}))


def _rid(arm, k, lr, seed=0):
    return bench.run_id("sft_alpaca", "paper", "constant", arm, k, lr, seed)


def _setting(tmp_path):
    out = tmp_path / "runs"
    # GA: lr 1e-3 has the lower select loss (it is chosen) though 3e-3 has the lower eval loss; its curve dips
    # below its own final loss before the end, so its cost to the target is that first crossing, not the run
    _fake_run(out, _rid("adamw_ga", 8, 1e-3), [4.0, 2.9, 3.1, 3.0], select=3.05)
    _fake_run(out, _rid("adamw_ga", 8, 1e-3, 1), [4.0, 3.2, 3.0, 3.1], select=3.0)
    _fake_run(out, _rid("adamw_ga", 8, 3e-3), [4.0, 3.5, 3.0, 2.0], select=3.3)
    _fake_run(out, _rid("adamw_pma", 8, 1e-3), [4.0, 3.0, 2.5, 2.4], select=2.5)  # reaches 3.0 at 100 samples
    _fake_run(out, _rid("adamw", 1, 1e-3), [4.0, 3.8, 3.6, 3.5], select=3.5)  # never reaches it
    return out


def test_report_is_symmetric_and_chooses_on_the_select_split(tmp_path):
    args = _args(tmp_path)
    out = _setting(tmp_path)
    bench.collect(args)
    rows = {r["arm"]: r for r in bench.report(args)}
    assert rows["adamw_ga"]["lr"] == 1e-3 and rows["adamw_ga"]["seeds"] == [0, 1]
    assert rows["adamw_ga"]["target"] == 3.1  # the highest of GA's final eval losses (3.0 and 3.1) over its seeds
    # GA seed 0 crosses 3.1 0.9/1.1 of the way from 0 to 100 samples, seed 1 halfway from 100 to 200
    ga_costs = [100 * (0.9 / 1.1), 150.0]
    assert rows["adamw_ga"]["samples_to_target"] == pytest.approx(ga_costs)
    assert rows["adamw_pma"]["samples_to_target"] == pytest.approx([90.0])  # 4.0 -> 3.0: 0.9 of the way
    assert rows["adamw_pma"]["ratio_vs_ga"] == pytest.approx(sum(ga_costs) / 2 / 90.0)
    assert rows["adamw"]["samples_to_target"] == [None] and "ratio_vs_ga" not in rows["adamw"]
    assert rows["adamw"]["K"] == 8  # the no-accumulation arm (K = 1) is compared at the K of the GA run
    assert rows["adamw_pma"]["noise_to_signal"] == [0.5]
    text = (tmp_path / "page.md").read_text()
    assert "| adamw (1) | 0.001 | 3.500 | not reached (0/1) | - | - | 0.5 | 2e-06 |" in text
    assert "| adamw_ga (8) | 0.001 (grid edge) | 3.050 ± 0.050 | 116 [82-150] | 1.00x | - |" in text
    assert (tmp_path / "results" / "sft_alpaca_paper_constant_K8.png").exists()
    assert out.exists()


def test_report_only_works_from_the_committed_files_alone(tmp_path):
    import shutil

    args = _args(tmp_path)
    out = _setting(tmp_path)
    bench.collect(args)
    before = bench.report(args)
    shutil.rmtree(out)  # a fresh clone: no runs, only the committed runs.json and curves.csv
    (tmp_path / "page.md").unlink()
    bench.main(["--report-only", "--results", str(tmp_path / "results"), "--page", str(tmp_path / "page.md"),
                "--name", "tiny"])
    after = json.loads((tmp_path / "results" / "results.json").read_text())["comparisons"]
    assert [(a["arm"], a["lr"], a["final"]) for a in after] == [(b["arm"], b["lr"], b["final"]) for b in before]
    # curves.csv holds every float exactly (repr): the costs are the same numbers
    assert [a["samples_to_target"] for a in after] == [b["samples_to_target"] for b in before]
    assert "<!-- generated: post_training tiny -->" in (tmp_path / "page.md").read_text()


def test_collect_keeps_committed_runs_not_under_out(tmp_path):
    args = _args(tmp_path)
    _setting(tmp_path)
    bench.collect(args)
    other = tmp_path / "elsewhere"
    _fake_run(other, _rid("adamw_pma", 8, 3e-3), [4.0, 3.0], select=2.9)
    bench.collect(_args(tmp_path, "--out", str(other)))
    runs = json.loads((tmp_path / "results" / "runs.json").read_text())
    assert _rid("adamw_pma", 8, 3e-3) in runs and _rid("adamw_ga", 8, 1e-3) in runs


def test_report_without_results_names_the_file(tmp_path):
    with pytest.raises(SystemExit, match="no runs in .*runs.json"):
        bench.report(_args(tmp_path))


def test_page_section_is_replaced_in_place_and_other_text_kept(tmp_path):
    args = _args(tmp_path)
    _setting(tmp_path)
    bench.collect(args)
    page = tmp_path / "page.md"
    page.write_text("# Page\n\nhand-written prose\n\n<!-- generated: post_training tiny -->\nstale\n"
                    "<!-- end generated: post_training tiny -->\n\nmore prose\n")
    bench.report(args)
    text = page.read_text()
    assert "stale" not in text and "hand-written prose" in text and text.endswith("more prose\n")
    assert f"| {_rid('adamw_ga', 8, 3e-3)} | 3.3000 | 2.0000 | - | 300 | 1 | {bench.cpu_name()} |" in text


def test_step_costs_are_medians_per_task_regime_arm_and_k(tmp_path):
    runs = {f"step_cost__sft_alpaca__paper__adamw_pma__K8__r{r}": {"wall_clock": w, "micro_steps": 32}
            for r, w in enumerate((3.2, 6.4, 4.8))}
    runs["step_cost__dpo_gpt4__paper__adamw_pma__K8__r0"] = {"wall_clock": 64.0, "micro_steps": 32}
    assert bench.step_costs(runs) == {("sft_alpaca", "paper", "adamw_pma", 8): pytest.approx(4.8 / 32),
                                      ("dpo_gpt4", "paper", "adamw_pma", 8): 2.0}


def test_half_decade_ladder():
    assert [bench.half_decade(x, 1) for x in (1e-3, 3e-3, 1e-2)] == [3e-3, 1e-2, 3e-2]
    assert [bench.half_decade(x, -1) for x in (1e-3, 3e-3, 3e-5)] == [3e-4, 1e-3, 1e-5]


def test_grid_is_extended_while_the_best_lr_sits_at_an_edge(tmp_path):
    args = _args(tmp_path, "--regime", "paper")
    out = tmp_path / "runs"
    grid = bench.lr_grid(args, "sft_alpaca", "adamw")  # steps every micro-batch: the lower grid
    assert grid == [3e-4, 1e-3, 3e-3] and bench.lr_grid(args, "sft_alpaca", "adamw_ga") == [1e-3, 3e-3, 1e-2]
    for lr, select in zip(grid, (2.9, 3.0, 3.1)):  # the lowest lr is best: try one half-decade lower
        _fake_run(out, _rid("adamw", 1, lr), [4.0, select], select=select)
    assert bench.extended_grid(out, args, "sft_alpaca", "adamw", 1) == (grid, 1e-4)
    assert bench.plan_extensions(args, out, "sft_alpaca") == [("sft_alpaca", "adamw", 1, 1e-4, 0)]
    _fake_run(out, _rid("adamw", 1, 1e-4), [4.0, 2.8], select=2.8)  # still the edge: once more
    assert bench.extended_grid(out, args, "sft_alpaca", "adamw", 1) == ([1e-4] + grid, 3e-5)
    _fake_run(out, _rid("adamw", 1, 3e-5), [4.0, 2.7], select=2.7)  # extensions used up: stop there
    assert bench.extended_grid(out, args, "sft_alpaca", "adamw", 1) == ([3e-5, 1e-4] + grid, None)
    # stage B runs the other seeds at the best lr of the extended grid
    assert bench.plan_stage_b(args, out, "sft_alpaca") == [("sft_alpaca", "adamw", 1, 3e-5, 1), ("sft_alpaca", "adamw", 1, 3e-5, 2)]


def test_cost_adjusted_ratio_uses_the_step_costs_of_the_same_task_and_regime(tmp_path):
    args = _args(tmp_path)
    out = _setting(tmp_path)
    # another regime's or another task's cost must not be used
    for task, regime, arm, seconds in (("sft_alpaca", "paper", "adamw_ga", 2.0), ("sft_alpaca", "paper", "adamw_pma", 3.0),
                                       ("sft_alpaca", "today", "adamw_ga", 9.0), ("dpo_gpt4", "paper", "adamw_ga", 7.0)):
        name = f"{task}__{regime}__{arm}__K8__r0"
        _fake_run(out / "step_cost", name, [4.0], select=4.0)
        (out / "step_cost" / name / "summary.json").write_text(json.dumps({"wall_clock": seconds, "micro_steps": 32}))
    bench.collect(args)
    rows = {r["arm"]: r for r in bench.report(args)}
    assert rows["adamw_pma"]["cost_adjusted_vs_ga"] == pytest.approx(rows["adamw_pma"]["ratio_vs_ga"] * 2.0 / 3.0)
    assert "cost_adjusted_vs_ga" not in rows["adamw"]  # never timed


def test_committed_runs_count_as_finished(tmp_path):
    """A run in the committed runs.json (an earlier session's, another machine's) is neither re-run nor swept again."""
    args = _args(tmp_path, "--regime", "paper")
    out = tmp_path / "runs"
    for lr, select in zip((3e-4, 1e-3, 3e-3), (3.0, 2.9, 3.1)):
        _fake_run(out, _rid("adamw", 1, lr), [4.0, select], select=select)
    bench.collect(args)
    import shutil

    shutil.rmtree(out)  # only the committed results are left
    args = _args(tmp_path, "--regime", "paper")
    assert bench.summary(out, _rid("adamw", 1, 1e-3), args.committed)["select_loss"] == 2.9
    assert bench.summary(out, _rid("adamw", 1, 1e-2), args.committed) is None
    assert bench.extended_grid(out, args, "sft_alpaca", "adamw", 1) == ([3e-4, 1e-3, 3e-3], None)  # interior best
    assert bench.plan_stage_b(args, out, "sft_alpaca")[:2] == [("sft_alpaca", "adamw", 1, 1e-3, 1),
                                                               ("sft_alpaca", "adamw", 1, 1e-3, 2)]


def test_headline_row_holds_each_arms_ratio_and_final_loss(tmp_path):
    args = _args(tmp_path)
    _setting(tmp_path)
    bench.collect(args)
    rows = bench.report(args)
    table = bench.headline_markdown({"stories260k": rows})
    # GA's mean cost (100*0.9/1.1 + 150) / 2 = 115.9; PMA's 90 -> 1.29x; plain AdamW never reaches 3.1
    assert ("| stories260K | SFT, paper, constant, K = 8 | AdamW | **1.29x (2.400)** | not run | 1.00x (3.050) "
            "| not reached (0/1) (3.500) |") in table
    # the summary page keeps its prose; the table goes between its markers
    page = tmp_path / "summary.md"
    page.write_text("# B\n\nprose\n\n<!-- generated: post_training headline -->\n<!-- end generated: post_training headline -->\n")
    (tmp_path / "sets" / "stories260k").mkdir(parents=True)
    (tmp_path / "sets" / "stories260k" / "results.json").write_text(json.dumps({"comparisons": rows}))
    assert bench.write_headline(tmp_path / "sets", page) == table
    assert page.read_text().startswith("# B\n\nprose\n") and table in page.read_text()


def test_headline_bolds_no_arm_that_missed_the_target_in_a_seed(tmp_path):
    args = _args(tmp_path)
    _setting(tmp_path)
    bench.collect(args)
    rows = bench.report(args)
    plain = next(r for r in rows if r["arm"] == "adamw")
    plain.update(samples_to_target=[40.0, None], ratio_vs_ga=2.9, final=[2.0, 3.6])  # faster, but one seed missed
    table = bench.headline_markdown({"stories260k": rows})
    assert "| **1.29x (2.400)** |" in table and "| 2.90x, 1/2 seeds missed (2.800) |" in table
