"""Every bad hyper-parameter or tensor is refused with an error that names the bad value."""
import pytest
import torch

from pma_dist import AdamWPMA, LionPMA


def param():
    return torch.zeros(3, requires_grad=True)


BAD_COMMON = [
    (dict(lr=-1e-3), ValueError, "lr=-0.001"),
    (dict(lr=float("nan")), ValueError, "lr=nan"),
    (dict(lr="fast"), TypeError, "'fast'"),
    (dict(betas=(1.0, 0.9)), ValueError, "beta1: 1.0"),
    (dict(betas=(0.9, -0.1)), ValueError, "beta2: -0.1"),
    (dict(betas=(0.9,)), ValueError, "(0.9,)"),
    (dict(betas=(0.9, True)), ValueError, "beta2: True"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay: -0.1"),
    (dict(period=0), ValueError, "period: 0"),
    (dict(period=-3), ValueError, "period: -3"),
    (dict(period=2.5), TypeError, "period: 2.5"),
    (dict(period=8.0), TypeError, "period: 8.0"),
    (dict(period=True), TypeError, "period: True"),
    (dict(period="8"), TypeError, "period: '8'"),
]
BAD_ADAMW_ONLY = [
    (dict(eps=0.0), ValueError, "eps: 0.0"),
    (dict(eps=-1e-8), ValueError, "eps: -1e-08"),
    (dict(variant="papers"), ValueError, "'papers'"),
    (dict(variant=None), ValueError, "None"),
]


@pytest.mark.parametrize("kwargs, error, fragment", BAD_COMMON + BAD_ADAMW_ONLY)
def test_adamw_pma_rejects(kwargs, error, fragment):
    with pytest.raises(error) as info:
        AdamWPMA([param()], **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("kwargs, error, fragment", BAD_COMMON)
def test_lion_pma_rejects(kwargs, error, fragment):
    with pytest.raises(error) as info:
        LionPMA([param()], **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("cls", [AdamWPMA, LionPMA])
def test_bad_value_in_a_param_group_is_refused(cls):
    with pytest.raises(ValueError, match="period: 0"):
        cls([dict(params=[param()]), dict(params=[param()], period=0)])
    opt = cls([param()])
    with pytest.raises(ValueError, match=r"lr=-1"):
        opt.add_param_group(dict(params=[param()], lr=-1))
    assert len(opt.param_groups) == 1  # the refused group was not kept


@pytest.mark.parametrize("cls", [AdamWPMA, LionPMA])
def test_complex_parameters_are_refused(cls):
    with pytest.raises(TypeError, match=r"complex.*torch.complex64.*\(2,\)"):
        cls([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])


@pytest.mark.parametrize("cls", [AdamWPMA, LionPMA])
def test_sparse_gradients_are_refused_at_the_first_step(cls):
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = cls(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"sparse gradients.*shape \(10, 4\)"):
        opt.step()
    assert opt.param_groups[0]["step"] == 0  # nothing was counted


def test_valid_edge_values_are_accepted():
    AdamWPMA([param()], lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, period=1, variant="paper")
    LionPMA([param()], lr=0.0, betas=[0.0, 0.999], period=1)
