"""The fused MLP step (vae.fused) against autograd: the same loss terms and the same gradient for every parameter,
for each likelihood, with free bits, a capacity and the logvar clamp; Adam without its wrapper gives the very same
weights as Optimizer.step; and a Trainer on the fused step follows the autograd one."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import gen, tiny_model
from vae.fused import EXP_FLOOR, AdamStep, FusedStep, unsupported_reason
from vae.losses import elbo_terms
from vae.trainer import make_optimizer


def _autograd(model, x, seed, **kw):
    model.zero_grad(set_to_none=True)
    terms = elbo_terms(model, x, generator=gen(seed), **kw)
    terms.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return torch.stack([terms.loss, terms.recon, terms.kl]).detach(), grads


def _fused(model, x, seed, **kw):
    model.zero_grad(set_to_none=True)
    vals = FusedStep(model).forward_backward(x, generator=gen(seed), **kw)
    return vals, {n: p.grad.clone() for n, p in model.named_parameters()}


def _data(model, n=24, seed=1):
    x = torch.rand(n, model.config.input_dim, generator=gen(seed), dtype=torch.float64)
    if model.config.likelihood == "bernoulli":
        x = (x > 0.5).to(torch.float64) * 0.9 + 0.05  # grey levels, not only 0/1
    return x


CASES = [
    dict(likelihood="bernoulli", hidden=(32,)),
    dict(likelihood="bernoulli", hidden=(32, 16)),
    dict(likelihood="gaussian", hidden=(16, 8), sigma=0.3),
    dict(likelihood="gaussian-learned", hidden=(16,)),
]
OBJECTIVES = [
    dict(beta=1.0),
    dict(beta=4.0),
    dict(beta=0.5, free_bits=0.4),  # some dimensions held at the floor, some above it (see _spread_posteriors)
    dict(beta=2.0, capacity=1.0),  # R > C
    dict(beta=2.0, capacity=50.0),  # R < C: the KL gradient changes sign
    dict(beta=3.0, free_bits=0.4, capacity=0.5),
]


def _spread_posteriors(model):
    """Posterior means of 0, 1, 2, ... on the latent dimensions: per-dimension KLs from ~0 to ~2 nats, so a free-bits
    floor of 0.4 holds some dimensions and not others, and the total KL is above 1 nat and below 50."""
    with torch.no_grad():
        model.enc_out.bias[:model.config.latent_dim] = torch.arange(model.config.latent_dim, dtype=torch.float64)


@pytest.mark.parametrize("model_kw", CASES, ids=lambda c: f"{c['likelihood']}-{len(c['hidden'])}")
@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_terms_and_gradients_match_autograd(model_kw, objective):
    model = tiny_model(seed=2, **model_kw).double()
    _spread_posteriors(model)
    x = _data(model)
    kl_per_dim = elbo_terms(model, x, generator=gen(5)).kl_per_dim
    if objective.get("free_bits"):
        held = kl_per_dim < objective["free_bits"]
        assert held.any() and not held.all()  # both sides of the floor are exercised
    if objective.get("capacity"):
        assert (kl_per_dim.sum() > objective["capacity"]) == (objective["capacity"] < 10)
    want_vals, want = _autograd(model, x, seed=5, **objective)
    got_vals, got = _fused(model, x, seed=5, **objective)  # the same seed: the same reparameterisation noise
    torch.testing.assert_close(got_vals, want_vals, rtol=1e-10, atol=1e-10)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_free_bits_floor_stops_the_kl_gradient_of_the_held_dimensions():
    model = tiny_model(seed=0, latent_dim=4).double()
    x = _data(model)
    _, plain = _fused(model, x, seed=0, beta=1.0)
    _, floored = _fused(model, x, seed=0, beta=1.0, free_bits=1e6)  # every dimension held at the floor
    _, autograd_floored = _autograd(model, x, seed=0, beta=1.0, free_bits=1e6)
    assert not torch.allclose(plain["enc_out.bias"], floored["enc_out.bias"])
    torch.testing.assert_close(floored["enc_out.bias"], autograd_floored["enc_out.bias"])


def test_the_logvar_clamp_passes_no_gradient_where_it_bites():
    model = tiny_model(seed=0, latent_dim=3).double()
    with torch.no_grad():
        model.enc_out.bias[3:] = torch.tensor([-80.0, 0.0, 60.0], dtype=torch.float64)  # below, inside, above
    x = _data(model)
    _, want = _autograd(model, x, seed=3)
    _, got = _fused(model, x, seed=3)
    torch.testing.assert_close(got["enc_out.bias"], want["enc_out.bias"])
    assert got["enc_out.bias"][3] == 0 and got["enc_out.bias"][5] == 0 and got["enc_out.bias"][4] != 0


def test_the_logvar_clamp_at_its_bounds_exactly_matches_autograd():
    """raw logvar exactly at LOGVAR_MIN and LOGVAR_MAX (the logvar rows of the last encoder layer zeroed, the bias
    on the bounds): the same gradient as autograd's clamp there (none), and inside."""
    from vae.model import LOGVAR_MAX, LOGVAR_MIN

    model = tiny_model(seed=0, latent_dim=3).double()
    with torch.no_grad():
        model.enc_out.weight[3:] = 0.0
        model.enc_out.bias[3:] = torch.tensor([LOGVAR_MIN, -1.0, LOGVAR_MAX], dtype=torch.float64)
    x = _data(model)
    _, want = _autograd(model, x, seed=3)
    _, got = _fused(model, x, seed=3)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)
    assert got["enc_out.bias"][4] != 0


@pytest.mark.parametrize("model_kw", CASES, ids=lambda c: f"{c['likelihood']}-{len(c['hidden'])}")
def test_nothing_left_in_the_gradients_or_buffers_is_read(model_kw):
    """Every .grad and every kept buffer (but the ones vector) filled with NaN before a step: the step overwrites all
    of them (its GEMMs with beta = 0 do not read their outputs), so the result is autograd's."""
    model = tiny_model(seed=2, **model_kw).double()
    _spread_posteriors(model)
    x = _data(model)
    objective = dict(beta=2.0, free_bits=0.4)
    want_vals, want = _autograd(model, x, seed=5, **objective)
    step = FusedStep(model)
    step.forward_backward(x, generator=gen(0), **objective)  # makes the buffers and the .grads
    for p in model.parameters():
        p.grad.fill_(float("nan"))
    for name, buf in step._bufs.items():
        if name != "ones":
            buf.fill_(float("nan"))
    got_vals = step.forward_backward(x, generator=gen(5), **objective)
    torch.testing.assert_close(got_vals, want_vals, rtol=1e-10, atol=1e-10)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_bernoulli_recon_is_stable_for_saturated_logits_in_float32():
    model = tiny_model(seed=0)
    x = _data(model).float()
    with torch.no_grad():  # logits of +-100 and more: softplus(l) - x l without overflow or cancellation
        model.decoder[-1].bias.copy_(torch.linspace(-150, 150, model.config.input_dim))
    vals, _ = _fused(model, x, seed=0)
    out = model(x, generator=gen(0))
    want = F.binary_cross_entropy_with_logits(out.recon, x, reduction="sum") / x.shape[0]
    assert torch.isfinite(vals).all()
    torch.testing.assert_close(vals[1], want.detach(), rtol=1e-5, atol=1e-3)


def test_bernoulli_recon_with_the_exp_floor_matches_bce_in_float64():
    """The fused step cuts -|l| at -EXP_FLOOR before exp() (exp's slow path for underflowing arguments); in float64,
    logits on both sides of the floor and far past it give BCE's value to rounding."""
    model = tiny_model(seed=0).double()
    x = _data(model)
    D = model.config.input_dim
    with torch.no_grad():
        near = torch.tensor([EXP_FLOOR - 1, EXP_FLOOR, EXP_FLOOR + 1, 1000.0], dtype=torch.float64)
        model.decoder[-1].bias.copy_(torch.cat([near, -near, torch.linspace(-60, 60, D - 8, dtype=torch.float64)]))
    vals, _ = _fused(model, x, seed=0)
    out = model(x, generator=gen(0))
    want = F.binary_cross_entropy_with_logits(out.recon, x, reduction="sum") / x.shape[0]
    torch.testing.assert_close(vals[1], want.detach(), rtol=1e-13, atol=0)


def test_smaller_last_batch_and_float32_match_autograd():
    model = tiny_model(seed=4, hidden=(32, 16))
    fused = FusedStep(model)
    for n in (24, 7, 24):  # buffers re-made for a new batch size, then reused
        x = _data(model, n=n, seed=n).float()
        want_vals, want = _autograd(model, x, seed=n, beta=2.0)
        model.zero_grad(set_to_none=True)
        got_vals = fused.forward_backward(x, beta=2.0, generator=gen(n))
        torch.testing.assert_close(got_vals, want_vals, rtol=1e-5, atol=1e-4)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_models_the_fused_step_does_not_cover_say_why():
    assert unsupported_reason(tiny_model()) is None
    conv = tiny_model(arch="conv", input_dim=784, image_shape=(28, 28), hidden=(32,))
    ar = tiny_model(decoder="autoregressive")
    assert "arch='conv'" in unsupported_reason(conv)
    assert "decoder='autoregressive'" in unsupported_reason(ar)
    with pytest.raises(ValueError, match="conv"):
        FusedStep(conv)


def _adam_pair(seed=0):
    models = [tiny_model(seed=seed, hidden=(16, 8)) for _ in range(2)]
    return models, [make_optimizer(m.parameters(), 1e-2) for m in models]


def _set_grads(models, step):
    for m in models:
        for i, p in enumerate(m.parameters()):
            p.grad = torch.randn(p.shape, generator=gen(100 * step + i))


def test_adam_without_its_wrapper_gives_the_same_weights_bit_for_bit():
    (a, b), (opt_a, opt_b) = _adam_pair()
    direct = AdamStep(opt_b)
    assert direct.covered()  # torch has the fused CPU kernel (torch >= 2.4)
    for step in range(5):
        _set_grads((a, b), step)
        if step == 3:
            for o in (opt_a, opt_b):
                o.param_groups[0]["lr"] = 3e-3  # as Trainer.update changes it
        opt_a.step()
        direct.step()
    assert direct.direct_steps == 4  # the first step went through Optimizer.step, to create Adam's state
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert opt_a.state_dict()["state"][0]["step"] == opt_b.state_dict()["state"][0]["step"] == 5


def test_adam_direct_step_follows_a_loaded_state():
    (a, b), (opt_a, opt_b) = _adam_pair()
    direct = AdamStep(opt_b)
    for step in range(3):
        _set_grads((a, b), step)
        opt_a.step()
        direct.step()
    saved_w = {k: v.clone() for k, v in b.state_dict().items()}
    saved_opt = {"state": {k: {n: t.clone() for n, t in s.items()} for k, s in opt_b.state_dict()["state"].items()},
                 "param_groups": opt_b.state_dict()["param_groups"]}
    _set_grads((b,), 50)
    direct.step()  # a step that is then undone, as the NaN guard does
    b.load_state_dict(saved_w)
    opt_b.load_state_dict(saved_opt)  # new state tensors: the direct step must use these
    _set_grads((a, b), 3)
    opt_a.step()
    direct.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("model_kw, settings", [
    ({}, dict(free_bits=0.1)),
    ({}, dict(grad_clip=0.5, beta=2.0)),
    (dict(hidden=(32, 16), likelihood="gaussian-learned"), dict(beta_schedule="capacity", capacity_max=5.0, lr=3e-3)),
], ids=["free-bits", "clip", "gaussian-capacity"])
def test_a_trainer_on_the_fused_step_follows_the_autograd_one(make_trainer, model_kw, settings):
    fused = make_trainer(model_kw, epochs=2, **settings)
    plain = make_trainer(model_kw, epochs=2, fused=False, **settings)
    assert fused.fused and not plain.fused
    fused.fit()
    plain.fit()
    assert fused._adam.direct_steps == fused.step_count - 1 and plain._adam.direct_steps == plain.step_count - 1
    hf, hp = fused.history["step"], plain.history["step"]
    assert len(hf["loss"]) == len(hp["loss"]) == 24
    for key in ("loss", "recon", "kl"):
        torch.testing.assert_close(torch.tensor(hf[key]), torch.tensor(hp[key]), rtol=1e-3, atol=1e-3)
    assert fused.history["epoch"]["test_elbo"][-1] == pytest.approx(plain.history["epoch"]["test_elbo"][-1], abs=0.1)


def test_the_autoregressive_decoder_trains_on_autograd(make_trainer):
    t = make_trainer(model_overrides=dict(arch="mlp", decoder="autoregressive"))
    assert not t.fused
    rec = t.step()
    assert rec["step"] == 1


def test_adam_direct_step_falls_back_for_settings_it_does_not_cover():
    (a, b), (opt_a, opt_b) = _adam_pair()
    other = torch.optim.Adam(tiny_model(seed=9, hidden=(16, 8)).parameters(), lr=1e-2, foreach=True, amsgrad=True,
                             weight_decay=0.1)
    for p in other.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    other.step()
    saved = other.state_dict()  # a state saved where the fused kernel was missing, with other settings
    opt_a.load_state_dict(copy.deepcopy(saved))  # copies: load_state_dict keeps the tensors it is given
    opt_b.load_state_dict(copy.deepcopy(saved))
    direct = AdamStep(opt_b)
    assert not direct.covered()
    _set_grads((a, b), 0)
    opt_a.step()
    direct.step()
    assert direct.direct_steps == 0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_adam_direct_step_skips_a_parameter_without_gradient_as_adam_does():
    (a, b), (opt_a, opt_b) = _adam_pair()
    direct = AdamStep(opt_b)
    for step in range(3):
        _set_grads((a, b), step)
        if step == 2:
            next(a.parameters()).grad = next(b.parameters()).grad = None
        opt_a.step()
        direct.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_a_second_divergence_in_an_epoch_goes_back_to_the_same_state(make_trainer):
    from vae import TrainingDiverged

    t = make_trainer(epochs=3)
    t.run_epoch()
    epoch_end = {k: v.clone() for k, v in t.model.state_dict().items()}
    adam_step = float(t.optimizer.state_dict()["state"][0]["step"])

    def diverge():
        t.update(lr=1e9)
        with pytest.raises(TrainingDiverged):
            for _ in range(10):
                t.step()
        t.update(lr=1e-2)

    diverge()
    for _ in range(3):  # steps after the restore write into the optimizer's state ...
        t.step()
    diverge()  # ... but not into the epoch-end snapshot that the second divergence goes back to
    assert float(t.optimizer.state_dict()["state"][0]["step"]) == adam_step
    assert all(torch.equal(v, epoch_end[k]) for k, v in t.model.state_dict().items())
