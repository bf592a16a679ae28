"""One validation of the DeepSpeed optimizer block: launch/train.py and deepspeed.initialize give the same verdict."""
import json
import subprocess
import sys

import pytest
import torch

from pma_dist import deepspeed_integration
from recipes.posttrain.config import ConfigError, resolve
from tests.launching import REPO, free_port, rank_env


def _file(tmp_path, config):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("ds_type, key, value, verdict", [
    ("AdamWPMA", "period", 0, "Invalid period: 0 (must be a positive int"),
    ("AdamWPMA", "period", 2.5, "Invalid period: 2.5 (must be a positive int"),
    ("LionPMA", "period", True, "Invalid period: True (must be a positive int"),
    ("AdamWPMA", "period", "8", "Invalid period: '8' (must be a positive int"),
    ("AdamWPMA", "variant", "bogus", "Invalid variant: 'bogus'"),
    ("AdamWPMA", "betas", [0.9, 1.5], "Invalid beta2: 1.5"),
    ("LionPMA", "lr", "fast", "Invalid learning rate: 'fast' (must be a real number)"),
    ("AdamWPMA", "perod", 8, "unknown key(s) 'perod' in optimizer.params"),
])
def test_same_verdict_on_every_path(tmp_path, ds_type, key, value, verdict):
    path = _file(tmp_path, {"optimizer": {"type": ds_type, "params": {key: value}}})
    with pytest.raises(ConfigError) as from_train_py:  # launch/train.py: before any model is loaded
        resolve(["--deepspeed", path])
    with pytest.raises((TypeError, ValueError)) as from_engine:  # what deepspeed.initialize calls
        deepspeed_integration.build_optimizer(ds_type, {key: value}, [torch.nn.Parameter(torch.zeros(3))],
                                              source=path)
    assert str(from_train_py.value) == str(from_engine.value)  # one validation, one message
    assert str(from_train_py.value).startswith(f"{path}: optimizer {ds_type!r}") and verdict in str(from_engine.value)


@pytest.mark.parametrize("config, message", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": "fast"}}}, "optimizer.params.lr='fast' in {} must be a number"),
    ({"optimizer": {"type": "AdamW", "params": {"weight_decay": None}}},
     "optimizer.params.weight_decay=None in {} must be a number"),
    ({"optimizer": {"type": "Lion", "params": {"betas": [0.9]}}},
     "optimizer.params.betas=[0.9] in {} must be a list of two numbers"),
    ({"optimizer": {"type": "AdamW", "params": {"period": 4}}},
     "optimizer.params key(s) 'period' in {} are not taken by optimizer type 'AdamW'"),
    ({"gradient_accumulation_steps": "four"}, "gradient_accumulation_steps='four' in {} must be a positive integer"),
    ({"gradient_accumulation_steps": 2.5}, "gradient_accumulation_steps=2.5 in {} must be a positive integer"),
    ({"train_micro_batch_size_per_gpu": "2"}, "train_micro_batch_size_per_gpu='2' in {} must be a positive integer"),
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage=5 in {} must be 0, 1, 2 or 3"),
    ({"gradient_clipping": "1.0"}, "gradient_clipping='1.0' in {} must be a number >= 0"),
    ({"comm_profile": "on"}, "{}: comm_profile must be a dict"),
    ({"comm_profile": {"enabld": True}}, "{}: unknown comm_profile key(s) ['enabld']"),
])
def test_non_numeric_and_misspelt_json_values_name_key_and_file(tmp_path, config, message):
    path = _file(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        resolve(["--deepspeed", path])
    assert message.format(path) in str(info.value)


@pytest.mark.parametrize("argv, message", [
    (["--betas", "1.5", "0.9"], "Invalid beta1: 1.5"),
    (["--optimizer", "lion_pma", "--betas", "0.9", "1.0"], "Invalid beta2: 1.0"),
    (["--eps", "0"], "Invalid eps: 0.0 (must be > 0)"),
    (["--weight-decay", "-1"], "Invalid weight_decay: -1.0 (must be >= 0)"),
])
def test_bad_optimizer_flags_stop_before_the_model_loads(argv, message):
    with pytest.raises(ConfigError, match=r"--optimizer \w+ with .*: " + message.replace("(", r"\(").replace(")", r"\)")):
        resolve(argv)


def test_bare_initialize_with_an_unknown_type_names_the_registered_ones():
    code = (
        "import deepspeed, torch, pma_dist\n"
        "model = torch.nn.Linear(2, 2)\n"
        "config = {'train_micro_batch_size_per_gpu': 1, 'optimizer': {'type': 'AdamWPMAA', 'params': {}}}\n"
        "try:\n"
        "    deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)\n"
        "except ValueError as exc:\n"
        "    print('refused:', exc)\n"
    )
    env = rank_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(free_port())})
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert ("refused: DeepSpeed config optimizer type 'AdamWPMAA' is not a DeepSpeed optimizer, a torch.optim class "
            "or one registered with pma_dist (registered: AdamWPMA, LionPMA") in proc.stdout, proc.stderr[-3000:]
