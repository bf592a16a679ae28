"""benchmarks/post_training.py without training: lr-grid flags, the job it builds, and the report's ratios."""
import json

import pytest

from tests.launching import load_script

bench = load_script("benchmarks/post_training.py")


def test_grid_flags_replace_one_family_of_one_task():
    args = bench.parse_args(["--grid", "dpo_hh", "adamw", "3e-5", "1e-4", "--grid", "sft_alpaca", "lion", "1e-4"])
    assert args.grids["dpo_hh"]["adamw"] == [3e-5, 1e-4]
    assert args.grids["dpo_hh"]["lion"] == bench.TASKS["dpo_hh"][3]["lion"]
    assert args.grids["sft_alpaca"]["lion"] == [1e-4]
    assert args.grids["sft_gsm8k"] is None  # reuses alpaca's best lrs
    assert bench.TASKS["dpo_hh"][3]["adamw"] == [3e-5, 1e-4, 3e-4, 1e-3]  # the built-in table is not modified
    assert bench.lr_grid(args, "dpo_hh", "adamw_pma") == [3e-5, 1e-4]
    assert bench.lr_grid(args, "dpo_hh", "lion_ga") == bench.TASKS["dpo_hh"][3]["lion"]


@pytest.mark.parametrize("grid, message", [
    (["sft_gsm8k", "adamw", "1e-3"], "--grid task 'sft_gsm8k' has no grid of its own"),
    (["sft_alpaca", "sgd", "1e-3"], "--grid family 'sgd': expected adamw or lion"),
    (["sft_alpaca", "adamw", "fast"], "learning rates must be numbers, got ['fast']"),
    (["sft_alpaca", "adamw", "0"], "learning rates must be > 0, got ['0']"),
    (["sft_alpaca", "adamw"], "expected TASK FAMILY LR [LR ...]"),
])
def test_bad_grid_flags_are_named(capsys, grid, message):
    with pytest.raises(SystemExit):
        bench.parse_args(["--grid", *grid])
    assert message in capsys.readouterr().err


def test_every_job_starts_from_the_chosen_model(tmp_path):
    args = bench.parse_args(["--model", "runs/base_3m"])
    argv = bench.train_argv(args, tmp_path, "sft_alpaca", "adamw_pma", 8, 1e-3, 1)
    assert argv[argv.index("--model") + 1] == "runs/base_3m"
    assert argv[argv.index("--optimizer") + 1] == "adamw_pma" and argv[argv.index("--period") + 1] == "8"
    assert argv[argv.index("--output-dir") + 1] == str(tmp_path / "sft_alpaca__adamw_pma__K8__lr0.001__s1")


def _fake_run(out, rid, evals, samples_per_eval, seconds_per_eval):
    (out / rid).mkdir(parents=True)
    rows = [{"kind": "eval", "eval_loss": loss, "samples": i * samples_per_eval, "wall_clock": i * seconds_per_eval}
            for i, loss in enumerate(evals)]
    (out / rid / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    last = rows[-1]
    (out / rid / "summary.json").write_text(json.dumps({"eval_loss": last["eval_loss"], "samples": last["samples"],
                                                        "wall_clock": last["wall_clock"], "optimizer_steps": 1}))


def test_report_picks_best_lr_and_measures_time_to_the_ga_loss(tmp_path):
    results, page = tmp_path / "results", tmp_path / "page.md"
    args = bench.parse_args(["--out", str(tmp_path), "--tasks", "sft_alpaca", "--methods", "adamw_pma",
                             "adamw_ga", "--periods", "8", "--seeds", "0", "--grid", "sft_alpaca", "adamw", "1e-3",
                             "3e-3", "--name", "tiny", "--results", str(results), "--page", str(page)])
    rid = lambda m, lr: bench.run_id("sft_alpaca", m, 8, lr, 0)  # noqa: E731
    _fake_run(tmp_path, rid("adamw_ga", 1e-3), [4.0, 3.5, 3.0], 100, 10.0)        # GA best: 3.0 at 200 samples
    _fake_run(tmp_path, rid("adamw_ga", 3e-3), [4.0, 3.8, 3.4], 100, 10.0)
    _fake_run(tmp_path, rid("adamw_pma", 1e-3), [4.0, 3.3, 2.9], 100, 20.0)
    _fake_run(tmp_path, rid("adamw_pma", 3e-3), [4.0, 3.5, 2.5], 100, 20.0)  # PMA best: 2.5
    result = bench.report(args)
    (comparison,) = result["comparisons"]
    assert (comparison["pma_lr"], comparison["ga_lr"]) == (3e-3, 1e-3)
    (seed,) = comparison["seeds"]
    # PMA crosses 3.0 halfway between its evaluations at 100 and 200 samples: 150 samples, 30 s
    assert seed["target"] == 3.0 and seed["pma_samples"] == pytest.approx(150.0)
    assert seed["sample_ratio"] == pytest.approx(200 / 150) and seed["time_ratio"] == pytest.approx(20.0 / 30.0)
    assert (results / "sft_alpaca_K8_loss.png").exists()
    assert json.loads((results / "results.json").read_text())["comparisons"] == result["comparisons"]
    text = page.read_text()
    assert "<!-- generated: post_training tiny -->" in text and "| sft_alpaca | 8 | adamw_pma (0.003) |" in text
    assert "](results/sft_alpaca_K8_loss.png)" in text  # the plot, linked relative to the page


def test_page_section_is_replaced_in_place_and_other_text_kept(tmp_path):
    results, page = tmp_path / "results", tmp_path / "page.md"
    results.mkdir()
    (results / "results.json").write_text(json.dumps({"step_cost": {}, "comparisons": [], "runs": {
        "sft_alpaca__adamw_ga__K8__lr0.001__s0": {"eval_loss": 3.0, "wall_clock": 2.0, "optimizer_steps": 16}}}))
    page.write_text("# Page\n\nhand-written prose\n\n<!-- generated: post_training tiny -->\nstale\n"
                    "<!-- end generated: post_training tiny -->\n\nmore prose\n")
    bench.main(["--name", "tiny", "--results", str(results), "--page", str(page), "--page-only"])
    text = page.read_text()
    assert "stale" not in text and "hand-written prose" in text and text.endswith("more prose\n")
    assert "| sft_alpaca__adamw_ga__K8__lr0.001__s0 | 3.0000 | - | 2.0 | 16 |" in text


def test_report_without_runs_keeps_the_committed_results(tmp_path):
    with pytest.raises(SystemExit, match="no finished runs under"):
        bench.report(bench.parse_args(["--out", str(tmp_path / "none"), "--results", str(tmp_path / "results")]))
    assert not (tmp_path / "results").exists()
    with pytest.raises(SystemExit, match="--page-only: .* does not exist"):
        bench.main(["--results", str(tmp_path / "results"), "--page-only"])


def test_paper_variant_is_costed_with_the_timed_adamw_pma(tmp_path):
    for method in ("adamw_pma_reference", "adamw_ga"):
        run = tmp_path / "step_cost" / f"{method}__K8__r0"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"wall_clock": 4.0 if method == "adamw_ga" else 6.0,
                                                      "micro_steps": 32}))
    rid = lambda m, lr: bench.run_id("sft_alpaca", m, 8, lr, 0)  # noqa: E731
    _fake_run(tmp_path, rid("adamw_ga", 1e-3), [4.0, 3.5, 3.0], 100, 10.0)
    _fake_run(tmp_path, rid("adamw_pma", 1e-3), [4.0, 3.0, 2.9], 100, 20.0)  # reaches 3.0 at 100 samples
    args = bench.parse_args(["--out", str(tmp_path), "--tasks", "sft_alpaca", "--methods", "adamw_pma", "adamw_ga",
                             "--periods", "8", "--seeds", "0", "--grid", "sft_alpaca", "adamw", "1e-3",
                             "--results", str(tmp_path / "results"), "--page", str(tmp_path / "page.md")])
    (comparison,) = bench.report(args)["comparisons"]
    assert comparison["cost_per_micro_step"] == {"ga": 4.0 / 32, "pma": 6.0 / 32}
    # samples ratio 200 / 100, times GA's cost over PMA's per micro-step
    assert comparison["seeds"][0]["cost_adjusted_ratio"] == pytest.approx(2.0 * 4.0 / 6.0)


def test_every_micro_batch_baseline_joins_only_the_plot_of_the_k_it_was_measured_at(tmp_path):
    args = bench.parse_args(["--out", str(tmp_path), "--tasks", "sft_alpaca", "--seeds", "0",
                             "--grid", "sft_alpaca", "adamw", "1e-3", "3e-3"])
    for lr, loss in ((1e-3, 2.5), (3e-3, 2.9)):
        rid = bench.run_id("sft_alpaca", "adamw_ga", 1, lr, 0)
        _fake_run(tmp_path, rid, [4.0, loss], 100, 10.0)
        # --variance-every 8, window of 4 measured updates: the first row lands at micro-step 32
        row = {"kind": "update_variance", "micro_step": 32, "window_periods": 4, "update_variance": 1e-6}
        with (tmp_path / rid / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    found = bench.every_micro_batch_baselines(args, tmp_path, "sft_alpaca", 8)
    assert list(found) == ["adamw K=1 (EMA, every micro-batch) lr=0.001"]  # the best-lr run
    assert bench.every_micro_batch_baselines(args, tmp_path, "sft_alpaca", 4) == {}
