"""Fast, single-process checks of the DeepSpeed integration: registry, config validation, GA rule,
comm_profile plumbing, the lazy import hook, and the shipped configs (no engine, no process group)."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import pma_dist
from pma_dist import AdamWPMA, LionPMA
from pma_dist import deepspeed_integration as dsi
from tests.launching import REPO, load_script, rank_env

generate = load_script("ds_configs/generate.py")


def params():
    return [torch.nn.Parameter(torch.zeros(3))]


# ---------------------------------------------------------------------------------------------- registry
def test_builtin_pma_optimizers_are_registered():
    registered = dsi.registered_optimizers()
    assert registered["AdamWPMA"] is AdamWPMA and registered["LionPMA"] is LionPMA
    assert pma_dist.register_optimizer is dsi.register_optimizer and pma_dist.initialize is dsi.initialize


def test_register_optimizer_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty string"):
        dsi.register_optimizer("", AdamWPMA)
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass.*'nope'"):
        dsi.register_optimizer("Nope", "nope")
    with pytest.raises(ValueError, match="'adamwpma' is already registered for AdamWPMA"):
        dsi.register_optimizer("adamwpma", LionPMA)
    with pytest.raises(ValueError, match="shadow the built-in 'torch.optim.AdamW'"):
        dsi.register_optimizer("adamw", AdamWPMA)
    dsi.register_optimizer("ADAMWPMA", AdamWPMA)  # same class again: a no-op


def test_register_optimizer_adds_a_new_name_case_insensitively():
    class MyPMA(AdamWPMA):
        pass

    dsi.register_optimizer("MyPMA-Test", MyPMA)
    try:
        assert isinstance(dsi.build_optimizer("mypma-test", {"period": 2}, params()), MyPMA)
    finally:
        dsi._REGISTRY.pop("mypma-test")


def test_build_optimizer_from_config_params():
    opt = dsi.build_optimizer("lionpma", {"lr": 1e-3, "betas": [0.9, 0.95], "period": 4}, params())
    assert isinstance(opt, LionPMA)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["period"] == 4


def test_unknown_optimizer_param_names_the_key_and_the_valid_ones():
    with pytest.raises(ValueError) as info:
        dsi.build_optimizer("AdamWPMA", {"lr": 1e-3, "perod": 8, "beta": 0.9}, params())
    message = str(info.value)
    assert "'beta', 'perod'" in message
    assert "valid keys are lr, betas, eps, weight_decay, period, variant" in message


def test_bad_optimizer_value_is_reported_with_the_config_context():
    with pytest.raises(ValueError, match=r"'LionPMA'.*Invalid period: 0"):
        dsi.build_optimizer("LionPMA", {"period": 0}, params())


def test_unregistered_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="'SGDPMA' is not registered.*AdamWPMA, LionPMA"):
        dsi.build_optimizer("SGDPMA", {}, params())


# ---------------------------------------------------------------------------------------------- GA rule
def test_ga_rule_message_tells_the_fix():
    opt = AdamWPMA(params(), period=8)
    with pytest.raises(ValueError) as info:
        dsi.check_gradient_accumulation(opt, 8, train_batch_size=128, micro_batch_size=4, data_parallel_size=4)
    message = str(info.value)
    assert "gradient_accumulation_steps=8" in message and "train_batch_size=128" in message
    assert '"gradient_accumulation_steps": 1' in message and '"period" to 8' in message
    assert "current period: 8" in message


def test_ga_rule_allows_ga_one_and_period_one_and_other_optimizers():
    dsi.check_gradient_accumulation(AdamWPMA(params(), period=8), 1)
    dsi.check_gradient_accumulation(LionPMA(params(), period=1), 8)  # period 1 is plain Lion: the GA baseline
    dsi.check_gradient_accumulation(torch.optim.AdamW(params()), 8)


# ---------------------------------------------------------------------------------------------- comm_profile
def test_comm_profile_is_split_from_a_dict_config_without_mutating_it():
    cfg = {"train_micro_batch_size_per_gpu": 1, "comm_profile": {"enabled": True, "output_dir": "x"}}
    section, args, config, config_params = dsi._split_comm_profile(None, cfg, None)
    assert section == {"enabled": True, "output_dir": "x"}
    assert config == {"train_micro_batch_size_per_gpu": 1} and "comm_profile" in cfg
    assert args is None and config_params is None


def test_comm_profile_is_split_from_a_json_file_given_through_args(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "comm_profile": {"enabled": False}}))
    args = SimpleNamespace(deepspeed_config=str(path), local_rank=0)
    section, new_args, config, _ = dsi._split_comm_profile(args, None, None)
    assert section == {"enabled": False} and config == {"train_micro_batch_size_per_gpu": 1}
    assert new_args.deepspeed_config is None and args.deepspeed_config == str(path)
    from pma_dist.comm.profile import parse_comm_profile
    assert parse_comm_profile(section) is None


def test_config_without_comm_profile_passes_through_untouched():
    cfg = {"train_micro_batch_size_per_gpu": 1}
    assert dsi._split_comm_profile(None, cfg, None) == (None, None, cfg, None)


# ---------------------------------------------------------------------------------------------- initialize wrapper
def fake_deepspeed_initialize(calls):
    """DeepSpeed's signature plus a keyword it may gain in a later release."""
    def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
                   lr_scheduler=None, distributed_port=29500, mpu=None, dist_init_required=None, collate_fn=None,
                   config=None, mesh_param=None, config_params=None, a_future_keyword=None):
        calls.append(dict(locals()))
        return "engine", optimizer, training_data, lr_scheduler
    return initialize


def test_initialize_wrapper_forwards_every_argument_as_given():
    calls = []
    wrapped = dsi._wrap_initialize(fake_deepspeed_initialize(calls))
    cfg = {"train_micro_batch_size_per_gpu": 1}
    result = wrapped(None, "model", "opt", config=cfg, distributed_port=1234, a_future_keyword=7)
    assert result == ("engine", "opt", None, None)
    assert calls[0]["model"] == "model" and calls[0]["optimizer"] == "opt" and calls[0]["config"] is cfg
    assert calls[0]["distributed_port"] == 1234 and calls[0]["a_future_keyword"] == 7
    with pytest.raises(TypeError, match="no_such_keyword"):  # DeepSpeed's own error, not ours
        wrapped(model="m", no_such_keyword=1)


def test_initialize_wrapper_strips_comm_profile_and_keeps_the_rest(monkeypatch):
    import pma_dist.comm

    calls, attached = [], []
    monkeypatch.setattr(pma_dist.comm, "attach_to_engine", lambda engine, section: attached.append((engine, section)))
    wrapped = dsi._wrap_initialize(fake_deepspeed_initialize(calls))
    cfg = {"train_micro_batch_size_per_gpu": 1, "comm_profile": {"enabled": True, "output_dir": "x"}}
    wrapped(model="m", config_params=cfg, a_future_keyword="kept")
    assert calls[0]["config_params"] == {"train_micro_batch_size_per_gpu": 1} and "comm_profile" in cfg
    assert calls[0]["a_future_keyword"] == "kept" and calls[0]["model"] == "m"
    assert attached == [("engine", {"enabled": True, "output_dir": "x"})]


# ---------------------------------------------------------------------------------------------- import hook
def test_import_is_lazy_and_deepspeed_is_patched_when_imported():
    """``import pma_dist`` does not import DeepSpeed; importing it later (even after a find_spec
    probe, as accelerate/transformers do) patches the engine and wraps deepspeed.initialize."""
    code = (
        "import sys, importlib.util, pma_dist\n"
        "assert 'deepspeed' not in sys.modules\n"
        "importlib.util.find_spec('deepspeed')\n"
        "import deepspeed\n"
        "from deepspeed.runtime.engine import DeepSpeedEngine as E\n"
        "assert E.__dict__.get('_pma_dist_patched') and deepspeed.initialize._pma_dist_wrapped\n"
        "assert E._is_supported_optimizer(None, 'adamwpma') and E._is_supported_optimizer(None, 'LionPMA')\n"
        "assert not E._is_supported_optimizer(None, 'NoSuchOpt')\n"
        "assert not any(type(f).__name__ == '_InstallAfterImport' for f in sys.meta_path)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=rank_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_deepspeed_imported_before_pma_dist_is_patched_at_once():
    code = (
        "import deepspeed, pma_dist, inspect\n"
        "from deepspeed.runtime.engine import DeepSpeedEngine as E\n"
        "assert E.__dict__.get('_pma_dist_patched') and deepspeed.initialize._pma_dist_wrapped\n"
        "ours = list(inspect.signature(deepspeed.initialize).parameters)\n"
        "theirs = list(inspect.signature(deepspeed.initialize.__wrapped__).parameters)\n"
        "assert ours == theirs and 'config' in ours, (ours, theirs)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=rank_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- shipped configs
def test_shipped_configs_are_what_generate_writes():
    shipped = {p.name for p in (REPO / "ds_configs").glob("*.json")}
    expected = generate.all_configs()
    assert shipped == set(expected), "run python ds_configs/generate.py"
    for name, cfg in expected.items():
        assert (REPO / "ds_configs" / name).read_text() == generate.render(cfg), f"{name} drifted; regenerate"


def test_every_config_is_in_the_readme_table():
    readme = (REPO / "ds_configs" / "README.md").read_text()
    missing = [name for name in generate.all_configs() if f"`{name}`" not in readme]
    assert not missing, f"ds_configs/README.md does not list {missing}"


@pytest.mark.parametrize("name", sorted(generate.all_configs()))
def test_config_obeys_the_pma_rules(name):
    cfg = json.loads((REPO / "ds_configs" / name).read_text())
    assert "gradient_clipping" in cfg  # DeepSpeed's implicit default (1.0) would clip every micro-batch
    opt = cfg["optimizer"]
    if name.startswith("hf_"):
        return
    ga = cfg["gradient_accumulation_steps"]
    if opt["type"] in ("AdamWPMA", "LionPMA") and opt["params"]["period"] > 1:
        assert ga == 1 and "train_batch_size" not in cfg
    else:
        assert ga == generate.PERIOD  # the GA baseline accumulates what PMA would average
    if opt["type"] in ("AdamWPMA", "LionPMA"):
        dsi.build_optimizer(opt["type"], opt["params"], params())  # every key is one the optimizer takes
