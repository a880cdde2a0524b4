"""The fused MLP step in C (vae.native, vae/native/fused_mlp.c): the same loss terms and gradients as autograd (to
float32 rounding), Adam's step as torch.optim.Adam takes it, Trainer.steps() as single steps take them,
the NaN guard, and the fallbacks (no compiler, VAE_NATIVE=0, a damaged cached build)."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, gen, tiny_model
from vae import TrainingDiverged, native
from vae.fused import FusedStep
from vae.losses import elbo_terms

# CI installs a C compiler (.ci/run); a machine without one runs the torch step, which the fallback tests cover
needs_cc = pytest.mark.skipif(native._compiler() is None, reason="no C compiler here: vae.native is not built")

CASES = [
    dict(likelihood="bernoulli", hidden=(32,)),
    dict(likelihood="bernoulli", hidden=(24, 16)),
    dict(likelihood="bernoulli", hidden=(40,), input_dim=150, image_shape=(10, 15)),  # runs of 64 pixels + a tail
    dict(likelihood="gaussian", hidden=(16, 8), sigma=0.3),
]
OBJECTIVES = [
    dict(beta=1.0),
    dict(beta=4.0),
    dict(beta=0.5, free_bits=0.4),
    dict(beta=2.0, capacity=1.0),  # R > C
    dict(beta=2.0, capacity=50.0),  # R < C
    dict(beta=3.0, free_bits=0.4, capacity=0.5),
]


def _data(model, n=24, seed=1, dtype=torch.float32):
    x = torch.rand(n, model.config.input_dim, generator=gen(seed), dtype=dtype)
    if model.config.likelihood == "bernoulli":
        x = (x > 0.5).to(dtype) * 0.9 + 0.05
    return x


def _spread(model):
    with torch.no_grad():  # per-dimension KLs from ~0 to ~2 nats (both sides of a 0.4 floor)
        d = model.config.latent_dim
        model.enc_out.bias[:d] = torch.arange(d, dtype=model.enc_out.bias.dtype) * 0.5


def _history(trainer) -> dict:
    """the history but its wall-clock figures"""
    h = trainer.history
    return {"step": h["step"], "events": h["events"],
            "epoch": {k: v for k, v in h["epoch"].items() if k not in ("samples_per_s", "time_s")}}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _reference(model, x, seed, **kw):
    """autograd on a copy of the model, with the same reparameterisation draw (a float32 draw differs from a
    float64 one: the reference computes in the batch's dtype)"""
    ref = copy.deepcopy(model)
    terms = elbo_terms(ref, x, generator=gen(seed), **kw)
    terms.loss.backward()
    return [terms.loss.item(), terms.recon.item(), terms.kl.item()], _grads(ref)


def _close(got, want, name=""):
    scale = want.abs().max().item() + 1e-6
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale, msg=name)


@needs_cc
def test_the_library_builds_and_loads_here():
    assert native.library() is not None, native.unavailable_reason()
    assert native.unavailable_reason() is None


@pytest.mark.parametrize("model_kw", CASES, ids=lambda c: f"{c['likelihood']}-{c.get('input_dim', 64)}-"
                                                           f"{len(c['hidden'])}")
@needs_cc
@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_terms_and_gradients_match_autograd(model_kw, objective):
    model = tiny_model(seed=2, latent_dim=4, **model_kw)
    _spread(model)
    x = _data(model, n=23)  # an odd batch
    want_vals, want = _reference(model, x, seed=5, **objective)
    step = FusedStep(model)
    assert step.native
    got_vals, adam_done = step.terms(x, generator=gen(5), **objective)
    assert not adam_done
    assert got_vals == pytest.approx(want_vals, rel=1e-5, abs=1e-5)
    got = _grads(model)
    assert set(got) == set(want)
    for name in want:
        _close(got[name], want[name], name)


@needs_cc
def test_the_logvar_clamp_passes_no_gradient_where_it_bites():
    model = tiny_model(seed=0, latent_dim=3)
    with torch.no_grad():
        model.enc_out.bias[3:] = torch.tensor([-80.0, 0.0, 60.0])  # below, inside, above the clamp
    x = _data(model)
    _, want = _reference(model, x, seed=3)
    FusedStep(model).terms(x, generator=gen(3))
    got = _grads(model)
    for name in want:
        _close(got[name], want[name], name)
    assert got["enc_out.bias"][3] == 0 and got["enc_out.bias"][5] == 0 and got["enc_out.bias"][4] != 0


@needs_cc
def test_saturated_logits_stay_finite_and_exact():
    """Logits of +-200 (a trained model's always-black pixels go far below -87, where exp() underflows): the
    Bernoulli term stays exact (BCE in float64) and its gradient is sigmoid(l) - x."""
    model = tiny_model(seed=0, hidden=(16,))
    with torch.no_grad():
        model.decoder[-1].weight.zero_()
        model.decoder[-1].bias.copy_(torch.linspace(-200, 200, 64))
    x = _data(model)
    vals, _ = FusedStep(model).terms(x, generator=gen(0))
    want_vals, want = _reference(model, x, seed=0)
    assert vals == pytest.approx(want_vals, rel=1e-6)
    _close(model.decoder[-1].bias.grad, want["decoder.1.bias"])


@needs_cc
def test_one_thread_and_two_agree_and_each_repeats_exactly():
    if not native.library().vae_has_openmp():  # a compiler without OpenMP (clang without libomp): one thread
        pytest.skip("this build of the C step has no OpenMP: its passes run on one thread whatever the count")
    # passes big enough to split (>= 16384 values), over an odd batch: the two threads' rows are uneven
    model = tiny_model(seed=1, hidden=(300,), input_dim=150, image_shape=(10, 15))
    x = _data(model, n=127)
    before = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            vals, _ = FusedStep(model).terms(x, generator=gen(7))
            runs.setdefault(threads, []).append((vals, _grads(model)))
    finally:
        torch.set_num_threads(before)
    (v1, g1), = runs[1]
    (v2, g2), (v2b, g2b) = runs[2]
    assert v2 == v2b and all(torch.equal(g2[k], g2b[k]) for k in g2)  # a given thread count: the same sums
    assert v1 == pytest.approx(v2, rel=1e-6)
    for k in g1:
        _close(g1[k], g2[k], k)


@needs_cc
def test_float32_buffers_whatever_the_default_dtype():
    model = tiny_model(seed=0)
    x = _data(model)
    want_vals, _ = _reference(model, x, seed=2)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        vals, _ = FusedStep(model).terms(x, generator=gen(2))
    finally:
        torch.set_default_dtype(before)
    assert vals == pytest.approx(want_vals, rel=1e-5)


@needs_cc
@pytest.mark.parametrize("where", ["kl", "gaussian"])
def test_an_overflow_is_inf_as_in_the_torch_step(where):
    """Sums past float32's range: the torch step's float32 sums give inf, and so does the C step (its double sums
    are rounded to float32), so the trainer's guard stops such a run either way."""
    if where == "kl":
        model = tiny_model(seed=0, latent_dim=8)
        with torch.no_grad():
            model.enc_out.weight.zero_()
            model.enc_out.bias[:8] = 1e19  # mu^2 = 1e38 a dimension, 8e38 summed
    else:
        model = tiny_model(seed=0, likelihood="gaussian", sigma=1.0)
        with torch.no_grad():
            model.decoder[-1].weight.zero_()
            model.decoder[-1].bias.fill_(3e18)  # (3e18)^2 / 2 = 4.5e36 a pixel, 2.9e38 for 64, x 24 rows
    x = _data(model)
    torch_vals = FusedStep(model, native=False).terms(x, generator=gen(0))[0]
    c_vals = FusedStep(model).terms(x, generator=gen(0))[0]
    assert not all(map(math.isfinite, torch_vals))
    assert not all(map(math.isfinite, c_vals))


@needs_cc
def test_a_parameter_replaced_between_steps_is_followed():
    """p.data = a new tensor (its memory elsewhere): the C step reads the new one, and writes the new .grad."""
    model = tiny_model(seed=0)
    x = _data(model)
    step = FusedStep(model)
    step.terms(x, generator=gen(0))
    with torch.no_grad():
        model.decoder[-1].weight.data = model.decoder[-1].weight.data * 0.5  # a fresh tensor
    model.enc_out.weight.grad = None
    model.enc_out.bias = torch.nn.Parameter(model.enc_out.bias.detach().clone())  # load_state_dict(assign=True)
    vals, _ = step.terms(x, generator=gen(1))
    want_vals, want = _reference(model, x, seed=1)
    assert vals == pytest.approx(want_vals, rel=1e-5)
    for name in want:
        _close(dict(model.named_parameters())[name].grad, want[name], name)


@needs_cc
def test_a_row_out_of_range_is_refused():
    model = tiny_model(seed=0)
    x = _data(model, n=10)
    with pytest.raises(IndexError, match="out of range"):
        FusedStep(model).terms(x, generator=gen(0), rows=torch.tensor([0, 3, 10]))


@needs_cc
def test_models_it_does_not_cover_take_the_torch_step():
    learned = FusedStep(tiny_model(seed=0, likelihood="gaussian-learned"))
    assert not learned.native
    double = tiny_model(seed=0).double()
    step = FusedStep(double)
    assert step.native  # the library is there; a float64 batch is not for it
    vals, _ = step.terms(_data(double, dtype=torch.float64), generator=gen(0))
    want_vals, _ = _reference(double, _data(double, dtype=torch.float64), seed=0)
    assert vals == pytest.approx(want_vals, rel=1e-10)


# ---- Adam, and the trainer ---------------------------------------------------------------------------------------

def _pair(make_trainer, **kw):
    return make_trainer(**kw), make_trainer(**kw, native=False)


@pytest.fixture
def make_native_trainer(digits_train, digits_test, small_train_config):
    from vae import Trainer
    from vae.trainer import default_model_config

    def make(native: bool = True, model_overrides=None, **train_overrides):
        mkw = dict(hidden=(32,), latent_dim=4)
        mkw.update(model_overrides or {})
        return Trainer(small_train_config(**train_overrides), default_model_config(digits_train, **mkw),
                       digits_train, digits_test, native=native)

    return make


@needs_cc
def test_the_c_adam_step_follows_torch_adam(make_native_trainer):
    c, t = _pair(make_native_trainer, epochs=2)
    assert c.step_path == "native fused step" and t.step_path == "fused step"
    c.fit()
    t.fit()
    assert c._adam.direct_steps == c.step_count - 1  # all but the first (which creates Adam's state)
    for (name, p), q in zip(c.model.named_parameters(), t.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    sc, st = c.optimizer.state_dict()["state"], t.optimizer.state_dict()["state"]
    for k in st:
        assert float(sc[k]["step"]) == float(st[k]["step"]) == c.step_count
        torch.testing.assert_close(sc[k]["exp_avg"], st[k]["exp_avg"], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(sc[k]["exp_avg_sq"], st[k]["exp_avg_sq"], rtol=1e-3, atol=1e-9)
    assert c.history["epoch"]["test_elbo"] == pytest.approx(t.history["epoch"]["test_elbo"], rel=1e-4)


@needs_cc
def test_the_c_adam_step_on_two_threads(make_native_trainer):
    """a 64 x 300 weight: Adam's update of it is split between the threads"""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        c, t = _pair(make_native_trainer, epochs=1, model_overrides=dict(hidden=(300,), latent_dim=4))
        c.fit()
        t.fit()
    finally:
        torch.set_num_threads(before)
    assert c._fused.chunked_steps > 0
    for (name, p), q in zip(c.model.named_parameters(), t.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@needs_cc
@pytest.mark.parametrize("schedule", [dict(), dict(beta_schedule="linear", warmup_epochs=1.5),
                                      dict(beta_schedule="capacity", capacity_max=3.0, free_bits=0.1)],
                         ids=["constant", "linear", "capacity-free-bits"])
def test_chunks_follow_the_schedule_step_by_step(make_native_trainer, schedule):
    a, b = (make_native_trainer(epochs=2, **schedule) for _ in range(2))
    a.step()
    b.step()
    while not a.done:
        a.steps(7)
    while not b.done:
        b.step()
    assert a._fused.chunked_steps > 0 and b._fused.chunked_steps == 0
    assert _history(a) == _history(b)
    if "linear" in schedule.values():
        assert len(set(a.history["step"]["beta"])) > 10
    if schedule.get("capacity_max"):
        assert a.schedule.capacity(0) < a.schedule.capacity(a.step_count - 1)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


@needs_cc
@pytest.mark.parametrize("latent_dim", [4, 3])  # batch x d: 512 (one draw for a chunk) and 384 + 3 (one a step)
def test_steps_take_the_same_steps_as_single_steps(make_native_trainer, latent_dim):
    model = dict(hidden=(32,), latent_dim=latent_dim)
    a = make_native_trainer(epochs=2, batch_size=100 + (latent_dim == 3) * 29, model_overrides=model)
    b = make_native_trainer(epochs=2, batch_size=100 + (latent_dim == 3) * 29, model_overrides=model)
    a.step()  # Adam's state exists from here on: the chunks below run in C
    b.step()
    got = []
    while not a.done:
        recs = a.steps(5)
        assert recs and len(recs) <= 5
        assert not any(r["epoch_end"] for r in recs[:-1])  # never past an epoch's end
        got += recs
    assert a._fused.chunked_steps >= len(got) - 6  # all but an epoch's last steps (and a chunk's tail) in C
    want = [b.step() for _ in range(len(got))]
    assert b.done and b._fused.chunked_steps == 0
    assert got == want
    assert _history(a) == _history(b)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


@needs_cc
def test_fit_equals_single_steps_and_repeats(make_native_trainer):
    a, b, c = (make_native_trainer(epochs=2) for _ in range(3))
    a.fit()
    b.fit()
    while not c.done:
        c.step()
    assert _history(a) == _history(b) == _history(c)


@needs_cc
def test_a_divergence_inside_a_chunk_keeps_the_epoch_end_weights(make_native_trainer):
    t = make_native_trainer(epochs=3)
    t.run_epoch()
    epoch_end = {k: v.clone() for k, v in t.model.state_dict().items()}
    adam_step = float(t.optimizer.state_dict()["state"][0]["step"])
    chunked = t._fused.chunked_steps
    t.update(lr=1e9)
    with pytest.raises(TrainingDiverged, match="became"):
        for _ in range(10):
            t.steps(5)
    assert t._fused.chunked_steps > chunked  # it diverged inside a chunk
    assert all(torch.equal(v, epoch_end[k]) for k, v in t.model.state_dict().items())
    assert float(t.optimizer.state_dict()["state"][0]["step"]) == adam_step
    t.update(lr=1e-2)
    rec = t.steps(3)  # and it trains on from there
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rec)


@needs_cc
def test_gradient_clipping_takes_the_step_with_adam_apart(make_native_trainer):
    c, t = _pair(make_native_trainer, epochs=1, grad_clip=0.5)
    c.fit()
    t.fit()
    assert c._adam.direct_steps == t._adam.direct_steps  # torch's Adam kernel in both: the clip comes first
    for p, q in zip(c.model.parameters(), t.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@needs_cc
def test_a_checkpointed_run_resumes_the_same(make_native_trainer, tmp_path):
    a = make_native_trainer(epochs=2)
    a.run_epoch()
    state = a.state_dict()
    a.fit()
    b = make_native_trainer(epochs=2)
    b.load_state_dict(copy.deepcopy(state))
    b.fit()
    assert _history(a) == _history(b)


# ---- building, and the fallbacks -----------------------------------------------------------------------------------

def _python(code: str, **env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("CC", "VAE_NATIVE", "VAE_NATIVE_DIR")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**base, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = """
import json
from vae import Trainer, TrainConfig, native
from vae.trainer import default_model_config
from vae.data import load_dataset
t = Trainer(TrainConfig(dataset="digits", epochs=1, batch_size=128, seed=0), None)
t.fit()
print(json.dumps({"reason": native.unavailable_reason(), "path": t.step_path,
                  "elbo": t.history["epoch"]["test_elbo"][-1]}))
"""


def test_fallbacks_without_a_compiler_or_when_turned_off(tmp_path):
    off = _python(PROBE, VAE_NATIVE="0", VAE_NATIVE_DIR=str(tmp_path / "a"))
    assert off["reason"] == "VAE_NATIVE=0" and off["path"] == "fused step"
    none = _python(PROBE, PATH="/nonexistent-dir", VAE_NATIVE_DIR=str(tmp_path / "b"))
    assert none["reason"] == "no C compiler (cc, gcc or clang) on PATH" and none["path"] == "fused step"
    failing = _python(PROBE, CC="false", PATH=f"{os.path.dirname(shutil.which('false') or '/bin/false')}",
                      VAE_NATIVE_DIR=str(tmp_path / "c"))  # a "compiler" that always fails
    assert failing["reason"].startswith("the C build failed") and failing["path"] == "fused step"
    assert not list((tmp_path / "c").glob("*"))  # no half-written file left
    assert none["elbo"] == off["elbo"] == failing["elbo"]
    if native._compiler() is None:
        return
    on = _python(PROBE, VAE_NATIVE_DIR=str(tmp_path / "d"))
    assert on["reason"] is None and on["path"] == "native fused step"
    assert on["elbo"] == pytest.approx(off["elbo"], abs=0.05)  # the same training, to float32 rounding


@needs_cc
def test_a_damaged_cached_build_is_built_again(tmp_path):
    first = _python(PROBE, VAE_NATIVE_DIR=str(tmp_path))
    (built,) = tmp_path.glob("fused_mlp-*.so")
    built.write_bytes(b"not a library")
    again = _python(PROBE, VAE_NATIVE_DIR=str(tmp_path))
    assert first["path"] == again["path"] == "native fused step"
    assert built.read_bytes()[:4] == b"\x7fELF" or sys.platform == "darwin"
