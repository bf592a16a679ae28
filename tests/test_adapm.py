"""AdaPM: block policies, low-rank momentum, residual correction, memory accounting, validation."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from pma_dist.adapm import AdaPM
from pma_dist.adapm import lowrank
from pma_dist.adapm.policy import check_overrides, plan_param
from pma_dist.optim import AdamWPMA

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- helpers
def deep_linear(seed=0, dims=(12, 10, 8, 6), dtype=torch.float64):
    """Well-conditioned deep linear net (no biases) and a fixed regression batch stream."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:])]
    model = torch.nn.Sequential(*layers).to(dtype)
    batches = [(torch.randn(16, dims[0], dtype=dtype), torch.randn(16, dims[-1], dtype=dtype)) for _ in range(12)]
    return model, batches


def train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


HYPER = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1)


# ---------------------------------------------------------------------------------------------- equivalences
def test_full_momentum_policy_is_torch_adamw():
    model, batches = deep_linear()
    ref = copy.deepcopy(model)
    got = train(model, AdaPM(model.named_parameters(), **HYPER, update_clip=None,
                             policy_overrides={".": "full"}), batches)
    want = train(ref, torch.optim.AdamW(ref.parameters(), **HYPER), batches)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_full_momentum_with_period_is_adamw_pma(variant):
    """PMA composition reads the same schedule as AdamW-PMA: with full momentum they coincide."""
    model, batches = deep_linear(seed=1)
    ref = copy.deepcopy(model)
    got = train(model, AdaPM(model.named_parameters(), **HYPER, update_clip=None, period=4, variant=variant,
                             policy_overrides={".": "full"}), batches)
    want = train(ref, AdamWPMA(ref.parameters(), **HYPER, period=4, variant=variant), batches)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("period", [1, 3])
def test_lowrank_at_full_rank_is_full_momentum(period):
    """rank = min(m, n): the factors carry the momentum exactly, the residual vanishes.

    Constant width and batch > width keep every gradient full-rank: warm-started descent cannot grow
    a factor direction that is exactly zero (it only reappears at the next SVD refit)."""
    model, batches = deep_linear(seed=2, dims=(8, 8, 8, 8))
    ref = copy.deepcopy(model)
    # update_interval > steps: only step 1 is an SVD fit, the rest is warm-started descent
    low = AdaPM(model.named_parameters(), **HYPER, rank_ratio=1.0, update_interval=1000, inner_steps=2,
                period=period, policy_overrides={".": "lowrank"})
    full = AdaPM(ref.named_parameters(), **HYPER, period=period, policy_overrides={".": "full"})
    got, want = train(model, low, batches), train(ref, full, batches)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for p, q in zip(model.parameters(), ref.parameters()):
        s = low.state[p]
        assert s["exp_avg_L"].shape[1] == min(p.shape)
        torch.testing.assert_close(s["exp_avg_L"] @ s["exp_avg_R"], full.state[q]["exp_avg"], rtol=1e-9, atol=1e-11)


def test_lowrank_below_full_rank_differs_from_full_momentum():
    model, batches = deep_linear(seed=2)
    ref = copy.deepcopy(model)
    got = train(model, AdaPM(model.named_parameters(), **HYPER, rank_ratio=0.2, policy_overrides={".": "lowrank"}),
                batches)
    want = train(ref, AdaPM(ref.named_parameters(), **HYPER, policy_overrides={".": "full"}), batches)
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) > 1e-4


# ---------------------------------------------------------------------------------------------- residual correction
def test_residual_correction_hand_checked():
    """beta1 = 0.5, L R = [[2,0],[0,0]], g = [[0,0],[0,4]]:
    m = 0.5 L R + 0.5 g = diag(1, 2); best rank-1 fit L'R' = diag(0, 2);
    r = L'R' - m = diag(-1, 0) (eq. 3); m_c = m - r / (1 - 0.5) = diag(3, 2) (eq. 4)."""
    L = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    R = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    g = torch.tensor([[0.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    corrected, residual = lowrank.debiased_lowrank_momentum(
        g, L, R, beta1=0.5, decay=0.5, grad_weight=1.0, refit=True, inner_steps=0, solver="scaled_gd")
    torch.testing.assert_close(L @ R, torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(residual, torch.tensor([[-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(corrected, torch.tensor([[3.0, 0.0], [0.0, 2.0]], dtype=torch.float64))


def test_optimizer_step_applies_corrected_momentum_hand_checked():
    """Two AdaPM steps on one 2x2 low-rank block, every quantity computed by hand.

    beta1 = 0.5, beta2 = 0.5, lr = 1, eps = 1e-8 (negligible), no decay, no clip, rank 1, refit each step.
    Step 1: g = diag(0, 4): m = diag(0, 2) is rank 1, r = 0, u = m / (1 - .5) = diag(0, 4);
            v = diag(0, 8), v / (1 - .5) = diag(0, 16); step = diag(0, 4 / 4) -> W = W0 - diag(0, 1).
    Step 2: g = diag(4, 0): m = .5 diag(0, 2) + .5 diag(4, 0) = diag(2, 1); fit diag(2, 0);
            r = diag(0, -1); m_c = diag(2, 1) + 2 diag(0, 1) = diag(2, 3); u = m_c / .75 = diag(8/3, 4);
            v = .5 diag(0, 8) + .5 diag(16, 0) = diag(8, 4); v / .75 = diag(32/3, 16/3);
            step = (8/3) / sqrt(32/3) and 4 / sqrt(16/3).
    """
    w = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = AdaPM([("mlp.fc1.weight", w)], lr=1.0, betas=(0.5, 0.5), eps=1e-8, weight_decay=0.0, rank_ratio=0.5,
                update_interval=1, update_clip=None)
    assert opt.plan(w).segments[0].kind == "lowrank" and opt.plan(w).segments[0].rank == 1
    w.grad = torch.diag(torch.tensor([0.0, 4.0], dtype=torch.float64))
    opt.step()
    torch.testing.assert_close(w.detach(), torch.diag(torch.tensor([0.0, -1.0], dtype=torch.float64)), atol=1e-7,
                               rtol=0)
    w.grad = torch.diag(torch.tensor([4.0, 0.0], dtype=torch.float64))
    opt.step()
    s1 = (8 / 3) / (32 / 3) ** 0.5
    s2 = 4 / (16 / 3) ** 0.5
    torch.testing.assert_close(w.detach(), torch.diag(torch.tensor([-s1, -1.0 - s2], dtype=torch.float64)),
                               atol=1e-7, rtol=0)


@pytest.mark.parametrize("solver", ["scaled_gd", "gd"])
def test_warm_started_descent_tracks_best_low_rank_fit(solver):
    """From a perturbed warm start, descent approaches the SVD optimum of ||L R - m||."""
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    S = torch.tensor([10.0, 8.0, 6.0] + [0.1] * 27, dtype=torch.float64)
    m = U[:, :30] * S @ V.T
    best = torch.linalg.norm(m - (U[:, :3] * S[:3]) @ V[:, :3].T)
    L = torch.empty(40, 3, dtype=torch.float64)
    R = torch.empty(3, 30, dtype=torch.float64)
    lowrank.fit_factors(m, L, R, seed=7)  # rank 3 of 30: the randomized range finder
    assert torch.linalg.norm(L @ R - m).item() <= best.item() * (1 + 1e-9)
    L.add_(0.3 * torch.randn_like(L))
    R.add_(0.3 * torch.randn_like(R))
    errors = [torch.linalg.norm(L @ R - m).item()]
    for _ in range(10):
        lowrank.refine_factors(m, L, R, 1, solver)
        errors.append(torch.linalg.norm(L @ R - m).item())
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))  # descent never increases the error
    tolerance = 1e-6 if solver == "scaled_gd" else 5e-2
    assert errors[-1] <= best.item() * (1 + tolerance), (errors, best.item())
    assert errors[0] > best.item() * 1.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_refit_of_rank_deficient_and_zero_momentum(dtype):
    """The Gram QR drops null directions: a rank-2 momentum (below the range finder's k = 11) is fitted
    exactly by rank 3, a zero one gives zero factors (a plain Cholesky factor exists for neither)."""
    torch.manual_seed(0)
    m = torch.randn(40, 2, dtype=dtype) @ torch.randn(2, 30, dtype=dtype)
    L, R = torch.empty(40, 3, dtype=dtype), torch.empty(3, 30, dtype=dtype)
    lowrank.fit_factors(m, L, R, seed=3)
    # rounding only: a few products of 40-long sums, ~1e2 u relative
    tolerance = 1e2 * torch.finfo(dtype).eps
    assert torch.linalg.norm(L @ R - m) <= tolerance * torch.linalg.norm(m)
    lowrank.fit_factors(torch.zeros_like(m), L, R, seed=3)
    assert torch.equal(L, torch.zeros_like(L)) and torch.equal(R, torch.zeros_like(R))
    w = torch.nn.Parameter(torch.ones(40, 30, dtype=dtype))
    opt = AdaPM([("mlp.fc1.weight", w)], lr=0.1, rank_ratio=0.1)
    w.grad = torch.zeros_like(w)
    opt.step()  # a zero gradient on a low-rank block: weight decay only, no nan
    torch.testing.assert_close(w.detach(), torch.full_like(w, 1 - 0.1 * 1e-2))


def test_without_residual_correction_the_momentum_is_the_factors():
    """The ablation: the update direction is L R / bc1, checked against the stored factors."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))
    opt = AdaPM([("mlp.fc1.weight", w)], lr=1.0, betas=(0.5, 0.5), eps=1e-8, weight_decay=0.0, rank_ratio=0.4,
                update_clip=None, residual_correction=False)
    w.grad = torch.randn(6, 5, dtype=torch.float64)
    opt.step()
    s = opt.state[w]
    v_hat = s["exp_avg_sq"] / 0.5
    expected = -(s["exp_avg_L"] @ s["exp_avg_R"] / 0.5) / (v_hat.sqrt() + 1e-8)
    torch.testing.assert_close(w.detach(), expected)


def test_update_clip_bounds_every_element():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(8, 8))
    opt = AdaPM([("mlp.c_fc.weight", w)], lr=1.0, betas=(0.9, 0.999), weight_decay=0.0, update_clip=0.25)
    w.grad = torch.randn(8, 8) * 100
    opt.step()
    assert w.detach().abs().max().item() == pytest.approx(0.25)


def test_resume_is_bit_exact():
    model, batches = deep_linear(seed=3)
    kwargs = dict(**HYPER, rank_ratio=0.3, update_interval=4, mini=True,
                  policy_overrides={r"^0\.": "none", r"^1\.": "lowrank", r"^2\.": "full"})
    straight = copy.deepcopy(model)
    want = train(straight, AdaPM(straight.named_parameters(), **kwargs), batches)

    opt = AdaPM(model.named_parameters(), **kwargs)
    train(model, opt, batches[:5])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_model)
    opt2 = AdaPM(resumed.named_parameters(), **kwargs)
    opt2.load_state_dict(saved_opt)
    got = train(resumed, opt2, batches[5:])
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- policies
def _kinds(model, **kw):
    opt = AdaPM(model.named_parameters(), **kw)
    return {r["name"]: r["policy"] for r in opt.memory_report()}


def test_gpt2_policy_splits_fused_qkv():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16))
    kinds = _kinds(model)
    assert kinds["transformer.wte.weight"] == "embedding:none"
    assert kinds["transformer.wpe.weight"] == "embedding:none"
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "query:lowrank(r=2)+key:lowrank(r=2)+value:full"
    assert kinds["transformer.h.0.attn.c_proj.weight"] == "attn_out:none"
    assert kinds["transformer.h.0.mlp.c_fc.weight"] == "mlp:lowrank(r=2)"
    assert kinds["transformer.h.0.mlp.c_proj.weight"] == "mlp:lowrank(r=2)"
    assert kinds["transformer.h.0.ln_1.weight"] == "other:full"
    # HF GPT-2's Conv1D stores (in, out): the split is along axis 1
    plan = AdaPM(model.named_parameters()).plan(model.transformer.h[0].attn.c_attn.weight)
    assert [(s.out_axis, s.start, s.length) for s in plan.segments] == [(1, 0, 32), (1, 32, 32), (1, 64, 32)]


def test_llama_qwen_phi_policies():
    from transformers import (LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, PhiConfig,
                              PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    expected = {
        "self_attn.q_proj.weight": "query:lowrank", "self_attn.k_proj.weight": "key:lowrank",
        "self_attn.v_proj.weight": "value:full", "self_attn.o_proj.weight": "attn_out:none",
        "mlp.gate_proj.weight": "mlp:lowrank", "mlp.up_proj.weight": "mlp:lowrank",
        "mlp.down_proj.weight": "mlp:lowrank", "embed_tokens.weight": "embedding:none",
        "lm_head.weight": "embedding:none", "input_layernorm.weight": "other:full",
        "self_attn.q_proj.bias": "other:full",
    }
    for cls, cfg in ((LlamaForCausalLM, LlamaConfig(**small, num_key_value_heads=2)),
                     (Qwen2ForCausalLM, Qwen2Config(**small, num_key_value_heads=2))):
        kinds = _kinds(cls(cfg))
        for name, kind in kinds.items():
            for suffix, want in expected.items():
                if name.endswith(suffix):
                    assert kind.split("(")[0] == want, (cls.__name__, name, kind)
        assert sum("lowrank" in k for k in kinds.values()) == 5
    phi = _kinds(PhiForCausalLM(PhiConfig(**small)))
    assert phi["model.layers.0.self_attn.dense.weight"] == "attn_out:none"
    assert phi["model.layers.0.mlp.fc1.weight"].startswith("mlp:lowrank")
    assert phi["model.layers.0.self_attn.v_proj.weight"] == "value:full"
    phi3 = _kinds(Phi3ForCausalLM(Phi3Config(**small, num_key_value_heads=4, pad_token_id=0)))
    assert phi3["model.layers.0.self_attn.qkv_proj.weight"] == "query:lowrank(r=2)+key:lowrank(r=2)+value:full"
    assert phi3["model.layers.0.mlp.gate_up_proj.weight"].startswith("mlp:lowrank")
    assert phi3["model.layers.0.self_attn.o_proj.weight"] == "attn_out:none"


def test_overrides_win_and_gqa_sizes():
    overridden = plan_param("h.0.attn.c_attn.weight", (8, 24), rank_ratio=0.5,
                            overrides=check_overrides({r"attn\.c_attn": "full", "mlp": "none"}))
    assert [s.kind for s in overridden.segments] == ["full"]
    gqa = plan_param("layers.0.self_attn.qkv_proj.weight", (16 + 4 + 4, 16), rank_ratio=0.25, qkv_sizes=(16, 4, 4))
    assert [(s.role, s.kind, s.out_axis, s.start, s.length, s.rank) for s in gqa.segments] == [
        ("query", "lowrank", 0, 0, 16, 4), ("key", "lowrank", 0, 16, 4, 1), ("value", "full", 0, 20, 4, 0)]


def test_mini_shares_keys_per_kv_head():
    """Grouped-query attention: 8 query heads, 4 key-value heads of 8 dims each."""
    q = torch.nn.Parameter(torch.zeros(64, 64))
    k = torch.nn.Parameter(torch.zeros(32, 64))
    opt = AdaPM([("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", k)], mini=True, num_heads=8,
                num_kv_heads=4)
    assert opt.plan(q).segments[0].heads == 8 and opt.plan(k).segments[0].heads == 4
    q.grad = torch.ones(64, 64)
    k.grad = torch.arange(32.0)[:, None].repeat(1, 64)  # row i has gradient i
    opt.step()
    assert opt.state[k]["exp_avg_sq"].shape == (4,)
    rows = torch.arange(32.0).reshape(4, 8)
    torch.testing.assert_close(opt.state[k]["exp_avg_sq"], 0.001 * (rows ** 2).mean(dim=1))


def test_unnamed_parameters_warn_and_use_full_momentum():
    w = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.warns(UserWarning, match="without names"):
        opt = AdaPM([w])
    assert opt.plan(w).segments[0].kind == "full"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = AdaPM([w], param_names={w: "mlp.fc1.weight"})
    assert opt.plan(w).segments[0].kind == "lowrank"


# ---------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("mini", [False, True])
def test_memory_accounting_equals_real_tensor_sizes(mini):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    d, layers = 64, 2
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d, n_head=4, vocab_size=100, n_positions=32))
    opt = AdaPM(model.named_parameters(), rank_ratio=0.05, mini=mini, num_heads=4)
    x = torch.randint(0, 100, (2, 16))
    model(x, labels=x).loss.backward()
    opt.step()
    report = {r["name"]: r for r in opt.memory_report()}
    real = opt.state_bytes()
    assert set(real) == set(report)
    for name, row in report.items():
        assert real[name] == row["momentum_bytes"] + row["second_moment_bytes"], name
    # one transformer block by hand: rank = ceil(0.05 * 64) = 4, fp32
    r, f = 4, 4
    c_attn = report["transformer.h.0.attn.c_attn.weight"]
    assert c_attn["momentum_bytes"] == f * (2 * (d * r + r * d) + d * d)  # q, k low-rank; v full
    assert c_attn["second_moment_bytes"] == (f * (4 + 4 + d) if mini else f * d * 3 * d)  # q, k per head, v per row
    c_fc = report["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc["momentum_bytes"] == f * (d * r + r * 4 * d)
    assert c_fc["second_moment_bytes"] == (f * d if mini else f * d * 4 * d)  # mini: per row of (in, out)
    assert report["transformer.h.0.attn.c_proj.weight"]["momentum_bytes"] == 0
    assert report["transformer.wte.weight"]["second_moment_bytes"] == f * 100 * d  # Adam-mini keeps it per entry
    momentum = sum(row["momentum_bytes"] for row in report.values())
    adamw = sum(row["adamw_momentum_bytes"] for row in report.values())
    assert momentum / adamw < 0.25


# ---------------------------------------------------------------------------------------------- bad input
W = torch.nn.Parameter(torch.zeros(6, 6))


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank_ratio=0.0), r"rank_ratio: 0\.0"),
    (dict(rank_ratio=1.5), r"rank_ratio: 1\.5"),
    (dict(update_interval=0), r"update_interval: 0"),
    (dict(update_interval=2.5), r"update_interval: 2\.5"),
    (dict(inner_steps=-1), r"inner_steps: -1"),
    (dict(solver="adam"), r"solver: 'adam'"),
    (dict(update_clip=0.0), r"update_clip: 0\.0"),
    (dict(update_clip=-1), r"update_clip: -1"),
    (dict(mini="yes"), r"mini: 'yes'"),
    (dict(residual_correction=1), r"residual_correction: 1"),
    (dict(num_heads=0), r"num_heads: 0"),
    (dict(num_kv_heads=-2), r"num_kv_heads: -2"),
    (dict(qkv_sizes=(4, 4)), r"qkv_sizes: \(4, 4\)"),
    (dict(policy_overrides={"mlp": "half"}), r"policy_overrides\['mlp'\] = 'half'"),
    (dict(policy_overrides={"(": "full"}), r"pattern '\('"),
    (dict(policy_overrides=["mlp"]), r"policy_overrides: \['mlp'\]"),
    (dict(lr=-1.0), r"lr=-1\.0"),
    (dict(betas=(0.9, 1.0)), r"beta2: 1\.0"),
    (dict(eps=0.0), r"eps: 0\.0"),
    (dict(weight_decay=-0.1), r"weight_decay: -0\.1"),
    (dict(period=0), r"period: 0"),
    (dict(variant="mine"), r"variant: 'mine'"),
    (dict(param_names=["w"]), r"param_names: list"),
])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AdaPM([("mlp.fc1.weight", W)], **kwargs)


def test_bad_structure_is_named():
    with pytest.raises(ValueError, match=r"'lowrank' momentum on parameter 'ln\.weight' of shape \(6,\)"):
        AdaPM([("ln.weight", torch.nn.Parameter(torch.zeros(6)))], policy_overrides={"ln": "lowrank"})
    with pytest.raises(ValueError, match=r"fused parameter 'attn\.c_attn\.weight' of shape \(6, 10\)"):
        AdaPM([("attn.c_attn.weight", torch.nn.Parameter(torch.zeros(6, 10)))])
    with pytest.raises(ValueError, match=r"qkv_sizes=\(4, 4, 4\) \(sum 12\) matches no axis"):
        AdaPM([("attn.c_attn.weight", torch.nn.Parameter(torch.zeros(6, 18)))], qkv_sizes=(4, 4, 4))
    with pytest.raises(ValueError, match=r"4 heads do not divide the query block of 'q_proj\.weight' \(6"):
        AdaPM([("q_proj.weight", W)], mini=True, num_heads=4)


def test_flat_partition_is_refused_at_step():
    """What ZeRO-1/2/3 do: swap the group's parameters for a flat 1-D partition."""
    w = torch.nn.Parameter(torch.zeros(6, 6))
    opt = AdaPM([("mlp.fc1.weight", w)])
    flat = torch.nn.Parameter(torch.zeros(36))
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.ones(36)
    with pytest.raises(RuntimeError, match=r"shape \(36,\).*ZeRO stages 1-3"):
        opt.step()


def test_checkpoint_of_another_structure_is_refused():
    model, batches = deep_linear(seed=4)
    opt = AdaPM(model.named_parameters(), rank_ratio=0.3, policy_overrides={".": "lowrank"})
    train(model, opt, batches[:2])
    other = AdaPM(model.named_parameters(), rank_ratio=0.5, policy_overrides={".": "lowrank"})
    with pytest.raises(ValueError, match=r"does not fit parameter '0\.weight'.*another rank_ratio"):
        other.load_state_dict(opt.state_dict())
    assert not other.state  # nothing was loaded


def test_bf16_parameters_keep_fp32_state():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16, bias=False).to(torch.bfloat16)
    before = layer.weight.detach().clone()
    opt = AdaPM([("mlp.fc1.weight", layer.weight)], lr=1e-2, rank_ratio=0.25)
    layer.weight.grad = torch.randn(16, 16).to(torch.bfloat16)
    opt.step()
    assert {t.dtype for k, t in opt.state[layer.weight].items() if k != "step"} == {torch.float32}
    assert layer.weight.dtype == torch.bfloat16 and not torch.equal(layer.weight, before)


def test_deepspeed_engine_check_names_the_stage():
    class Engine:
        def __init__(self, stage, bf16=False):
            self.stage, self.bf16 = stage, bf16

        def zero_optimization_stage(self):
            return self.stage

        def bfloat16_enabled(self):
            return self.bf16

        def fp16_enabled(self):
            return False

    opt = AdaPM([("mlp.fc1.weight", W)])
    opt.check_deepspeed_engine(Engine(0))
    for stage in (1, 2, 3):
        with pytest.raises(ValueError, match=f"ZeRO stage {stage}: ZeRO-1/2/3 give the optimizer flat 1-D"):
            opt.check_deepspeed_engine(Engine(stage))
    with pytest.raises(ValueError, match="bf16 optimizer wrapper"):
        opt.check_deepspeed_engine(Engine(0, bf16=True))


def test_benchmark_rejects_unknown_task(capsys):
    from tests.launching import load_script

    bench = load_script("benchmarks/adapm.py")
    with pytest.raises(SystemExit):
        bench.main(["--out", "/tmp/unused", "--tasks", "pretrain,finetune"])
    assert "unknown task(s) ['finetune']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--out", "/tmp/unused", "--sft-steps", "0"])
    assert "--sft-steps must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--out", "/tmp/unused", "--runs", "adamw:0.002,sgd:0.1"])
    assert "unknown optimizer(s) ['sgd']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--out", "/tmp/unused", "--runs", "adamw=0.002"])
    assert "--runs='adamw=0.002': expected optimizer:lr pairs" in capsys.readouterr().err
