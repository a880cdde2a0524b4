"""The trainer on digits (12 steps per epoch, a 32-unit MLP): it learns, it is deterministic, it survives a
divergence with the last good weights, and its step-level API drives callbacks, pauses and live changes."""
from __future__ import annotations

import math

import pytest
import torch

from vae import Trainer, TrainingDiverged
from vae.diagnostics import evaluate
from vae.trainer import EPOCH_KEYS, STEP_KEYS

TIMING_KEYS = ("samples_per_s", "time_s")  # wall-clock figures: the only history entries allowed to differ


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _epoch_history_without_timing(trainer) -> dict:
    return {k: v for k, v in trainer.history["epoch"].items() if k not in TIMING_KEYS}


def test_short_run_lowers_the_loss(make_trainer):
    t = make_trainer(epochs=3)
    before = evaluate(t.model, t.x_test, seed=0)["elbo"]
    metrics = t.fit()
    h = t.history["epoch"]
    assert h["epoch"] == [1, 2, 3] and t.step_count == 36 == t.total_steps
    assert h["train_loss"][-1] < h["train_loss"][0] - 2  # nats per example
    assert h["test_elbo"][-1] > h["test_elbo"][0]
    assert metrics["test_elbo"] > before + 5
    assert metrics["test_elbo"] < 0 and metrics["epochs"] == 3 and metrics["steps"] == 36
    assert metrics["test_elbo"] == pytest.approx(-(metrics["test_recon"] + metrics["test_kl"]))
    assert len(t.history["step"]["loss"]) == 36
    assert all(len(v) == 3 for v in h.values())


def test_a_step_changes_the_weights(make_trainer):
    t = make_trainer()
    before = _weights(t.model)
    rec = t.step()
    assert set(STEP_KEYS) | {"epoch_end"} == set(rec)
    assert rec["step"] == 1 and not rec["epoch_end"]
    assert rec["elbo"] == pytest.approx(-(rec["recon"] + rec["kl"]))
    after = t.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == list(before)  # every parameter moved


def test_same_seed_same_history(make_trainer):
    a, b = make_trainer(seed=3), make_trainer(seed=3)
    a.fit()
    b.fit()
    assert a.history["step"] == b.history["step"]  # exact equality, float for float
    assert _epoch_history_without_timing(a) == _epoch_history_without_timing(b)
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_different_seed_differs(make_trainer):
    a, b = make_trainer(seed=0, epochs=1), make_trainer(seed=1, epochs=1)
    a.fit()
    b.fit()
    assert a.history["step"]["loss"] != b.history["step"]["loss"]
    assert not torch.equal(a.model.enc_out.weight, b.model.enc_out.weight)


def test_training_does_not_touch_the_global_rng(make_trainer):
    state = torch.get_rng_state()
    t = make_trainer(epochs=1)
    t.fit()
    assert torch.equal(state, torch.get_rng_state())


def _step_until_diverged(trainer):
    with pytest.raises(TrainingDiverged) as info:
        while not trainer.done:
            trainer.step()
    return info.value


def _assert_holds(model, weights):
    for k, v in model.state_dict().items():
        assert torch.isfinite(v).all(), k
        assert torch.equal(v, weights[k]), k


def test_divergence_from_the_start_keeps_the_initial_weights(make_trainer):
    t = make_trainer({"hidden": (32, 16)}, lr=1e6)
    initial = _weights(t.model)
    err = _step_until_diverged(t)
    assert t.epoch == 0
    _assert_holds(t.model, initial)
    msg = str(err)
    assert f"at step {err.step}" in msg and "lr" in msg and "end of epoch 0" in msg


def test_divergence_restores_the_last_completed_epoch(make_trainer):
    t = make_trainer({"hidden": (64, 32)}, epochs=4)
    t.run_epoch()
    after_epoch_1 = _weights(t.model)
    epochs_recorded = list(t.history["epoch"]["epoch"])
    t.update(lr=1e8, beta=100.0)
    _step_until_diverged(t)
    assert t.epoch == 1
    _assert_holds(t.model, after_epoch_1)
    assert t.history["epoch"]["epoch"] == epochs_recorded  # no epoch record for the failed one
    # the lr set since the snapshot stays in force: the optimiser agrees with the config
    assert all(g["lr"] == 1e8 for g in t.optimizer.param_groups)
    # a lower lr lets training go on from the good weights
    t.update(lr=1e-3, beta=1.0)
    rec = t.step()
    assert math.isfinite(rec["loss"]) and rec["lr"] == 1e-3
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_step_run_epoch_fit_callbacks(make_trainer):
    t = make_trainer(epochs=2)
    steps, epochs = [], []
    rec = t.run_epoch(on_step=steps.append)
    assert len(steps) == t.steps_per_epoch == 12
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert [s["epoch_end"] for s in steps] == [False] * 11 + [True]
    assert steps[-1]["epoch"] == pytest.approx(1.0)
    assert set(rec) == set(EPOCH_KEYS) and rec["epoch"] == 1 and rec["step"] == 12
    assert rec == t.last_epoch()
    metrics = t.fit(on_step=steps.append, on_epoch=epochs.append)
    assert len(steps) == 24 and [e["epoch"] for e in epochs] == [2]
    assert t.done and metrics["epochs"] == 2
    with pytest.raises(RuntimeError, match="finished"):
        t.step()


def test_should_stop_pauses_between_steps(make_trainer):
    t = make_trainer(epochs=2)
    assert t.last_epoch() is None
    calls = []
    metrics = t.fit(on_step=calls.append, should_stop=lambda: len(calls) >= 3)
    assert t.step_count == 3 and t.epoch == 0 and len(calls) == 3
    assert metrics["steps"] == 3 and metrics["epochs"] == 0 and metrics["samples_per_s"] is None
    # resuming continues where it stopped, and a paused-and-resumed run equals an uninterrupted one
    t.fit()
    assert t.step_count == 24 and t.epoch == 2
    ref = make_trainer(epochs=2)
    ref.fit()
    assert ref.history["step"] == t.history["step"]


def test_update_lr_records_an_event(make_trainer):
    t = make_trainer()
    t.step()
    text = t.update(lr=5e-4)
    assert "lr" in text and "0.01" in text and "0.0005" in text
    assert t.history["events"] == [{"step": 1, "epoch": 0, "text": text}]
    assert all(g["lr"] == 5e-4 for g in t.optimizer.param_groups)
    assert t.config.lr == 5e-4
    assert t.step()["lr"] == 5e-4
    # no change, no event
    assert t.update(lr=5e-4) == ""
    assert len(t.history["events"]) == 1


def test_update_beta_changes_the_schedule(make_trainer):
    t = make_trainer()
    t.update(beta=3.0)
    assert t.schedule.beta(0) == 3.0 and t.step()["beta"] == 3.0
    with pytest.raises(ValueError, match=r"^beta="):
        t.update(beta=-1)
    assert t.config.beta == 3.0  # a rejected change leaves everything as it was
    assert len(t.history["events"]) == 1


def test_schedule_drives_beta(make_trainer):
    t = make_trainer(beta_schedule="linear", warmup_epochs=1.0, epochs=2)
    t.fit()
    betas = t.history["step"]["beta"]
    assert betas[0] == 0.0
    assert betas[6] == pytest.approx(0.5)  # step 6 of a 12-step warm-up
    assert betas[12:] == [1.0] * 12


@pytest.mark.parametrize("overrides", [dict(free_bits=0.5, beta=4.0), dict(beta_schedule="capacity", beta=10.0,
                                                                           capacity_max=5.0, warmup_epochs=1.0),
                                       dict(beta_schedule="cyclical", cycles=2), dict(grad_clip=1.0)],
                         ids=["free-bits", "capacity", "cyclical", "grad-clip"])
def test_remedies_train(make_trainer, overrides):
    t = make_trainer(epochs=1, **overrides)
    metrics = t.fit()
    assert math.isfinite(metrics["test_elbo"]) and all(math.isfinite(v) for v in t.history["step"]["loss"])


def test_resume_from_state_dict_is_exact(make_trainer, tmp_path):
    """state_dict() is a snapshot (autosave writes it while training goes on) that loads with weights_only=True
    and resumes bit for bit."""
    a = make_trainer(epochs=2)
    a.run_epoch()
    state = a.state_dict()
    a.fit()  # training on must not reach into the snapshot
    assert len(state["history"]["step"]["loss"]) == 12 and state["epoch"] == 1
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    b = make_trainer(epochs=2)  # a fresh trainer with the same config, as the job registry rebuilds it
    b.load_state_dict(state)
    assert b.step_count == 12 and b.epoch == 1
    b.fit()
    assert b.history["step"] == a.history["step"]
    assert _epoch_history_without_timing(b) == _epoch_history_without_timing(a)
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len(state["history"]["step"]["loss"]) == 12  # nor does the resumed trainer write into it


def test_a_trainer_placed_on_the_cpu_keeps_another_devices_generator_state(make_trainer, digits_train, digits_test,
                                                                           small_train_config):
    """The server's copy of a CUDA run lives on the CPU (vae.jobs): a CUDA generator's state (16 bytes: seed and
    offset) cannot go into a CPU generator, so it is held and handed back for the worker that resumes the run."""
    a = make_trainer(epochs=2)
    a.run_epoch()
    state = a.state_dict()
    foreign = torch.arange(16, dtype=torch.uint8)  # the shape of a CUDA generator's state
    state["generator"] = foreign
    with pytest.raises(RuntimeError):  # a trainer on its own config's device: a broken state is an error
        make_trainer(epochs=2).load_state_dict(state)
    placed = Trainer(small_train_config(epochs=2), a.model.config, digits_train, digits_test, device="cpu")
    placed.load_state_dict(state)
    assert placed.step_count == a.step_count and torch.equal(placed.state_dict()["generator"], foreign)
    assert all(torch.equal(v, a.model.state_dict()[k]) for k, v in placed.model.state_dict().items())
    placed.load_state_dict(a.state_dict())  # a state of its own kind goes into its generator again
    assert torch.equal(placed.state_dict()["generator"], a.generator.get_state())


def test_input_dim_must_match_the_data(digits_train, digits_test, small_train_config):
    from vae import ModelConfig

    with pytest.raises(ValueError, match="input_dim=784"):
        Trainer(small_train_config(), ModelConfig(input_dim=784, image_shape=(28, 28)), digits_train, digits_test)


FLUSH_CHECK = r"""
import sys, torch
from vae.device import flush_denormals
if sys.argv[1] == "trainer":
    from vae import Trainer, TrainConfig
    Trainer(TrainConfig(dataset="moons", epochs=1, max_examples=64, device="cpu"))
elif sys.argv[1] == "flush":
    print("supported", flush_denormals())
tiny = torch.full((1 << 20,), 1e-30)  # 1e-30 * 1e-10 is a float32 denormal (below 1.2e-38)
y = tiny * 1e-10  # 2^20 elements: torch runs it on its thread pool, started here
print("nonzero", int((y != 0).sum()))
"""


@pytest.mark.parametrize("how", ["flush", "trainer"])
def test_denormals_are_flushed_on_every_thread_before_training(how):
    """Adam's state of an always-zero-gradient weight decays into denormals and makes every step slower for good
    (vae.device.flush_denormals): a Trainer, like the CLI and the dashboard's workers, flushes them, on torch's
    thread pool too. Without it the same product is a denormal, not 0."""
    import subprocess
    import sys

    def nonzero(mode):
        out = subprocess.run([sys.executable, "-c", FLUSH_CHECK, mode], capture_output=True, text=True,
                             check=True).stdout
        return out, int(out.split("nonzero")[1])

    out, n = nonzero(how)
    if "supported False" in out:
        pytest.skip("this CPU has no flush-to-zero mode")  # not an x86 CPU with SSE3
    assert n == 0, out
    assert nonzero("none")[1] == 1 << 20  # the reference: denormals, every one


def _chunks_until_diverged(t):
    with pytest.raises(TrainingDiverged) as info:
        for _ in range(1000):
            t.steps(8)
    return info.value


@pytest.mark.parametrize("chunked", [False, True], ids=["step", "steps"])
def test_divergence_names_the_step_that_failed(make_trainer, chunked):
    """The message's step is the one whose loss was not finite; the steps before it are recorded, finite."""
    t = make_trainer({"hidden": (32, 16)}, lr=3e-3)
    for _ in range(5):
        t.step()
    t.update(lr=1e12, beta=100.0)
    err = _step_until_diverged(t) if chunked is False else _chunks_until_diverged(t)
    losses = t.history["step"]["loss"]
    assert err.step == t.step_count + 1 == len(losses) + 1 and all(math.isfinite(v) for v in losses)
    assert f"at step {err.step} " in str(err)


# ---- the test evaluation beside the steps (background_eval: the dashboard's training process) ------------------
@pytest.fixture
def one_thread():
    """torch on one thread, as in a dashboard job (background evaluation is only used there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _where_evaluated(monkeypatch, fail_at_call: int | None = None) -> list[str]:
    """Record the thread each evaluation runs on (and make call number fail_at_call raise)."""
    import threading

    import vae.trainer as trainer_module

    names, real = [], trainer_module.evaluate

    def recording(*args, **kw):
        names.append(threading.current_thread().name)
        if fail_at_call is not None and len(names) == fail_at_call:
            raise RuntimeError("evaluation broke")
        return real(*args, **kw)

    monkeypatch.setattr(trainer_module, "evaluate", recording)
    return names


def _run_in_chunks(t, n=5):
    while not t.done:
        t.steps(n)
        t.settle(wait=False)


def test_background_evaluation_gives_the_same_records_weights_and_steps(make_trainer, one_thread, monkeypatch):
    inline = make_trainer(epochs=4)
    inline.fit()
    where = _where_evaluated(monkeypatch)
    t = make_trainer(epochs=4)
    t.background_eval = True
    _run_in_chunks(t)
    t.close()
    assert len(where) == 4 and all(name.startswith("vae-eval") for name in where)  # none on this thread
    assert _epoch_history_without_timing(t) == _epoch_history_without_timing(inline)  # float for float
    assert t.history["step"] == inline.history["step"]
    wa, wb = t.model.state_dict(), inline.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert t.model.training  # the evaluation ran on a copy: the model being trained never left train mode


def test_background_records_arrive_in_order_and_every_reader_waits_for_them(make_trainer, one_thread):
    t = make_trainer(epochs=3)
    t.background_eval = True
    t.steps(12)  # the first epoch, ending with its evaluation sent off
    assert t.epoch == 1 and len(t.history["epoch"]["epoch"]) <= 1
    assert t.last_epoch()["epoch"] == 1 and t.history["epoch"]["epoch"] == [1]  # last_epoch() waited for it
    t.steps(12)
    t.steps(12)
    state = t.state_dict()  # waits too: a resumable state comes with its whole history
    assert state["history"]["epoch"]["epoch"] == [1, 2, 3]
    assert t.settle() == 0  # nothing left
    assert t.final_metrics()["epochs"] == 3
    t.close()
    t.close()  # twice is harmless


def test_a_failed_background_evaluation_is_raised_when_settling(make_trainer, one_thread, monkeypatch):
    _where_evaluated(monkeypatch, fail_at_call=2)
    t = make_trainer(epochs=3)
    t.background_eval = True
    for _ in range(3):
        t.steps(12)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        t.settle()
    assert t.history["epoch"]["epoch"] == [1]  # the epoch before it is kept
    assert t.settle() == 0 and t.history["epoch"]["epoch"] == [1]  # the third is dropped: no history with a gap
    t.close()


def test_settle_upto_waits_only_for_the_epochs_asked_for(make_trainer, one_thread, monkeypatch):
    import threading

    import vae.trainer as trainer_module

    release, real = threading.Event(), trainer_module.evaluate

    def second_waits(*args, **kw):  # the second epoch's evaluation waits until released
        if threading.current_thread().name.startswith("vae-eval") and second_waits.calls == 1:
            assert release.wait(30)
        second_waits.calls += 1
        return real(*args, **kw)

    second_waits.calls = 0
    monkeypatch.setattr(trainer_module, "evaluate", second_waits)
    t = make_trainer(epochs=2)
    t.background_eval = True
    t.steps(12)
    t.steps(12)
    t.settle(upto=1)  # returns although epoch 2's is still running
    assert t.history["epoch"]["epoch"] == [1]
    release.set()
    t.settle(upto=2)
    assert t.history["epoch"]["epoch"] == [1, 2]
    t.close()


def test_with_more_than_one_thread_the_evaluation_stays_inline(make_trainer, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        where = _where_evaluated(monkeypatch)
        t = make_trainer(epochs=2)
        t.background_eval = True
        _run_in_chunks(t)
        t.close()
    finally:
        torch.set_num_threads(before)
    assert where == ["MainThread", "MainThread"] and t.history["epoch"]["epoch"] == [1, 2]
