"""DDP + PMA on 2 gloo ranks: parity with one process (PMA and the no_sync GA baselines), DCP resume, errors.

Same worker and assertions as tests/test_fsdp.py, one torchrun launch with ``--backend ddp``.
"""
from __future__ import annotations

import pytest

from tests.test_fsdp import (COMM_STEPS, FP32, LAYERS, PERIOD, assert_comm, assert_errors, assert_ga_parity,
                              assert_plain_parity, assert_pma_parity, assert_resume, launch_checks)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch_checks("ddp", tmp_path_factory)


@pytest.mark.slow
def test_ddp_pma_equals_single_process(results):
    assert_pma_parity(results)


@pytest.mark.slow
def test_ddp_ga_baselines_equal_single_process(results):
    assert_ga_parity(results)


@pytest.mark.slow
def test_ddp_no_accumulation_baselines_equal_single_process(results):
    assert_plain_parity(results)


@pytest.mark.slow
def test_ddp_dcp_resume_mid_period_is_bit_identical(results):
    assert_resume(results)


@pytest.mark.slow
def test_ddp_checkpoint_errors(results):
    assert_errors(results)


@pytest.mark.slow
def test_ddp_measured_bytes_equal_the_model(results):
    grad_bytes = sum((inp + 1) * out for inp, out in LAYERS) * FP32
    assert grad_bytes == 652  # one bucket: far below DDP's 1 MiB first-bucket cap
    # PMA all-reduces every micro-step, GA once per K; clipping needs no communication under DDP
    assert_comm(results, {
        "pma": {"all_reduce": (COMM_STEPS, grad_bytes * COMM_STEPS)},
        "ga": {"all_reduce": (COMM_STEPS // PERIOD, grad_bytes * COMM_STEPS // PERIOD)},
    }, "ddp")
    every_step = {"all_reduce": (COMM_STEPS, grad_bytes * COMM_STEPS)}
    assert_comm(results, {"lion_pma": every_step, "adamw": every_step, "lion": every_step,
                          "lion_ga": {"all_reduce": (COMM_STEPS // PERIOD, grad_bytes * COMM_STEPS // PERIOD)}},
                "ddp")
