"""benchmarks/pages.py and the benchmarks' page writers: a generated section replaces only itself, and
``--report-only`` / ``--page-only`` turn a result file into the exact rows of its detail page."""
import json

import pytest

from tests.launching import load_script

pages = load_script("benchmarks/pages.py")


def test_section_is_appended_then_replaced_in_place(tmp_path):
    page = tmp_path / "sub" / "page.md"
    pages.write_section(page, "a", "first", "Title")
    assert page.read_text() == "# Title\n\n<!-- generated: a -->\nfirst\n<!-- end generated: a -->\n"
    page.write_text(page.read_text() + "\nprose by hand\n")
    pages.write_section(page, "b", "other", "Title")
    pages.write_section(page, "a", "second", "Title")
    text = page.read_text()
    assert "first" not in text and text.index("second") < text.index("prose by hand") < text.index("other")


def test_section_without_its_end_marker_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- generated: a -->\nhalf a section\n")
    with pytest.raises(SystemExit, match="has no matching '<!-- end generated: a -->'"):
        pages.write_section(page, "a", "new", "Title")
    assert page.read_text() == "<!-- generated: a -->\nhalf a section\n"


def test_link_is_relative_to_the_page(tmp_path):
    page = tmp_path / "docs" / "bench" / "p.md"
    assert pages.link(page, tmp_path / "benchmarks" / "r.json") == "../../benchmarks/r.json"
    # what a command run from the repository root writes: relative inside the repository, absolute outside
    inside = pages.REPO / "benchmarks" / "results" / "e2e_step.json"
    assert pages.repo_path(inside) == "benchmarks/results/e2e_step.json"
    assert pages.repo_path(tmp_path / "x.json") == str((tmp_path / "x.json").resolve())


def _row(name, median, ratio, paired, min_ratio, spread, gbps, frac):
    return dict(name=name, median_ms=median, ratio_to_best_torch_adamw=ratio, paired_ratio_to_best_torch_adamw=paired,
                min_ratio_to_best_torch_adamw=min_ratio, spread=spread, gb_per_s=gbps,
                fraction_of_stream_bandwidth=frac)


def test_optimizer_step_report_only_writes_the_rows_of_the_json(tmp_path):
    bench = load_script("benchmarks/optimizer_step.py")
    source, page = tmp_path / "os.json", tmp_path / "page.md"
    run = dict(threads=1, params=10_000_384, tensors=20, stream_gb_per_s=25.14, rows=[
        _row("torch AdamW fused", 14.0, 1.0, 1.0, 1.0, 0.45, 19.8, 0.79),
        _row("DeepSpeedCPUAdam", 16.0, 16 / 14, 1.1, 1.2, 0.111, 19.0, 0.76)])
    source.write_text(json.dumps(dict(command="optimizer_step.py --repeats 3", runs=[run],
                                      machine=dict(cpu="CPU X", logical_cpus=2, cpu_capability="AVX2", python="3.11",
                                                   torch="2.13"), load_average_start=[1.04, 2, 3],
                                      load_average_end=[3, 2, 1])))
    bench.main(["--report-only", "--out", str(source), "--page", str(page)])
    text = page.read_text()
    assert "Command: `python benchmarks/optimizer_step.py --repeats 3`" in text
    assert "DeepSpeed not installed; load average [1.0, 2, 3] -> [3, 2, 1]" in text
    assert "**10M params (20 tensors), 1 thread(s)** — stream 25.1 GB/s" in text
    # the last column is the median over DeepSpeedCPUAdam's: 14 / 16
    assert "| torch AdamW fused | 14.00 | 1.00 | 1.00 | 1.00 | 45% | 19.8 | 79% | 0.88 |" in text
    assert "| DeepSpeedCPUAdam | 16.00 | 1.14 | 1.10 | 1.20 | 11% | 19.0 | 76% | 1.00 |" in text
    with pytest.raises(SystemExit, match="does not exist"):
        bench.main(["--report-only", "--out", str(tmp_path / "missing.json"), "--page", str(page)])


def test_e2e_step_report_only_writes_one_table_per_stage(tmp_path):
    bench = load_script("benchmarks/e2e_step.py")
    source, page = tmp_path / "e2e.json", tmp_path / "page.md"
    per_mode = lambda ga, pf, pu: {"ga": ga, "pma-foreach": pf, "pma-fused": pu}  # noqa: E731
    stage = dict(stage=3, world=2, params=7_407_872, period=8, micro_batch=4, seq=128,
                 micro_step_s=per_mode([0.3] * 6, [0.4] * 6, [0.35] * 6),
                 median_micro_step_ms=per_mode(300.0, 400.0, 350.0), ratio_to_ga=per_mode(1.0, 4 / 3, 7 / 6),
                 paired_ratio_to_ga=per_mode(1.0, 1.3, 1.1), median_engine_step_ms=per_mode(4.0, 48.44, 37.4))
    source.write_text(json.dumps(dict(command="e2e_step.py --periods 6", stages=[stage],
                                      load_average_start=[1, 1, 1], load_average_end=[2, 2, 2])))
    bench.main(["--report-only", "--out", str(source), "--page", str(page)])
    text = page.read_text()
    assert ("**ZeRO-3, 2 ranks, 7.4M params, K = 8, micro-batch 4 x 128 tokens per rank, 6 timed periods per "
            "engine**") in text
    assert "| pma-foreach | 400.0 | 1.333 | 1.300 | 48.4 |" in text and "| ga | 300.0 | 1.000 | 1.000 | 4.0 |" in text


def test_adapm_page_only_quotes_the_summary_and_links_the_plots(tmp_path):
    bench = load_script("benchmarks/adapm.py")
    out, page = tmp_path / "adapm_run", tmp_path / "docs" / "page.md"
    out.mkdir()
    (out / "summary.md").write_text("| task | optimizer |\n|---|---|\n| sft | adapm |\n")
    (out / "sft_loss.png").write_bytes(b"")
    bench.main(["--out", str(out), "--page", str(page), "--page-only"])
    text = page.read_text()
    assert "<!-- generated: adapm adapm_run -->" in text and "| sft | adapm |" in text
    assert "![sft_loss](../adapm_run/sft_loss.png)" in text
    with pytest.raises(SystemExit, match="summary.md does not exist"):
        bench.main(["--out", str(tmp_path / "none"), "--page", str(page), "--page-only"])
