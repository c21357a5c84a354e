"""SPD (nnunet_acnorm.finetuning.spd) against an independent implementation of the paper's update
rule (a plain loop over the parameters in float64 NumPy, written here), hand-computed cases of the
rule, and nnU-Net master's PretrainedTrainer learning-rate curve (its two schedulers re-written
here); the registration of the SPD and recipe trainers (schedule variants, benchmark aliases)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_acnorm.finetuning import PretrainedTrainerLRScheduler, SelectiveProjectionDecay
from nnunet_acnorm.checkpoints.io import safe_torch_load


def _reference_spd(before: dict, grads: dict, after: dict, anchor: dict, lam: float) -> tuple[dict, int]:
    """Tian et al. 2024, Alg. "SPD" for one step, parameter by parameter (float64): ``c = -g.(w - w0)``;
    if ``c < 0``: ``r = clip((||w~ - w0|| - ||w - w0||) / ||w~ - w0||, 0, 1)``, ``w = w~ - lam r (w~ - w0)``.
    Returns the new values and how many parameters were pulled back."""
    out, pulled = {}, 0
    for name, w_tilde in after.items():
        if name not in grads:  # no gradient: the parameter was not stepped
            out[name] = w_tilde
            continue
        w, g, w0 = before[name], grads[name], anchor[name]
        c = -float(np.sum(g * (w - w0)))
        new = w_tilde
        if c < 0:
            gamma_new = float(np.sqrt(np.sum((w_tilde - w0) ** 2)))
            gamma_old = float(np.sqrt(np.sum((w - w0) ** 2)))
            r = 0.0 if gamma_new == 0 else min(max((gamma_new - gamma_old) / gamma_new, 0.0), 1.0)
            new = w_tilde - lam * r * (w_tilde - w0)
            pulled += r > 0
        out[name] = new
    return out, pulled


def _np_params(net: nn.Module) -> dict:
    return {n: p.detach().double().numpy().copy() for n, p in net.named_parameters()}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        # no bias before the InstanceNorm: its gradient is 0 up to rounding, and whether rounding noise
        # grew its distance to the anchor is not a question for the count comparison below
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.norm = nn.InstanceNorm2d(4, affine=True)
        self.unused = nn.Linear(3, 3)  # never in the graph: no gradient, never touched
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))))


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster than many on a loaded machine (and the same arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_spd_matches_an_independent_loop_over_sgd_nesterov_steps(lam, one_thread):
    torch.manual_seed(3)
    net = _Net()
    anchor = {n: p.detach().clone() for n, p in net.named_parameters()}
    reference_net = copy.deepcopy(net)
    plain_net = copy.deepcopy(net)
    make = lambda m: torch.optim.SGD(m.parameters(), 0.05, momentum=0.99, nesterov=True)  # noqa: E731
    opt, ref_opt, plain_opt = make(net), make(reference_net), make(plain_net)
    spd = SelectiveProjectionDecay(net, anchor, strength=lam)
    spd.attach(opt)
    anchor_np = {n: v.double().numpy() for n, v in anchor.items()}
    gen = torch.Generator().manual_seed(0)
    total_pulled = total_free = 0
    for step in range(25):
        x = torch.randn(4, 2, 6, 6, generator=gen)
        y = torch.randint(0, 3, (4, 6, 6), generator=gen)
        for model, optimizer in ((net, opt), (reference_net, ref_opt), (plain_net, plain_opt)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        before = _np_params(reference_net)
        grads = {n: p.grad.double().numpy().copy() for n, p in reference_net.named_parameters() if p.grad is not None}
        ref_opt.step()
        expected, pulled = _reference_spd(before, grads, _np_params(reference_net), anchor_np, lam)
        with torch.no_grad():  # the reference network continues from the reference's values
            for n, p in reference_net.named_parameters():
                p.copy_(torch.from_numpy(expected[n]).to(p.dtype))
        total_pulled += pulled
        total_free += len(grads) - pulled
        opt.step()
        plain_opt.step()
        for n, p in net.named_parameters():
            np.testing.assert_allclose(p.detach().double().numpy(), expected[n], rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step}, {n}")
    projected, seen = spd.take_counts()
    assert projected == total_pulled and seen == total_free + total_pulled
    # the run exercised both branches, and SPD changed the trajectory
    assert total_pulled > 0 and total_free > 0
    assert any(not torch.allclose(a, b) for a, b in zip(net.parameters(), plain_net.parameters()))
    assert torch.equal(net.unused.weight, anchor["unused.weight"])


def _hand_step(w_before: float, grad: float, w_after: float, lam: float = 1.0, w0: float = 0.0) -> float:
    """SPD around a hand-made step of a one-element parameter anchored at ``w0`` (the optimiser's step
    is the assignment ``w_before -> w_after``)."""
    holder = nn.Module()
    holder.w = nn.Parameter(torch.tensor([w0], dtype=torch.float64))
    spd = SelectiveProjectionDecay.from_network(holder, strength=lam)  # anchor w0
    with torch.no_grad():
        holder.w.fill_(w_before)
    holder.w.grad = torch.tensor([grad], dtype=torch.float64)
    spd.before_step()
    with torch.no_grad():
        holder.w.fill_(w_after)
    spd.after_step()
    return float(holder.w.detach())


def test_spd_rule_by_hand():
    # gradient along the displacement (c = -1 * 1 < 0): selected; the step grew the distance 1 -> 1.5,
    # r = 0.5 / 1.5: lambda = 1 projects back onto distance 1, lambda = 0.5 keeps half of the growth
    assert _hand_step(1.0, 1.0, 1.5) == pytest.approx(1.0)
    assert _hand_step(1.0, 1.0, 1.5, lam=0.5) == pytest.approx(1.25)
    assert _hand_step(1.0, 1.0, 1.5, lam=0.0) == pytest.approx(1.5)
    # not selected: the gradient points back toward the anchor (c > 0), the step moves freely
    assert _hand_step(1.0, -1.0, 1.5) == pytest.approx(1.5)
    # selected, but the step shrank the distance (r clipped to 0): nothing to pull
    assert _hand_step(1.0, 1.0, 0.6) == pytest.approx(0.6)
    # at the anchor c = 0 (not < 0): the first step from the pretrained weights is free
    assert _hand_step(0.0, 1.0, 0.7) == pytest.approx(0.7)
    # around a non-zero anchor, and through the anchor: distance 2 -> 3 (w~ - w0 = -3), r = 1/3
    assert _hand_step(2.0 + 2.0, 1.0, 2.0 - 3.0, w0=2.0) == pytest.approx(2.0 - 2.0)


def test_spd_state_round_trip_weights_only_and_bad_anchor(tmp_path):
    net = _Net()
    spd = SelectiveProjectionDecay.from_network(net, strength=0.7)
    torch.save({"spd": spd.state()}, tmp_path / "s.pth")
    state = safe_torch_load(tmp_path / "s.pth")["spd"]
    restored = SelectiveProjectionDecay.from_state(net, state)
    assert restored.strength == 0.7 and restored.anchored_names == spd.anchored_names
    assert all(torch.equal(restored.anchor[n], spd.anchor[n]) for n in spd.anchored_names)
    assert SelectiveProjectionDecay.from_state(net, state, strength=0.2).strength == 0.2
    with pytest.raises(ValueError, match="does not have"):
        SelectiveProjectionDecay(net, {"nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        SelectiveProjectionDecay(net, {"conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=">= 0"):
        SelectiveProjectionDecay(net, {}, strength=-1.0)


def test_spd_detach_stops_the_projection():
    torch.manual_seed(1)
    net = _Net()
    twin = copy.deepcopy(net)
    spd = SelectiveProjectionDecay.from_network(net)
    opt = torch.optim.SGD(net.parameters(), 0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), 0.1, momentum=0.9)
    spd.attach(opt)
    spd.detach()
    x, y = torch.randn(2, 2, 5, 5), torch.randint(0, 3, (2, 5, 5))
    for _ in range(5):
        for model, optimizer in ((net, opt), (twin, twin_opt)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))
    assert spd.take_counts() == (0, 0)


# -- nnU-Net master's PretrainedTrainer learning rate -------------------------------------------------
def _nnunet_master_lr(epoch: int, initial_lr: float, num_epochs: int, warmup: int) -> float:
    """Lin_incr_LRScheduler(max_lr, warmup) for epochs < warmup, then PolyLRScheduler_offset(initial_lr,
    num_epochs, warmup) (nnunetv2/training/lr_scheduler/warmup.py), both stepped with the epoch."""
    if epoch < warmup:
        return initial_lr / warmup * (1 + epoch)
    step = max(epoch - warmup, 0)
    return initial_lr * (1 - step / (num_epochs - warmup)) ** 0.9


@pytest.mark.parametrize("num_epochs,warmup", [(1000, 50), (150, 15), (5, 0), (1, 0)])
def test_pretrained_trainer_schedule_matches_nnunet_master(num_epochs, warmup):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], 1.0)
    scheduler = PretrainedTrainerLRScheduler(opt, 1e-3, num_epochs, warmup)
    for epoch in range(num_epochs):
        scheduler.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(_nnunet_master_lr(epoch, 1e-3, num_epochs, warmup),
                                                          rel=1e-12), epoch
    if warmup:
        assert scheduler.lr_at(warmup - 1) == scheduler.lr_at(warmup) == pytest.approx(1e-3)


# -- registration -----------------------------------------------------------------------------------------
def test_recipe_and_spd_trainers_are_registered_with_schedule_variants_and_aliases():
    from nnunet_acnorm.benchmark.methods import alias_table, resolve_method
    from nnunet_acnorm.nnunet import schedule_trainers  # noqa: F401 - derives the variants
    from nnunet_acnorm.nnunet.trainers import TRAINERS

    recipe = TRAINERS["nnUNetTrainerPretrainedRecipe"]
    assert (recipe.finetune_initial_lr, recipe.finetune_num_epochs, recipe.warmup_fraction) == (1e-3, 1000, 0.05)
    assert (recipe.pretrained_parts, recipe.recipe_batch_size, recipe.recipe_deep_supervision) == ("encoder", 2, False)
    assert recipe.finetune_oversample_foreground == 0.33
    scratch = TRAINERS["nnUNetTrainerPretrainedRecipe_fromScratch"]
    assert scratch.finetune_initial_lr == 1e-2 and scratch.from_scratch
    assert TRAINERS["nnUNetTrainerPretrainedRecipe_150epochs"].finetune_num_epochs == 150
    assert TRAINERS["nnUNetTrainerPretrainedRecipe_150epochs"].warmup_fraction == 0.1  # 15 epochs
    for name in ("nnUNetTrainerPretrainedRecipe", "nnUNetTrainerPretrainedRecipe_fromScratch",
                 "nnUNetTrainerPretrainedRecipeBN", "nnUNetTrainerSPD", "nnUNetTrainerSPDBN",
                 "nnUNetTrainerACNorm_SPD"):
        variant = TRAINERS[f"{name}_5epochs"]
        assert issubclass(variant, TRAINERS[name]) and variant.finetune_num_epochs == 5
    assert "nnUNetTrainerPretrainedRecipe_150epochs_5epochs" not in TRAINERS
    aliases = alias_table()
    assert aliases["spd"].trainer == "nnUNetTrainerSPD" and aliases["acnorm_spd"].pretrained
    assert aliases["nnunet_recipe"].trainer == "nnUNetTrainerPretrainedRecipe" and aliases["nnunet_recipe"].pretrained
    twin = aliases["nnunet_recipe_scratch"]
    assert twin.trainer == "nnUNetTrainerPretrainedRecipe_fromScratch" and not twin.pretrained
    assert not resolve_method("nnUNetTrainerPretrainedRecipeBN_fromScratch").pretrained
    assert resolve_method("nnunet_recipe", epochs=20).trainer == "nnUNetTrainerPretrainedRecipe_20epochs"
