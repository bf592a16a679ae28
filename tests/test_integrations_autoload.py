"""The opt-in start-up hook (``PMA_DIST_AUTOLOAD=1``, ``pma_dist/integrations/autoload.py``): installed as a
``.pth`` by a normal and by an editable install, inert unless the variable is ``1``, and it makes the
DeepSpeed JSON type ``AdamWPMA`` work from ``accelerate launch`` and ``trl sft``, which never import pma_dist.

The install tests build this checkout into a throw-away venv (``pip --python``, no dependencies) whose
first ``.pth`` adds this interpreter's site-packages, so torch, DeepSpeed and TRL come from here.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from pma_dist.integrations.autoload import ENV_VAR, PTH_FILE, PTH_NAME
from tests.launching import REPO, rank_env, require_shared_data

CONFIG = REPO / "ds_configs" / "hf_zero2_adamw_pma_auto.json"


def run(cmd, env, timeout=300, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    return proc


def env_with(value=None, **extra):
    env = rank_env(extra)
    env.pop(ENV_VAR, None)
    if value is not None:
        env[ENV_VAR] = value
    return env


def test_pth_line_imports_pma_dist_only_when_the_variable_is_1():
    line = PTH_FILE.read_text()
    assert line.startswith("import ") and line.count("\n") == 1  # site.py executes one "import" line
    probe = f"exec(open({str(PTH_FILE)!r}).read()); import sys; print('pma_dist' in sys.modules)"
    seen = {value: run([sys.executable, "-c", probe], env_with(value)).stdout.strip()
            for value in (None, "", "0", "true", "1")}
    assert seen == {None: "False", "": "False", "0": "False", "true": "False", "1": "True"}



def pip_install(venv_python: Path, *args):
    proc = run([sys.executable, "-m", "pip", "--python", venv_python, "install", "-q", "--no-deps", *args],
               env_with(), timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"pip install {' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def make_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site_packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             env_with()).stdout.strip())
    here = sysconfig.get_paths()["purelib"]  # torch, DeepSpeed, TRL ... of the running interpreter
    (site_packages / "00_pma_base_env.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    return python, site_packages


@pytest.fixture(scope="module")
def editable_venv(tmp_path_factory):
    python, site_packages = make_venv(tmp_path_factory.mktemp("autoload") / "venv")
    pip_install(python, "-e", REPO)
    return python, site_packages


@pytest.mark.slow
def test_editable_install_places_the_pth_and_it_works(editable_venv):
    python, site_packages = editable_venv
    assert (site_packages / PTH_NAME).read_text() == PTH_FILE.read_text()
    probe = "import sys; print('pma_dist' in sys.modules, sys.modules.get('pma_dist') and sys.modules['pma_dist'].__file__)"
    assert run([python, "-c", probe], env_with()).stdout.split()[0] == "False"
    loaded, where = run([python, "-c", probe], env_with("1")).stdout.split()
    assert loaded == "True" and Path(where).resolve() == (REPO / "pma_dist" / "__init__.py").resolve()


@pytest.mark.slow
def test_wheel_carries_the_pth_at_its_root(tmp_path):
    source = tmp_path / "src"  # a copy of what the wheel is built from, so no build/ lands in the checkout
    shutil.copytree(REPO / "pma_dist", source / "pma_dist", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    proc = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path, source], env_with(),
               timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("pma_dist-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(PTH_NAME).decode() == PTH_FILE.read_text()  # root of the wheel = site-packages


def sft_data(tmp_path) -> Path:
    rows = [json.loads(line) for line, _ in zip(open(require_shared_data("sft", "alpaca_mix_train.jsonl"),
                                                     encoding="utf-8"), range(8))]
    folder = tmp_path / "sft"
    folder.mkdir()
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["instruction"] + "\n", "completion": r["output"]}) + "\n")
    return folder


def trl_sft_arguments(tmp_path):
    return ["--model_name_or_path", require_shared_data("models", "stories260K"), "--dataset_name", sft_data(tmp_path),
            "--output_dir", tmp_path / "out", "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--max_length", "64", "--report_to", "none", "--save_strategy", "no", "--bf16", "false",
            "--logging_steps", "1"]


DEEPSPEED_LAUNCH = ["--num_processes", "1", "--use_deepspeed", "--deepspeed_config_file", CONFIG]


@pytest.mark.slow
def test_accelerate_launch_with_adamwpma_json_needs_and_uses_the_autoload(editable_venv, tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[integrations]')")
    import trl
    python, _ = editable_venv
    script = Path(trl.__file__).parent / "scripts" / "sft.py"
    command = [python, "-m", "accelerate.commands.launch", *DEEPSPEED_LAUNCH, script, *trl_sft_arguments(tmp_path)]
    without = run(command, env_with())
    assert without.returncode != 0 and "AdamWPMA is not a supported DeepSpeed Optimizer" in without.stdout + without.stderr
    with_hook = run(command, env_with("1"))
    assert with_hook.returncode == 0, with_hook.stdout[-3000:] + with_hook.stderr[-3000:]
    assert "'loss'" in with_hook.stdout + with_hook.stderr


@pytest.mark.slow
def test_trl_sft_cli_with_adamwpma_json_runs_with_the_autoload(editable_venv, tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[integrations]')")
    python, _ = editable_venv
    proc = run([python, "-m", "trl.cli.main", "sft", *trl_sft_arguments(tmp_path), *DEEPSPEED_LAUNCH], env_with("1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "'loss'" in proc.stdout + proc.stderr
