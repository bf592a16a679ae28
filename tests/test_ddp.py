"""DDP + PMA on 2 gloo ranks: parity with one process (PMA and the no_sync GA baselines), DCP resume, errors.

Same worker and assertions as tests/test_fsdp.py, one torchrun launch with ``--backend ddp``.
"""
from __future__ import annotations

import pytest

from tests.test_fsdp import assert_errors, assert_ga_parity, assert_pma_parity, assert_resume, launch_checks


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
def test_ddp_dcp_resume_mid_period_is_bit_identical(results):
    assert_resume(results)


@pytest.mark.slow
def test_ddp_checkpoint_errors(results):
    assert_errors(results)
