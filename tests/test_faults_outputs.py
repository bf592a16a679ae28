"""Every output location is checked writable before any work, with one line naming the path."""
import time

import pytest

from pma_dist.comm import cli
from pma_dist.comm.profile import CommProfile, RunMeta, open_ledger
from pma_dist.output_paths import OutputPathError, check_writable_dir, check_writable_file
from pma_dist.schedule import MicroStepSchedule


def test_writable_checks_name_the_path_and_the_reason(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputPathError, match=f"--output-dir {afile} is a file, not a directory"):
        check_writable_dir(afile, "--output-dir")
    with pytest.raises(OutputPathError, match=r"--output-dir /proc/x/run is not writable \(No such file or directory\)"):
        check_writable_dir("/proc/x/run", "--output-dir")  # root may 'access' /proc, but nothing can be made there
    with pytest.raises(OutputPathError, match=f"--output {tmp_path} is a directory: give a file name"):
        check_writable_file(tmp_path, "--output")
    with pytest.raises(OutputPathError, match="--output /proc/x/bw.json cannot be written: its directory /proc/x"):
        check_writable_file("/proc/x/bw.json", "--output")
    made = check_writable_dir(tmp_path / "new" / "dir", "--output-dir")
    assert made.is_dir() and list(made.iterdir()) == []  # created, and the probe is gone


def test_open_ledger_refuses_an_unwritable_comm_profile_dir_before_the_run():
    meta = RunMeta(backend="ddp", optimizer="AdamWPMA", schedule=MicroStepSchedule.pma(4), world_size=1,
                   dp_world_size=1, dtype="float32", param_numels=[4], param_bytes=16, gradient_clipping=0.0)
    with pytest.raises(OutputPathError, match="comm_profile.output_dir /proc/x/comm is not writable"):
        open_ledger(CommProfile(output_dir="/proc/x/comm"), meta)


@pytest.mark.parametrize("argv, message", [
    (["project", "--period", "100000"], "--period 100000 is out of range: the PMA period K must be in 1..4096"),
    (["project", "--period", "0"], "period must be a positive int, got 0"),
    (["report", "RUN", "--period", "5000"], "--period 5000 is out of range"),
    (["project", "--output", "{tmp}"], "--output {tmp} is a directory: give a file name"),
    (["bandwidth", "--output", "/proc/x/bw.json"], "--output /proc/x/bw.json cannot be written"),
    (["report", "RUN", "--output", "/proc/x/report"], "--output /proc/x/report is not writable"),
])
def test_cli_refuses_bad_outputs_and_periods_before_any_work(tmp_path, capsys, argv, message):
    began = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        cli.main([a.format(tmp=tmp_path) for a in argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pma-dist: error: " + message.format(tmp=tmp_path)) and err.count("\n") == 1
    assert time.monotonic() - began < 20  # refused at once: no torchrun start, no projection priced
