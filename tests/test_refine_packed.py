"""Packed parameters and the per-column Adam: against torch's own Adam, field views, densification's
row gathering, and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from backend.gaussians.avatar import LocalGaussians
from backend.refine.config import LearningRates, RefineConfig
from backend.refine.packed import PackedFields, PackLayout, RowAdam, pack, unpack, unpacked_copy
from backend.refine.refine import learning_rates
from backend.wire.errors import InputError


def random_local(n: int, degree: int, rng: torch.Generator) -> LocalGaussians:
    k = (degree + 1) ** 2
    return LocalGaussians(
        torch.randn(n, 3, generator=rng),
        torch.randn(n, 4, generator=rng),
        torch.randn(n, 3, generator=rng),
        torch.randn(n, generator=rng),
        torch.randn(n, k, 3, generator=rng),
    )


@pytest.mark.parametrize("degree", [0, 1])
def test_unpack_gives_views_of_every_field_and_gradients_reach_their_columns(degree: int, rng: torch.Generator) -> None:
    local = random_local(7, degree, rng)
    layout = PackLayout.of(local)
    packed = pack(local).requires_grad_(True)
    assert packed.shape == (7, layout.width) and layout.width == 11 + 3 * (degree + 1) ** 2
    views = unpack(packed, layout)
    for name, t in local.tensors().items():
        assert torch.equal(views.tensors()[name], t), name
        assert views.tensors()[name].data_ptr() >= packed.data_ptr()  # a view, not a copy
    weights = {name: torch.randn(t.shape, generator=rng) for name, t in local.tensors().items()}
    sum((views.tensors()[name] * w).sum() for name, w in weights.items()).backward()  # type: ignore[union-attr]
    for name, w in weights.items():
        assert torch.equal(packed.grad[:, layout.columns(name)], w.reshape(7, -1)), name
    snapshot = unpacked_copy(packed, layout)
    with torch.no_grad():
        packed.add_(1.0)
    assert torch.equal(snapshot.offset, local.offset) and snapshot.offset.is_contiguous()


def test_row_adam_matches_torch_adam_with_one_group_per_column_range(rng: torch.Generator) -> None:
    local = random_local(50, 1, rng)
    layout = PackLayout.of(local)
    reference = local.map(lambda t: t.clone().requires_grad_(True))
    rates = {"offset": 1e-2, "rotation": 3e-3, "log_scale": 5e-2, "opacity_logit": 0.1, "sh": 2e-3}
    torch_adam = torch.optim.Adam([{"params": [reference.tensors()[k]], "lr": r} for k, r in rates.items()], eps=1e-15)
    packed = pack(local).requires_grad_(True)
    ours = RowAdam(packed)
    for step in range(6):
        decay = 0.8**step  # rates that change from step to step, as the schedule's do
        lr = torch.empty(layout.width)
        for group, (name, rate) in zip(torch_adam.param_groups, rates.items()):
            group["lr"] = rate * decay
            lr[layout.columns(name)] = rate * decay
        grads = {name: torch.randn(t.shape, generator=rng) * (step + 1) for name, t in local.tensors().items()}
        for name, t in reference.tensors().items():
            t.grad = grads[name].clone()
        packed.grad = pack(LocalGaussians(**grads))
        torch_adam.step()
        ours.step(lr)
    # float32 rounding differs by a few 1e-6; a wrong update is off by about a learning rate.
    for name, t in unpack(packed.detach(), layout).tensors().items():
        torch.testing.assert_close(t, reference.tensors()[name].detach(), rtol=1e-5, atol=1e-5, msg=name)
    assert float(ours.steps) == 6


def test_gathered_rows_continue_their_moments_and_fresh_rows_start_at_zero(rng: torch.Generator) -> None:
    packed = torch.randn(5, 14, generator=rng, requires_grad=True)
    opt = RowAdam(packed)
    packed.grad = torch.randn(5, 14, generator=rng)
    opt.step(torch.full((14,), 1e-2))
    rows, fresh = torch.tensor([4, 0, 0, 2]), torch.tensor([False, False, True, False])
    grown = packed.detach()[rows].requires_grad_(True)
    out = opt.gathered(grown, rows, fresh)
    assert torch.equal(out.exp_avg[[0, 1, 3]], opt.exp_avg[[4, 0, 2]]) and torch.equal(out.exp_avg_sq[[0, 1, 3]], opt.exp_avg_sq[[4, 0, 2]])
    assert not out.exp_avg[2].any() and not out.exp_avg_sq[2].any()
    assert out.param is grown and float(out.steps) == 1
    out.zero_moments(slice(10, 11))
    assert not out.exp_avg[:, 10].any() and out.exp_avg[[0, 1, 3], 9].ne(0).all()


def test_a_state_from_another_layout_is_refused() -> None:
    opt = RowAdam(torch.zeros(4, 14, requires_grad=True))
    with pytest.raises(InputError, match="does not match"):
        opt.load_state_dict(RowAdam(torch.zeros(4, 17, requires_grad=True)).state_dict())


def test_learning_rates_decay_per_column_from_their_base_rate() -> None:
    lr = LearningRates(offset=2e-3, offset_final=2e-5, rotation=1e-3, log_scale=5e-3, opacity_logit=2.5e-2, sh_dc=2.5e-3, sh_rest=1e-4, final_factor=0.5)
    layout = PackLayout(sh_coeffs=4)
    table = learning_rates(RefineConfig(iterations=100, lr=lr), layout)
    assert table.shape == (100, layout.width)
    first, last = table[0], table[-1]
    assert torch.allclose(first[layout.columns("offset")], torch.tensor(2e-3))
    assert torch.allclose(first[layout.columns("sh")][:3], torch.tensor(2.5e-3)) and torch.allclose(first[layout.columns("sh")][3:], torch.tensor(1e-4))
    # Step t of T is t/T of the way along the exponential decay.
    assert last[0].item() == pytest.approx(2e-3 * math.exp(0.99 * math.log(1e-2)), rel=1e-5)
    assert last[layout.columns("opacity_logit")].item() == pytest.approx(2.5e-2 * 0.5**0.99, rel=1e-5)


def test_small_parameters_step_as_torch_adam_with_a_rate_per_field(rng: torch.Generator) -> None:
    fields = {"expr": torch.randn(6, 5, generator=rng), "translation": torch.randn(6, 3, generator=rng)}
    rate = {"expr": 1e-2, "translation": 3e-4}
    tuned = PackedFields.of(fields, rate)
    reference = {k: v.clone().requires_grad_(True) for k, v in fields.items()}
    adam = torch.optim.Adam([{"params": [reference[k]], "lr": rate[k]} for k in fields])
    for _ in range(5):
        grads = {k: torch.randn(v.shape, generator=rng) for k, v in fields.items()}
        tuned.optimizer.zero_grad()
        sum((v * grads[k]).sum() for k, v in tuned.fields().items()).backward()
        tuned.step()
        adam.zero_grad()
        sum((v * grads[k]).sum() for k, v in reference.items()).backward()
        adam.step()
    for k, v in tuned.fields().items():
        # float32 bias corrections against torch's float64 ones: ~1e-7 apart after steps of ~rate.
        torch.testing.assert_close(v.detach(), reference[k].detach(), atol=2e-6, rtol=0)
        assert not torch.equal(v.detach(), fields[k])
