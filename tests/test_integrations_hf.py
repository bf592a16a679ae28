"""pma_dist.integrations.hf with the real libraries, one process: the Hugging Face Trainer and TRL's
SFTTrainer (through ``optimizer_cls_and_kwargs``) and DPOTrainer (through ``optimizers=``) train the real
stories260K model with AdamW-PMA, stepping the optimizer on every micro-batch, and match a plain loop
(forward, backward, clip, step) over the very batches the trainer fed; with ``PMACallback``,
``gradient_accumulation_steps=4`` is refused before any step.

Tolerance of the trainer-vs-plain-loop parity (float32, same batches, same optimizer math). The runs
differ only in how the loss is reduced (TRL's tiled "fused LM head" log-probs against the model's
cross-entropy; the Trainer's sum / num_items_in_batch against a mean), so each gradient element differs
by rounding, |dg| <= RHO = 1e-6 (float32, gradients of norm <= 1 after max_grad_norm=1 clipping, so
|g| <= 1). With eps=1e-3 an AdamW-PMA step lr * m/(sqrt(v)+eps) moves by at most 2 * lr * |dg| / eps
(the m and the v paths, each <= lr * |dg| / eps), so after N steps |dp| <= N * 2 * lr * RHO / eps =
1.6e-5 for N = 8, lr = 1e-3; TOL = 5e-5 leaves a factor 3 for the later gradients moving with the
parameters. Each test's negative control (the plain loop with period 8 instead of 4) must miss by more.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from pma_dist import AdamWPMA
from tests.launching import require_shared_data

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from pma_dist.integrations.hf import (PMACallback, PMASettingsWarning, find_pma_optimizer,  # noqa: E402
                                      gradient_accumulation_steps, optimizer_cls_and_kwargs)

LR, EPS, PERIOD, STEPS, MICRO = 1e-3, 1e-3, 4, 8, 2
RHO = 1e-6
TOL = 5e-5  # see the module docstring: N * 2 * lr * RHO / eps = 1.6e-5, x3
assert STEPS * 2 * LR * RHO / EPS * 3 <= TOL * 1.0001


def require_trl():
    return pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[integrations]')")


def load_model():
    path = require_shared_data("models", "stories260K")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token  # stories260K defines no pad token
    return model, tokenizer


def jsonl(*relative, n=24):
    with open(require_shared_data(*relative), encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def sft_dataset():
    from datasets import Dataset
    rows = jsonl("sft", "alpaca_mix_train.jsonl")
    return Dataset.from_list([{"prompt": f"{r['instruction']}\n{r['input']}\n", "completion": r["output"]}
                              for r in rows])


def dpo_dataset():
    from datasets import Dataset
    rows = jsonl("dpo", "hh_rlhf_harmless_base_test_pairs.jsonl")
    # the end of each dialogue: stories260K reads 512 positions and the test keeps 64
    return Dataset.from_list([{"prompt": r["prompt"][-200:], "chosen": r["chosen"][:200],
                               "rejected": r["rejected"][:200]} for r in rows])


def common_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=MICRO, max_steps=STEPS,
                    learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
                    logging_steps=1, save_strategy="no", report_to=[], seed=0, disable_tqdm=True, use_cpu=True,
                    bf16=False,  # TRL's configs default to bf16 autocast; the parity is float32
                    dataloader_num_workers=0)
    settings.update(overrides)
    return settings


def record(trainer):
    """The batches ``trainer`` computes its loss on, and a count of its optimizer's steps."""
    batches, steps = [], []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        batches.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return batches, steps


def count_steps(optimizer, steps):
    optimizer.register_step_post_hook(lambda *_: steps.append(1))


def plain_loop(model, batches, loss_fn, period, optimizer_cls=AdamWPMA, **hyper):
    """The reference: forward, backward, clip to norm 1, one PMA step per micro-batch."""
    hyper = hyper or dict(lr=LR, eps=EPS, weight_decay=0.0)
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], period=period, **hyper)
    for batch in batches:
        loss_fn(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return model


def max_difference(a, b):
    named_b = dict(b.named_parameters())
    return max(float((p.detach() - named_b[n].detach()).abs().max()) for n, p in a.named_parameters())


def sft_loss(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def assert_parity(trainer, initial, batches, loss_fn, steps):
    pma = find_pma_optimizer(trainer.optimizer)
    # one optimizer step per micro-batch: the Trainer's steps, the optimizer's clock and its hook agree
    assert trainer.state.global_step == STEPS and len(batches) == STEPS and len(steps) == STEPS
    assert [g["step"] for g in pma.param_groups] == [STEPS] * len(pma.param_groups)
    assert all(g["period"] == PERIOD for g in pma.param_groups)
    difference = max_difference(trainer.model, plain_loop(copy.deepcopy(initial), batches, loss_fn, PERIOD))
    assert difference <= TOL, difference
    control = max_difference(trainer.model, plain_loop(copy.deepcopy(initial), batches, loss_fn, 2 * PERIOD))
    assert control > 4 * TOL, control  # the tolerance tells a wrong schedule apart
    return difference


# ------------------------------------------------------------------------------------------ names
def test_optimizer_cls_and_kwargs_takes_names_from_the_method_table():
    from pma_dist import LionPMA
    assert optimizer_cls_and_kwargs("adamw_pma", lr=2e-5, period=8) == (
        AdamWPMA, {"lr": 2e-5, "period": 8, "variant": "paper"})
    assert optimizer_cls_and_kwargs("adamw_pma_reference", period=4)[1]["variant"] == "reference"
    assert optimizer_cls_and_kwargs("lion_pma", lr=1e-4, period=8) == (LionPMA, {"lr": 1e-4, "period": 8})
    # GA and no-accumulation names: the same plain optimizer; the Trainer's setting decides
    assert optimizer_cls_and_kwargs("adamw_ga", lr=1e-3) == optimizer_cls_and_kwargs("adamw", lr=1e-3) == (
        torch.optim.AdamW, {"lr": 1e-3})
    assert optimizer_cls_and_kwargs("lion_ga") == optimizer_cls_and_kwargs("lion") == (LionPMA, {"period": 1})
    assert [gradient_accumulation_steps(n, 8) for n in ("adamw_pma", "adamw_ga", "lion_ga", "adamw")] == [1, 8, 8, 1]
    with pytest.raises(ValueError, match="pass period=K"):
        optimizer_cls_and_kwargs("adamw_pma", lr=1e-3)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=K"):
        optimizer_cls_and_kwargs("adamw_ga", period=8)
    with pytest.raises(ValueError, match=r"adapm: AdaPM chooses each block's momentum by parameter name.*optimizers="):
        optimizer_cls_and_kwargs("adapm", period=4)
    with pytest.raises(ValueError, match="unknown training method 'adamw-pma'"):
        optimizer_cls_and_kwargs("adamw-pma", period=8)
    cls, kwargs = optimizer_cls_and_kwargs("adamw_pma", lr=1e-3, period=8)
    assert cls([torch.nn.Parameter(torch.zeros(2))], **kwargs).param_groups[0]["period"] == 8


def test_import_pma_dist_does_not_import_transformers():
    import subprocess
    import sys
    code = "import sys, pma_dist, pma_dist.integrations; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def callback_warnings(optimizer, max_steps=80, **settings):
    """What PMACallback says at train begin for these TrainingArguments (no model, no training)."""
    args = transformers.TrainingArguments(output_dir="unused", report_to=[], use_cpu=True, **settings)
    state = transformers.TrainerState(max_steps=max_steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PMACallback().on_train_begin(args, state, transformers.TrainerControl(), optimizer=optimizer)
    return [str(w.message) for w in caught if issubclass(w.category, PMASettingsWarning)]


def test_callback_lists_only_step_counts_and_checks_lr():
    params = [torch.nn.Parameter(torch.zeros(2))]
    said = callback_warnings(AdamWPMA(params, lr=1e-4, period=8), learning_rate=1e-4, max_grad_norm=0.0,
                             warmup_steps=0.1, logging_steps=10, eval_strategy="no", eval_steps=50,
                             save_strategy="steps", save_steps=200)
    assert len(said) == 1, said  # no clipping warning at max_grad_norm=0, lr agrees
    assert "max_steps (the scheduler's length)=80, logging_steps=10, save_steps=200." in said[0]
    assert "warmup_steps" not in said[0] and "eval_steps" not in said[0]  # a fraction; eval off
    said = callback_warnings(AdamWPMA(params, lr=1e-3, period=8), learning_rate=5e-5, max_grad_norm=0.5)
    assert any("max_grad_norm=0.5 with AdamWPMA(period=8)" in m for m in said), said
    assert any("has lr [0.001] but TrainingArguments.learning_rate=5e-05" in m for m in said), said
    # period 1 is plain AdamW / Lion: nothing to say, and accumulation is fine
    assert callback_warnings(AdamWPMA(params, period=1), gradient_accumulation_steps=4) == []
    assert callback_warnings(torch.optim.AdamW(params), gradient_accumulation_steps=4) == []


# ------------------------------------------------------------------------------------------ HF Trainer
def test_hf_trainer_lion_pma_steps_every_micro_batch_and_warns(tmp_path):
    """Plain Trainer, Lion-PMA by name; the callback's warnings carry the numbers it found."""
    from pma_dist import LionPMA
    model, tokenizer = load_model()
    text = require_shared_data("text", "tinyshakespeare_train.txt").read_text(encoding="utf-8")[:6000]
    ids = torch.tensor(tokenizer(text)["input_ids"][: 16 * 32]).view(16, 32)
    data = [{"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones_like(row)} for row in ids]
    args = transformers.TrainingArguments(**common_args(tmp_path, warmup_steps=2, lr_scheduler_type="constant_with_warmup"))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[PMACallback()],
                                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("lion_pma", lr=LR, period=PERIOD))
    with pytest.warns(PMASettingsWarning) as caught:
        trainer.train()
    messages = [str(w.message) for w in caught if issubclass(w.category, PMASettingsWarning)]
    assert any("max_grad_norm=1.0" in m and "every micro-batch" in m for m in messages), messages
    assert any("max_steps (the scheduler's length)=8" in m and "warmup_steps=2" in m and "logging_steps=1" in m
               and "Multiply a GA recipe's values by 4" in m for m in messages), messages
    pma = find_pma_optimizer(trainer.optimizer)
    assert isinstance(pma, LionPMA) and trainer.state.global_step == STEPS
    assert [g["step"] for g in pma.param_groups] == [STEPS, STEPS]  # decayed and not-decayed groups


# ------------------------------------------------------------------------------------------ TRL
def test_sft_trainer_adamw_pma_steps_every_micro_batch_and_matches_plain_loop(tmp_path):
    require_trl()
    from trl import SFTConfig, SFTTrainer
    model, tokenizer = load_model()
    initial = copy.deepcopy(model)
    trainer = SFTTrainer(model=model, args=SFTConfig(**common_args(tmp_path), max_length=64),
                         train_dataset=sft_dataset(), processing_class=tokenizer, callbacks=[PMACallback()],
                         optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("adamw_pma", lr=LR, eps=EPS, period=PERIOD))
    batches, steps = record(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PMASettingsWarning)
        trainer.create_optimizer()
        count_steps(trainer.optimizer, steps)
        trainer.train()
    assert all((b["labels"] != -100).any() for b in batches)
    assert_parity(trainer, initial, batches, sft_loss, steps)


def dpo_loss(beta, reference):
    """Sigmoid DPO on a batch of [chosen..., rejected...] rows, written here from the DPO paper."""
    def sequence_logps(model, batch):
        ids, mask = batch["input_ids"], batch["completion_mask"] * batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (token_logps * mask[:, 1:]).sum(-1)

    def loss(model, batch):
        chosen, rejected = sequence_logps(model, batch).chunk(2)
        with torch.no_grad():
            ref_chosen, ref_rejected = sequence_logps(reference, batch).chunk(2)
        return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    return loss


LION_LR = 1e-4
LION_FLIPS = 1e-3  # see tests/test_integrations_distributed.py: a rounding difference can only flip a sign


@pytest.mark.parametrize("method", ["adamw_pma", "lion_pma"])
def test_sft_trainer_lora_adapters_with_pma_match_plain_loop(tmp_path, method):
    """PEFT/LoRA through SFTTrainer(peft_config=...): only the adapters train, one step per micro-batch."""
    require_trl()
    peft = pytest.importorskip("peft", reason="PEFT is not installed (pip install -e '.[integrations]')")
    from trl import SFTConfig, SFTTrainer
    from pma_dist import LionPMA
    model, tokenizer = load_model()
    hyper = dict(lr=LR, eps=EPS, weight_decay=0.0) if method == "adamw_pma" else dict(lr=LION_LR, weight_decay=0.0)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    torch.manual_seed(0)
    trainer = SFTTrainer(model=model, args=SFTConfig(**common_args(tmp_path), max_length=64), peft_config=config,
                         train_dataset=sft_dataset(), processing_class=tokenizer, callbacks=[PMACallback()],
                         optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(method, period=PERIOD, **hyper))
    # an independent copy: TRL patched the trainer model's forward with a closure over that very model,
    # so a deepcopy would still compute through it
    initial = peft.get_peft_model(load_model()[0], config)
    initial.load_state_dict(trainer.model.state_dict())
    batches, steps = record(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PMASettingsWarning)
        trainer.train()
    pma = find_pma_optimizer(trainer.optimizer)
    assert isinstance(pma, AdamWPMA if method == "adamw_pma" else LionPMA)
    assert trainer.state.global_step == STEPS and len(batches) == STEPS
    assert {g["step"] for g in pma.param_groups if g["params"]} == {STEPS}
    optimized = [p for g in pma.param_groups for p in g["params"]]
    assert optimized and all("lora_" in n for n, p in trainer.model.named_parameters()
                             if any(p is q for q in optimized))
    cls = type(pma)
    reference = plain_loop(copy.deepcopy(initial), batches, sft_loss, PERIOD, cls, **hyper)
    control = plain_loop(copy.deepcopy(initial), batches, sft_loss, 2 * PERIOD, cls, **hyper)
    trained, start = dict(trainer.model.named_parameters()), dict(initial.named_parameters())
    frozen = [n for n, p in start.items() if not p.requires_grad]
    assert frozen and all(torch.equal(trained[n], start[n]) for n in frozen)
    if method == "adamw_pma":
        assert max_difference(trainer.model, reference) <= TOL
        assert max_difference(trainer.model, control) > 4 * TOL
    else:
        def flipped(other):
            named = dict(other.named_parameters())
            diffs = [(trained[n].detach() - named[n].detach()).abs() > LION_LR / PERIOD / 2
                     for n, p in start.items() if p.requires_grad]
            return sum(int(d.sum()) for d in diffs) / sum(d.numel() for d in diffs)
        assert flipped(reference) <= LION_FLIPS
        assert flipped(control) > 100 * LION_FLIPS


def test_dpo_trainer_adamw_pma_via_optimizers_matches_plain_loop(tmp_path):
    require_trl()
    from trl import DPOConfig, DPOTrainer
    model, tokenizer = load_model()
    initial = copy.deepcopy(model)
    optimizer = AdamWPMA(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0, period=PERIOD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PMASettingsWarning)
        trainer = DPOTrainer(model=model, args=DPOConfig(**common_args(tmp_path), max_length=64, beta=0.1),
                             train_dataset=dpo_dataset(), processing_class=tokenizer, optimizers=(optimizer, None),
                             callbacks=[PMACallback()])
        batches, steps = record(trainer)
        count_steps(optimizer, steps)
        trainer.train()
    assert trainer.args.loss_type == ["sigmoid"]
    assert_parity(trainer, initial, batches, dpo_loss(0.1, copy.deepcopy(initial).eval()), steps)


@pytest.mark.parametrize("trainer_kind", ["sft", "dpo"])
def test_gradient_accumulation_with_pma_is_refused_before_any_step(tmp_path, trainer_kind):
    require_trl()
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
    model, tokenizer = load_model()
    initial = copy.deepcopy(model)
    settings = common_args(tmp_path, gradient_accumulation_steps=4, max_length=64)
    optimizer = AdamWPMA(model.parameters(), lr=LR, period=PERIOD)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4 with AdamWPMA\(period=4\)") as refused:
        if trainer_kind == "sft":  # optimizer built by the Trainer: refused when training begins
            trainer = SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=sft_dataset(),
                                 processing_class=tokenizer, callbacks=[PMACallback()],
                                 optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("adamw_pma", lr=LR, period=PERIOD))
            trainer.train()
        else:  # optimizer handed over: refused when the Trainer is built
            DPOTrainer(model=model, args=DPOConfig(**settings), train_dataset=dpo_dataset(),
                       processing_class=tokenizer, optimizers=(optimizer, None), callbacks=[PMACallback()])
    assert "gradient_accumulation_steps=1" in str(refused.value) and "period of 16 micro-batches" in str(refused.value)
    if trainer_kind == "sft":
        assert trainer.state.global_step == 0
        assert all(g["step"] == 0 for g in find_pma_optimizer(trainer.optimizer).param_groups)
    assert max_difference(model, initial) == 0.0  # no step was taken
