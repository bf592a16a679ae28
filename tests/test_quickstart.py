"""launch/quickstart.py (the README's main job) never starts over runs a user already has without being asked."""
import pytest

from tests.launching import load_script


def test_out_holding_runs_is_refused_before_any_launch(tmp_path, monkeypatch):
    quickstart = load_script("launch/quickstart.py")
    (tmp_path / "adamw_ga").mkdir()
    (tmp_path / "adamw_ga" / "metrics.jsonl").write_text('{"kind": "train"}\n')
    launched = []
    monkeypatch.setattr(quickstart, "train", lambda *a, **k: launched.append(a))
    with pytest.raises(SystemExit) as refused:
        quickstart.main(["--out", str(tmp_path)])
    assert f"quickstart: {tmp_path} already holds runs (adamw_ga/): pass --overwrite" in str(refused.value)
    assert launched == []
    assert (tmp_path / "adamw_ga" / "metrics.jsonl").read_text() == '{"kind": "train"}\n'
