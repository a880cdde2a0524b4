"""vae.metrics (curve smoothing, down-sampling, the KL heatmap, collapse detection, CSV) and vae.presets (the Train
page's presets do what their names say, on seeded digits runs)."""
from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch

from vae.config import ModelConfig
from vae.metrics import (collapse_remedies, detect_collapse, downsample_indices, epoch_curves, format_duration,
                         detect_instability, history_csv, kl_heatmap, smooth_ema, step_curves)
from vae.presets import PRESETS, model_config_for, preset_configs
from vae.trainer import Trainer, new_history


def fake_history(kl_per_epoch, au_per_epoch=None, steps_per_epoch=3, d=2, events=()):
    """A trainer-shaped history with the given test KL (split evenly over d dims) and active units per epoch."""
    h = new_history()
    step = 0
    for e, kl in enumerate(kl_per_epoch, start=1):
        for _ in range(steps_per_epoch):
            step += 1
            for k, v in dict(step=step, epoch=e - 1 + (step % steps_per_epoch or steps_per_epoch) / steps_per_epoch,
                             loss=30.0 - e, recon=28.0 - e, kl=kl, elbo=-(28.0 - e + kl), beta=1.0,
                             lr=1e-3).items():
                h["step"][k].append(v)
        au = au_per_epoch[e - 1] if au_per_epoch is not None else (d if kl >= 0.1 else 0)
        for k, v in dict(epoch=e, step=step, train_loss=1.0, train_elbo=-1.0, train_recon=1.0, train_kl=kl,
                         test_elbo=-(27.0 - e + kl), test_recon=27.0 - e, test_kl=kl,
                         test_kl_per_dim=[kl / d] * d, active_units=au, beta=1.0, samples_per_s=100.0,
                         time_s=0.1).items():
            h["epoch"][k].append(v)
    h["events"].extend(events)
    return h


# ---- curves ---------------------------------------------------------------------------------------------------------
def test_smooth_ema_matches_its_definition():
    rng = np.random.default_rng(0)
    v = rng.normal(size=200)
    w = 0.8
    acc = norm = 0.0
    ref = []
    for x in v:
        acc, norm = w * acc + (1 - w) * x, w * norm + (1 - w)
        ref.append(acc / norm)
    np.testing.assert_allclose(smooth_ema(v, w), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(smooth_ema(v, 0.0), v)
    np.testing.assert_allclose(smooth_ema(np.full(50, 3.0), 0.99), 3.0)  # debiased: no ramp from 0
    assert smooth_ema([], 0.5).size == 0


def test_smooth_ema_skips_non_finite_values_and_rejects_bad_weights():
    out = smooth_ema([1.0, float("nan"), 3.0], 0.5)
    assert out[1] == 1.0 and math.isfinite(out[2])
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="smoothing"):
            smooth_ema([1.0], bad)


def test_downsample_indices_keeps_ends_and_bounds_the_count():
    idx = downsample_indices(10_000, 500)
    assert idx[0] == 0 and idx[-1] == 9_999 and len(idx) <= 500 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(downsample_indices(7, 500), np.arange(7))
    with pytest.raises(ValueError):
        downsample_indices(10, 1)


def test_step_and_epoch_curves():
    h = fake_history([0.5, 1.0, 2.0], steps_per_epoch=4)
    sc = step_curves(h, smoothing=0.0, max_points=5)
    assert len(sc["step"]) == 5 and sc["step"][0] == 1 and sc["step"][-1] == 12
    assert set(sc) == {"step", "epoch", "beta", "lr", "recon", "kl", "elbo", "loss"}
    np.testing.assert_allclose(sc["elbo"], -(sc["recon"] + sc["kl"]))
    ec = epoch_curves(h)
    np.testing.assert_array_equal(ec["epoch"], [1, 2, 3])
    np.testing.assert_array_equal(ec["test_kl"], [0.5, 1.0, 2.0])
    assert step_curves(new_history())["step"].size == 0


def test_kl_heatmap_is_dims_by_epochs():
    epochs, mat = kl_heatmap(fake_history([0.4, 0.8, 1.2], d=4))
    assert mat.shape == (4, 3)
    np.testing.assert_allclose(mat.sum(0), [0.4, 0.8, 1.2])
    np.testing.assert_array_equal(epochs, [1, 2, 3])
    assert kl_heatmap(new_history())[1].size == 0


# ---- collapse -------------------------------------------------------------------------------------------------------
def test_collapse_is_reported_after_patience_epochs():
    h = fake_history([2.0, 1.0] + [0.01] * 6)
    s = detect_collapse(h, patience=5)
    assert s.collapsed and s.since_epoch == 3 and s.epochs == 6 and s.active_units == 0
    assert "Since epoch 3" in s.reason and s.remedies


def test_a_short_low_kl_stretch_is_not_collapse():
    s = detect_collapse(fake_history([0.02, 0.03, 0.05, 1.0, 2.0]), patience=3)
    assert not s.collapsed and s.epochs == 0
    s = detect_collapse(fake_history([2.0, 0.01, 0.01]), patience=3)
    assert not s.collapsed and s.epochs == 2 and "watching" in s.reason


def test_no_active_unit_alone_counts_as_collapse():
    h = fake_history([0.5] * 4, au_per_epoch=[0, 0, 0, 0])  # some KL, but no mean varies with x
    s = detect_collapse(h, patience=4)
    assert s.collapsed and "no active unit" in s.reason and "total KL below" not in s.reason


def test_detect_collapse_on_an_empty_history_and_bad_patience():
    assert not detect_collapse(new_history()).collapsed
    with pytest.raises(ValueError, match="patience"):
        detect_collapse(new_history(), patience=0)


def test_remedies_follow_the_settings():
    plain = collapse_remedies({"beta": 4.0, "beta_schedule": "constant", "free_bits": 0.0}, {"decoder": "standard"})
    assert any("free bits" in r for r in plain) and any("warm-up" in r for r in plain)
    assert any("lower β (now 4)" in r for r in plain)
    fixed = collapse_remedies({"beta": 1.0, "beta_schedule": "linear", "free_bits": 0.5},
                              {"decoder": "autoregressive"})
    assert not any("free bits" in r for r in fixed) and not any("lower β" in r for r in fixed)
    assert "standard decoder" in fixed[0]


# ---- export ---------------------------------------------------------------------------------------------------------
def test_history_csv_has_a_row_per_step_with_epoch_figures_and_events():
    h = fake_history([0.5, 1.0], steps_per_epoch=3, d=2,
                     events=[{"step": 0, "epoch": 0, "text": "beta: 1.0 -> 2.0"},
                             {"step": 4, "epoch": 1, "text": "lr: 0.001 -> 0.0005"}])
    rows = list(csv.DictReader(io.StringIO(history_csv(h))))
    assert len(rows) == 7  # the change before step 1, then 6 steps
    assert rows[0]["event"] == "beta: 1.0 -> 2.0" and rows[0]["loss"] == ""
    steps = rows[1:]
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[2]["epoch_test_kl"] == "0.5" and steps[2]["test_kl_dim1"] == "0.25"
    assert steps[0]["epoch_test_kl"] == "" and steps[5]["epoch_test_elbo"] != ""
    assert steps[3]["event"] == "lr: 0.001 -> 0.0005"
    assert float(steps[4]["elbo"]) == pytest.approx(-(float(steps[4]["recon"]) + float(steps[4]["kl"])))


def test_history_csv_of_an_empty_history_is_a_header():
    text = history_csv(new_history())
    assert text.count("\n") == 1 and text.startswith("step,epoch,loss")


def test_format_duration():
    assert format_duration(None) == "–" and format_duration(float("inf")) == "–"
    assert format_duration(42.4) == "42 s"
    assert format_duration(185) == "3 min 05 s"
    assert format_duration(3720) == "1 h 02 min"


# ---- presets ----------------------------------------------------------------------------------------------------
def test_every_preset_builds_valid_configs():
    for name in PRESETS:
        t, m = preset_configs(name)
        assert t.dataset == "digits" and model_config_for(t.dataset, **m).input_dim == 64
    with pytest.raises(ValueError, match="not known"):
        preset_configs("turbo")


def test_model_config_for_takes_the_dataset_shape():
    assert model_config_for("moons").likelihood == "gaussian-learned"
    m = model_config_for("mnist", likelihood="auto", arch="conv")
    assert isinstance(m, ModelConfig) and (m.input_dim, m.image_shape) == (784, (28, 28))
    with pytest.raises(ValueError, match="dataset"):
        model_config_for("cifar")
    with pytest.raises(ValueError, match="latent_dim"):
        model_config_for("digits", latent_dim=0)


def _train(name, epochs, digits_train, digits_test):
    t, m = preset_configs(name)
    t = type(t).from_dict({**t.to_dict(), "epochs": epochs, "device": "cpu"})
    trainer = Trainer(t, model_config_for(t.dataset, **m), digits_train, digits_test)
    trainer.fit()
    return trainer


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: faster than 2 threads, and steady on a loaded machine
    yield
    torch.set_num_threads(n)


def test_collapse_preset_collapses_and_free_bits_revives(one_thread, digits_train, digits_test):
    collapsed = _train("reproduce KL collapse", 6, digits_train, digits_test)
    s = detect_collapse(collapsed.history, patience=5, train_config=collapsed.config.to_dict())
    assert s.collapsed and s.active_units == 0 and s.total_kl < 0.1
    revived = _train("fix it with free bits", 10, digits_train, digits_test)
    e = revived.history["epoch"]
    assert e["active_units"][-1] >= 8 and e["test_kl"][-1] > 1.0
    assert not detect_collapse(revived.history).collapsed


def test_fast_demo_sharpens(one_thread, digits_train, digits_test):
    t = _train("fast demo", 12, digits_train, digits_test)
    elbo = t.history["epoch"]["test_elbo"]
    assert elbo[-1] > elbo[0] + 1.5  # nats per example: the reconstructions get visibly better
    assert t.history["epoch"]["test_kl"][-1] > 0.5  # and the code carries information


def _steps(neg_elbo, per_epoch=20):
    h = new_history()
    n = len(neg_elbo)
    h["step"]["step"] = list(range(1, n + 1))
    h["step"]["epoch"] = [(i + 1) / per_epoch for i in range(n)]
    h["step"]["elbo"] = [-v for v in neg_elbo]
    return h


def test_instability_names_a_jump_after_the_first_epoch():
    calm = np.linspace(60.0, 25.0, 400)  # a healthy run: its first steps a few times its later -ELBO
    assert detect_instability(_steps(calm)) is None
    first = calm.copy()
    first[5] = 5e3  # within the first epoch: the start of training, not judged
    assert detect_instability(_steps(first)) is None
    spiked = calm.copy()
    spiked[240] = 2e9
    msg = detect_instability(_steps(spiked), train_config={"lr": 1.0})
    assert msg.startswith("Unstable training") and "step 241" in msg and "2e+09" in msg and "now 1)" in msg
    stays = np.concatenate([calm[:200], np.full(200, 4000.0)])  # jumps and stays up: caught at the jump
    assert "step 201" in detect_instability(_steps(stays))
    gaussian = np.concatenate([np.linspace(150.0, 12.0, 20), 12.0 + np.sin(np.arange(380))])  # -ELBO near 0
    assert detect_instability(_steps(gaussian)) is None
    assert "−ELBO is inf" in detect_instability(_steps(np.concatenate([calm[:300], [np.inf]])))


def test_instability_of_a_bernoulli_run_against_the_model_that_ignores_z():
    from vae.metrics import trivial_loss

    coin = 64 * math.log(2)  # 44.4 nats: every pixel 1/2, for any x in [0, 1]
    mc = {"likelihood": "bernoulli", "input_dim": 64, "latent_dim": 8}
    assert math.isclose(trivial_loss(mc, {"beta": 4.0}), coin)
    assert math.isclose(trivial_loss(mc, {"beta": 2.0, "free_bits": 0.5}), coin + 2.0 * 8 * 0.5)
    assert math.isclose(trivial_loss(mc, {"beta": 1.0, "beta_schedule": "capacity", "capacity_max": 25.0}),
                        coin + 25.0)
    assert trivial_loss({**mc, "likelihood": "gaussian"}, {}) is None

    def hist(recon, loss, elbo=None):
        h = new_history()
        e = h["epoch"]
        e["test_recon"], e["train_loss"] = list(recon), list(loss)
        e["test_elbo"] = list(elbo) if elbo is not None else [-r - 3.0 for r in recon]
        return h

    tc = {"beta": 1000.0, "lr": 1.0}
    assert detect_instability(hist([50, 50], [9e4, 9e4]), mc, tc) is None  # too early to say
    assert "reconstruction NLL 60.0" in detect_instability(hist([50, 50, 60], [40, 40, 40]), mc, tc)
    assert detect_instability(hist([40, 30, 46], [40, 30, 46]), mc, tc) is None  # within the 10 % margin
    # lr 1 at β = 1000: recon fine, but the objective is ~136,000 nats, far above the 44.4 of ignoring z
    assert "training objective 1.36e+05" in detect_instability(hist([27, 27, 27], [1.4e5, 1.4e5, 1.36e5]), mc, tc)
    # β = 0 is allowed to spend KL freely: its ELBO falls far below -D ln 2, recon and objective stay fine
    assert detect_instability(hist([20, 18, 15], [20, 18, 15], elbo=[-60, -80, -96]), mc, {"beta": 0.0}) is None
    assert "test ELBO is nan" in detect_instability(hist([20, 18, 15], [20, 18, 15], elbo=[-30, -30, math.nan]),
                                                    mc, {"beta": 1.0})
    assert detect_instability(hist([60, 60, 60], [60, 60, 60]), {**mc, "likelihood": "gaussian"}, tc) is None


def test_instability_of_any_run_whose_encoder_diverged():
    """A test KL of millions of nats (an encoder blown up by lr = 1 on a Gaussian decoder; its ELBO of -2e7 has no
    scale to judge it by) is caught from the first epoch, for any likelihood; a non-finite ELBO too."""
    def hist(elbo, kl):
        h = new_history()
        h["epoch"]["test_elbo"], h["epoch"]["test_kl"] = [elbo], [kl]
        return h

    mc = {"likelihood": "gaussian-learned", "input_dim": 64, "latent_dim": 8}
    warning = detect_instability(hist(-2.1e7, 9.04e6), mc, {"lr": 1.0})
    assert warning.startswith("Training has gone wrong: the test KL is 9.04e+06 nats") and "lr" not in warning
    assert "learning rate (now 1)" in warning
    assert detect_instability(hist(-250.0, 180.0), mc, {"lr": 1e-3}) is None  # a big, working KL
    assert "test ELBO is inf" in detect_instability(hist(math.inf, 3.0), mc, {})


@pytest.mark.parametrize("preset, changes", [("fast demo", {}), ("fast demo", {"beta": 0.0}),
                                             ("fast demo", {"beta_schedule": "capacity", "capacity_max": 60.0}),
                                             ("fast demo", {"likelihood": "gaussian", "sigma": 0.2})])
def test_healthy_runs_raise_no_instability_warning(digits_train, digits_test, one_thread, preset, changes):
    t, m = preset_configs(preset)
    t = type(t).from_dict({**t.to_dict(), "epochs": 4, "device": "cpu",
                           **{k: v for k, v in changes.items() if k not in ("likelihood", "sigma")}})
    m = {**m, **{k: v for k, v in changes.items() if k in ("likelihood", "sigma")}}
    trainer = Trainer(t, model_config_for(t.dataset, **m), digits_train, digits_test)
    trainer.fit()
    assert detect_instability(trainer.history, trainer.model.config.to_dict(), trainer.config.to_dict()) is None
