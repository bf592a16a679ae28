"""ms-swift's optimizer plugin (``pma_dist/integrations/swift.py``), tested against ms-swift's optimizer-callback
interface with the real Hugging Face Trainer and stories260K, because ms-swift itself cannot be installed
here: ms-swift 4.6.0 requires ``datasets<4.8.5`` and this environment has datasets 5.2.0.

The interface (ms-swift 4.6.0, ``swift/optimizers`` and ``swift/trainers/mixin.py``), restated here:
``optimizers_map[args.optimizer or 'default'](args, trainer)`` is built in the trainer's ``__init__``; the
trainer's ``create_optimizer(model)`` returns ``callback.create_optimizer(model=model)`` and drops empty
param groups; the base callback's ``create_optimizer`` calls ``transformers.Trainer.create_optimizer`` on
the trainer; ``args`` are ``TrainingArguments`` plus ``optimizer``; ``--optim_args`` is HF's ``optim_args``.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from tests.launching import require_shared_data

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from pma_dist import AdamWPMA, LionPMA  # noqa: E402
from pma_dist.integrations.hf import PMACallback, PMASettingsWarning, find_pma_optimizer  # noqa: E402
from pma_dist.integrations.swift import PMA_OPTIMIZERS, optimizer_callback_class, parse_optim_args, register  # noqa: E402


class OptimizerCallbackInterface:
    """ms-swift's base ``OptimizerCallback`` contract."""

    def __init__(self, args, trainer):
        self.args, self.trainer = args, trainer

    def create_optimizer(self, model=None):
        return transformers.Trainer.create_optimizer(self.trainer, **({} if model is None else {"model": model}))


@dataclass
class SwiftLikeArguments(transformers.TrainingArguments):
    optimizer: Optional[str] = None


class SwiftLikeTrainer(transformers.Trainer):
    optimizers_map: dict = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.optimizer_callback = self.optimizers_map[self.args.optimizer](self.args, self)

    def create_optimizer(self, model=None):
        self.optimizer = self.optimizer_callback.create_optimizer(model=model)
        self.optimizer.param_groups = [g for g in self.optimizer.param_groups if len(g["params"]) > 0]
        return self.optimizer


def swift_trainer(tmp_path, optimizer, optim_args, **overrides):
    path = require_shared_data("models", "stories260K")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    text = require_shared_data("text", "tinyshakespeare_train.txt").read_text(encoding="utf-8")[:6000]
    ids = torch.tensor(tokenizer(text)["input_ids"][: 16 * 32]).view(16, 32)
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=8, learning_rate=3e-4,
                    adam_beta1=0.85, adam_beta2=0.97, adam_epsilon=1e-6, weight_decay=0.1, max_grad_norm=0.0,
                    lr_scheduler_type="constant", logging_steps=4, save_strategy="no", report_to=[], use_cpu=True,
                    disable_tqdm=True, optimizer=optimizer, optim_args=optim_args)
    settings.update(overrides)
    optimizers_map = {}
    register(optimizers_map, base=OptimizerCallbackInterface)
    SwiftLikeTrainer.optimizers_map = optimizers_map
    return SwiftLikeTrainer(model=model, args=SwiftLikeArguments(**settings), train_dataset=data), model


def test_register_adds_the_pma_methods_of_the_table():
    optimizers_map = {"default": OptimizerCallbackInterface}
    register(optimizers_map, base=OptimizerCallbackInterface)
    assert set(optimizers_map) == {"default", "adamw_pma", "adamw_pma_reference", "lion_pma"} == {"default", *PMA_OPTIMIZERS}
    assert all(issubclass(optimizers_map[n], OptimizerCallbackInterface) for n in PMA_OPTIMIZERS)
    with pytest.raises(ValueError, match="'adamw_ga' is not a PMA method"):
        optimizer_callback_class("adamw_ga", base=OptimizerCallbackInterface)


def test_optim_args_parsing_names_the_bad_item():
    assert parse_optim_args("period=8, eps=1e-6,variant=reference") == {"period": 8, "eps": 1e-6, "variant": "reference"}
    assert parse_optim_args(None) == {} == parse_optim_args("")
    with pytest.raises(ValueError, match="period='eight' is not a int"):
        parse_optim_args("period=eight")
    with pytest.raises(ValueError, match="cannot use 'accumulate=8'"):
        parse_optim_args("accumulate=8")


def test_swift_optimizer_adamw_pma_trains_one_step_per_micro_batch(tmp_path):
    trainer, model = swift_trainer(tmp_path, "adamw_pma", "period=4")
    initial = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PMASettingsWarning)
        trainer.train()
    pma = find_pma_optimizer(trainer.optimizer)
    assert isinstance(pma, AdamWPMA)
    assert [(g["period"], g["variant"], g["lr"], g["betas"], g["eps"]) for g in pma.param_groups] == [
        (4, "paper", 3e-4, (0.85, 0.97), 1e-6)] * 2  # from --learning_rate, --adam_beta1/2, --adam_epsilon
    assert sorted(g["weight_decay"] for g in pma.param_groups) == [0.0, 0.1]  # the Trainer's two groups
    assert [g["step"] for g in pma.param_groups] == [8, 8] and trainer.state.global_step == 8
    assert any(isinstance(c, PMACallback) for c in trainer.callback_handler.callbacks)
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), initial.parameters()))


def test_swift_optimizer_lion_pma_takes_optim_args():
    class Args:
        learning_rate, adam_beta1, adam_beta2, adam_epsilon = 1e-4, 0.9, 0.999, 1e-8
        optim_args = "period=8,beta2=0.98"

    class Trainer:
        optimizer_cls_and_kwargs = None

        class callback_handler:
            callbacks = []

        def add_callback(self, callback):
            self.callback_handler.callbacks.append(callback)

    class Base(OptimizerCallbackInterface):
        def create_optimizer(self, model=None):
            return self.trainer.optimizer_cls_and_kwargs

    trainer = Trainer()
    built = optimizer_callback_class("lion_pma", base=Base)(Args, trainer).create_optimizer()
    assert built == (LionPMA, {"lr": 1e-4, "betas": (0.9, 0.98), "period": 8})  # Lion ignores Adam's betas
    Args.optim_args = "eps=1e-3"
    with pytest.raises(ValueError, match="needs --optim_args period=K"):
        optimizer_callback_class("adamw_pma", base=Base)(Args, trainer).create_optimizer()


def test_swift_gradient_accumulation_with_pma_is_refused_before_any_step(tmp_path):
    trainer, model = swift_trainer(tmp_path, "adamw_pma", "period=4", gradient_accumulation_steps=4)
    initial = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4 with AdamWPMA\(period=4\)"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), initial.parameters()))
