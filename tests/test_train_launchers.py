"""launch/train.py under torchrun and mpirun (the deepspeed launcher is covered by the other modules)."""
import pytest

from recipes.posttrain.metrics import read_metrics
from tests.launching import REPO, run_ranks

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_train_runs_under_launcher(launcher, tmp_path):
    # the built-in fallback keeps this independent of ../shared/data and quick
    args = ["--model", "builtin-fallback", "--optimizer", "lion_pma", "--period", "2", "--lr", "1e-3",
            "--micro-steps", "4", "--micro-batch-size", "2", "--max-length", "48", "--eval-size", "8",
            "--output-dir", tmp_path, "--no-progress"]
    proc = run_ranks(REPO / "launch" / "train.py", args, nproc=2, launcher=launcher, timeout=300)
    assert "FALLBACK" in proc.stdout
    train = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert [(r["micro_step"], r["optimizer_steps"], r["samples"]) for r in train] == [(2, 2, 8), (4, 4, 16)]
