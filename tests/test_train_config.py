"""launch/train.py's flags and DeepSpeed config: precedence, PMA vs GA accumulation, every bad value."""
import json
import subprocess
import sys

import pytest

from recipes.posttrain.config import FALLBACK, ConfigError, resolve
from tests.launching import REPO, rank_env


def _json(tmp_path, config):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_pma_never_accumulates_and_ga_accumulates_k():
    pma = resolve(["--optimizer", "adamw_pma", "--period", "4"])
    assert pma.ds_config["gradient_accumulation_steps"] == 1 and pma.period == 4
    ga = resolve(["--optimizer", "adamw_ga", "--period", "4"])
    assert ga.ds_config["gradient_accumulation_steps"] == 4
    plain = resolve(["--optimizer", "adamw"])
    assert plain.ds_config["gradient_accumulation_steps"] == 1 and plain.period == 1 and not plain.is_pma
    assert ga.micro_batch_size == pma.micro_batch_size  # same micro-batch for the comparison
    assert ga.ds_config["gradient_clipping"] == 0.0  # DeepSpeed's default 1.0 is overridden


def test_precedence_defaults_then_json_then_cli(tmp_path):
    path = _json(tmp_path, {"train_micro_batch_size_per_gpu": 3, "gradient_clipping": 1.0, "train_batch_size": 99,
                            "optimizer": {"type": "AdamWPMA", "params": {"lr": 5e-4, "period": 6,
                                                                         "variant": "paper"}}})
    cfg = resolve(["--deepspeed", path])
    assert (cfg.optimizer, cfg.period, cfg.micro_batch_size) == ("adamw_pma", 6, 3)
    assert cfg.optimizer_params["lr"] == 5e-4 and cfg.method.variant == "paper"
    assert "variant" not in cfg.optimizer_params and "period" not in cfg.optimizer_params
    assert cfg.ds_config["gradient_clipping"] == 1.0 and "train_batch_size" not in cfg.ds_config
    cfg = resolve(["--deepspeed", path, "--lr", "1e-3", "--period", "2", "--micro-batch-size", "5",
                   "--gradient-clipping", "0"])
    assert (cfg.period, cfg.micro_batch_size, cfg.optimizer_params["lr"]) == (2, 5, 1e-3)
    assert cfg.ds_config["gradient_clipping"] == 0.0
    # switching optimizer on the command line drops the JSON's params of the other optimizer
    cfg = resolve(["--deepspeed", path, "--optimizer", "lion_ga", "--micro-steps", "12"])
    assert cfg.optimizer_params == {"lr": 1e-4, "betas": [0.9, 0.99], "weight_decay": 0.0}
    assert cfg.period == 6 and cfg.ds_config["gradient_accumulation_steps"] == 6  # K kept from the JSON


@pytest.mark.parametrize("block, ga, method, period", [
    ({"type": "AdamWPMA", "params": {"period": 4, "variant": "reference"}}, 1, "adamw_pma_reference", 4),
    ({"type": "AdamWPMA", "params": {"period": 4}}, 1, "adamw_pma", 4),
    ({"type": "LionPMA", "params": {"period": 4}}, 1, "lion_pma", 4),
    ({"type": "LionPMA", "params": {"period": 1}}, 4, "lion_ga", 4),
    ({"type": "LionPMA", "params": {"period": 1}}, 1, "lion", 1),
    ({"type": "AdamW", "params": {}}, 1, "adamw", 1),
    ({"type": "AdamW", "params": {}}, 8, "adamw_ga", 8),
])
def test_json_optimizer_block_names_one_method(tmp_path, block, ga, method, period):
    cfg = resolve(["--deepspeed", _json(tmp_path, {"gradient_accumulation_steps": ga, "optimizer": block})])
    assert (cfg.optimizer, cfg.period, cfg.ds_config["gradient_accumulation_steps"]) == (method, period, ga)


def test_ga_config_period_comes_from_gradient_accumulation(tmp_path):
    path = _json(tmp_path, {"gradient_accumulation_steps": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    cfg = resolve(["--deepspeed", path])
    assert (cfg.optimizer, cfg.period, cfg.ds_config["gradient_accumulation_steps"]) == ("adamw_ga", 4, 4)
    # --optimizer on the command line turns the same file into a PMA run: no accumulation
    cfg = resolve(["--deepspeed", path, "--optimizer", "adamw_pma"])
    assert (cfg.period, cfg.ds_config["gradient_accumulation_steps"]) == (4, 1)


@pytest.mark.parametrize("argv, message", [
    (["--period", "0"], "--period must be >= 1, got 0"),
    (["--micro-steps", "0"], "--micro-steps must be >= 1, got 0"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
    (["--variance-every", "0"], "--variance-every must be >= 1, got 0"),
    (["--save-every", "-1"], "--save-every must be >= 0, got -1"),
    (["--lr", "0"], "learning rate must be > 0, got lr=0"),
    (["--beta", "0", "--task", "dpo"], "--beta (DPO) must be > 0, got 0"),
    (["--optimizer", "adamw_ga", "--period", "4", "--micro-steps", "10"],
     "--micro-steps 10 is not a multiple of K=4"),
    (["--optimizer", "lion_ga", "--period", "4", "--save-every", "6"], "--save-every 6 is not a multiple of K=4"),
    (["--optimizer", "adamw", "--period", "4"],
     "--period 4 with --optimizer adamw: it steps on every micro-batch (no accumulation); for gradient "
     "accumulation over 4 micro-batches use --optimizer adamw_ga"),
    (["--period", "4", "--save-every", "6", "--micro-steps", "12"],
     "--save-every 6 must be a multiple of the train-log interval 4"),
    (["--backend", "fsdp", "--deepspeed", "ds.json"],
     "--deepspeed ds.json is a DeepSpeed setting, but --backend is fsdp"),
    (["--deepspeed", "/nonexistent/ds.json"], "--deepspeed config not found: /nonexistent/ds.json"),
    (["--select-size", "-1"], "--select-size must be >= 0, got -1"),
    (["--lr-schedule", "warmup_cosine", "--warmup-fraction", "1"], "--warmup-fraction must be in [0, 1), got 1.0"),
    (["--optimizer", "adamw_ga", "--lr-decay", "periodic"],
     "--lr-decay periodic with --optimizer adamw_ga: the periodic decay acts on PMA's small steps"),
])
def test_bad_flags_are_named(argv, message):
    with pytest.raises(ConfigError) as info:
        resolve(argv)
    assert message in str(info.value)


def test_bad_json_configs(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(ConfigError, match="broken.json is not valid JSON"):
        resolve(["--deepspeed", str(broken)])
    with pytest.raises(ConfigError, match="optimizer type 'SGD' in .*ds.json is not supported"):
        resolve(["--deepspeed", _json(tmp_path, {"optimizer": {"type": "SGD"}})])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=4 in .*ds.json with a PMA optimizer"):
        resolve(["--deepspeed", _json(tmp_path, {"gradient_accumulation_steps": 4,
                                                 "optimizer": {"type": "LionPMA", "params": {"period": 4}}})])


def test_fallback_is_explicit_or_when_nothing_is_found(monkeypatch):
    cfg = resolve(["--model", FALLBACK])
    assert cfg.fallback and cfg.train_data == FALLBACK
    import recipes.posttrain.config as config

    monkeypatch.setattr(config, "DEFAULT_MODEL", config.REPO / "no-such-model-dir")
    assert resolve([]).fallback and resolve([]).model == FALLBACK
    # own data with the fallback's character tokenizer is refused rather than silently odd
    with pytest.raises(ConfigError, match="--train-data x.jsonl given but no model: pass --model"):
        resolve(["--train-data", "x.jsonl"])


def test_cli_exits_2_with_the_message_before_any_work():
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--period", "0"],
                          env=rank_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.py: error: --period must be >= 1, got 0" in proc.stderr


def test_job_settings_are_typed_fields_for_every_flag():
    from dataclasses import fields

    from recipes.posttrain.config import JobSettings, build_parser

    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    kept = {f.name for f in fields(JobSettings)}
    assert dests == kept | set(JobSettings.RESOLVED) and not kept & set(JobSettings.RESOLVED)
    cfg = resolve(["--model", FALLBACK, "--micro-steps", "12", "--seed", "3"])
    assert isinstance(cfg.settings, JobSettings) and (cfg.settings.micro_steps, cfg.settings.seed) == (12, 3)
    with pytest.raises(Exception):
        cfg.settings.seed = 4  # frozen: the job cannot change its settings behind the checkpoint identity
    # typed, backend-independent fields; the DeepSpeed dict is DeepSpeed's alone
    assert (cfg.micro_batch_size, cfg.gradient_clipping) == (4, 0.0) and cfg.ds_config is not None


def test_lr_decay_reaches_the_pma_optimizer_and_the_checkpoint_identity():
    cfg = resolve(["--optimizer", "lion_pma", "--lr-decay", "periodic"])
    assert cfg.optimizer_params["lr_decay"] == "periodic" and cfg.identity()["lr_decay"] == "periodic"
    assert cfg.method.deepspeed_config(cfg.period, cfg.optimizer_params)["optimizer"]["params"]["lr_decay"] == "periodic"
    assert "lr_decay" not in resolve(["--optimizer", "adamw_pma"]).optimizer_params  # the optimizer's default
    assert resolve(["--optimizer", "adamw", "--lr-decay", "none"]).identity()["lr_decay"] is None
    scheduled = resolve(["--lr-schedule", "warmup_cosine", "--warmup-fraction", "0.2"]).identity()
    assert (scheduled["lr_schedule"], scheduled["warmup_fraction"]) == ("warmup_cosine", 0.2)
