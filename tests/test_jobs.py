"""The job registry without Streamlit: the concurrency cap and its FIFO queue, pause/resume/step/stop, NaN and
exceptions in the thread, two sessions' jobs side by side, autosave and restore in a new registry.

Jobs are tiny (digits, the first 64 examples, batch 32: 2 steps per epoch, MLP 16, d = 2) so the file runs in
seconds. Waits poll the job's snapshot with a deadline; nothing sleeps for a fixed time to "let it run".
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import pytest
import torch

from vae.config import TrainConfig
from vae.jobs import (FAILED, FINISHED, INTERRUPTED, PAUSED, QUEUED, RUNNING, STOPPED, JobRegistry, copy_history,
                      default_nice, default_threads, threads_per_job)
from vae.presets import model_config_for


def tc(**kw) -> TrainConfig:
    base = dict(dataset="digits", epochs=3, batch_size=32, max_examples=64, lr=1e-2, seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def mc(**kw):
    base = dict(hidden=(16,), latent_dim=2)
    base.update(kw)
    return model_config_for("digits", **base)


def wait_until(pred, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def paused_run(reg, what="the run", **train):
    """A run submitted paused, once its trainer is there (it holds a place, as a lecturer's paused run does)."""
    job = reg.submit(tc(**train), mc(), start_paused=True)
    wait_until(lambda: job.trainer is not None, what=what)
    return job


@pytest.fixture
def registries():
    made = []

    def make(**kw) -> JobRegistry:
        kw.setdefault("threads", 1)
        r = JobRegistry(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.shutdown()


@contextlib.contextmanager
def ending_like_a_server(**kw):
    """A registry that ends as a server process does (_at_exit: its runs stay resumable, as after a restart), not
    with shutdown(), which would then wait for runs that no longer answer."""
    reg = JobRegistry(threads=1, **kw)
    try:
        yield reg
    finally:
        reg._at_exit()


def test_cap_queues_in_order_and_never_drops(registries):
    reg = registries(max_concurrent=1)
    a = reg.submit(tc(), mc(), name="a", start_paused=True)  # holds the only slot until stopped
    b = reg.submit(tc(epochs=1), mc(), name="b")
    c = reg.submit(tc(epochs=1), mc(), name="c")
    wait_until(lambda: a.trainer is not None, what="a to start")
    assert a.state == PAUSED and len(reg.running()) == 1
    assert (b.snapshot().state, b.snapshot().queue_position) == (QUEUED, 1)
    assert (c.snapshot().state, c.snapshot().queue_position) == (QUEUED, 2)
    a.stop()
    b.join(120)
    c.join(120)
    assert a.state == STOPPED and b.state == FINISHED and c.state == FINISHED
    assert b.snapshot().extra["started"] <= c.snapshot().extra["started"]  # FIFO
    assert c.snapshot().queue_position is None and c.snapshot().epoch == 1


def test_stopping_a_queued_job_removes_it_from_the_queue(registries):
    reg = registries(max_concurrent=1)
    a = reg.submit(tc(), mc(), start_paused=True)
    b = reg.submit(tc(), mc())
    c = reg.submit(tc(epochs=1), mc())
    b.stop()
    assert b.state == STOPPED and c.snapshot().queue_position == 1
    a.stop()
    c.join(120)
    assert c.state == FINISHED and b.trainer is None  # b never ran


def test_a_stop_that_lands_after_the_scheduler_picked_the_run_keeps_it_stopped(registries):
    """The scheduler looks at the queue under the registry's lock, stop() changes the state under the job's: a
    start reached after a stop must not turn the run back to running (its worker would save an untrained model)."""
    reg = registries(max_concurrent=1)
    a = reg.submit(tc(), mc(), start_paused=True)
    b = reg.submit(tc(), mc())
    b.stop()
    assert b._start() is False  # what the scheduler would do had it picked b just before the stop
    assert b.state == STOPPED and b._thread is None and b.trainer is None
    a.stop()
    a.join(120)
    assert b.state == STOPPED and b._thread is None


def test_a_run_paused_past_the_hold_gives_its_place_and_its_resume_waits_for_one(registries):
    """A Step made in a tab since closed must not block the queue for good: paused for pause_hold_s with a run
    waiting, a job gives its place away (its worker stays, paused); Resume puts it back in the queue, and it goes
    on where it stopped once a place is free."""
    reg = registries(max_concurrent=1, pause_hold_s=0.3)
    a = paused_run(reg, "a to start")
    a.step_once(1)
    wait_until(lambda: a.snapshot().step == 1, what="a's step")
    b = reg.submit(tc(epochs=5000), mc(), name="b")  # waits, until a has been paused for the hold
    wait_until(lambda: b.state == RUNNING, timeout=30, what="b to take a's place")
    assert a.state == PAUSED and a.snapshot().extra["released"] and reg.running() == [b]
    a.step_once(1)  # single steps still run without a place
    wait_until(lambda: a.snapshot().step == 2, what="a's second step")
    a.resume()
    assert a.state == QUEUED and a.snapshot().queue_position == 1
    assert a.snapshot().step == 2 and b.state == RUNNING  # a waits: the cap holds
    b.stop()
    assert a.join(120) and a.state == FINISHED and b.state == STOPPED
    snap = a.snapshot()
    assert snap.epoch == 3 and snap.step == 6 and "released" not in snap.extra  # 2 steps per epoch


def test_a_pause_made_while_a_run_waits_is_timed_too_and_a_step_starts_the_hold_again(registries):
    """The usual order (a run waits, then the one holding the place is paused and left): the pause itself has the
    scheduler time the hold. A Step during the hold starts it again, and the timer then fires a second time."""
    reg = registries(max_concurrent=1, pause_hold_s=1.0)
    a = reg.submit(tc(epochs=5000), mc(), name="a")
    wait_until(lambda: a.snapshot().step > 0, what="a to run")
    b = reg.submit(tc(epochs=5000), mc(), name="b")
    assert b.state == QUEUED
    a.pause()
    t_paused = time.monotonic()
    time.sleep(0.5)  # half the hold: a Step restarts it
    a.step_once(1)
    t_stepped = time.monotonic()
    wait_until(lambda: b.state == RUNNING, timeout=30, what="b to get a's place")
    assert time.monotonic() - t_stepped >= 1.0 and time.monotonic() - t_paused >= 1.5
    assert a.state == PAUSED and a._released
    a.resume()  # back in line: b holds the only place
    assert a.state == QUEUED and a.snapshot().queue_position == 1
    a.pause()  # paused again while it waits: out of the queue at once
    assert a.state == PAUSED and a.snapshot().queue_position is None
    for j in (a, b):
        j.stop()
        assert j.join(60) and j.state == STOPPED


def test_a_short_pause_keeps_its_place(registries):
    reg = registries(max_concurrent=1, pause_hold_s=60)
    a = paused_run(reg, "a to start")
    b = reg.submit(tc(epochs=1), mc(), name="b")
    reg._schedule()  # as any start, end or stop would: a pause shorter than the hold gives nothing away
    assert (a.state, b.state) == (PAUSED, QUEUED) and reg.running() == [a] and not a._released
    a.resume()
    assert a.join(120) and b.join(120) and (a.state, b.state) == (FINISHED, FINISHED)


def test_pause_step_resume_stop(registries):
    reg = registries()
    job = reg.submit(tc(epochs=5000), mc(), start_paused=True)  # never ends by itself during the test
    wait_until(lambda: job.trainer is not None, what="the trainer")
    assert job.snapshot().step == 0 and job.state == PAUSED
    job.step_once(3)
    wait_until(lambda: job.snapshot().step == 3, what="3 single steps")
    time.sleep(0.05)
    assert job.snapshot().step == 3 and job.state == PAUSED  # stays paused after the steps
    job.set_delay(0.002)
    job.resume()
    assert job.state == RUNNING
    wait_until(lambda: job.snapshot().step >= 10, what="steps after resume")
    job.pause()
    s1 = job.snapshot().step
    time.sleep(0.05)
    assert job.snapshot().step == s1 and job.state == PAUSED
    job.stop()
    job.join(60)
    snap = job.snapshot()
    assert snap.state == STOPPED and snap.step == s1 and not snap.active
    assert job.checkpoint()["state_dict"]  # a stopped run's weights stay savable


def test_live_rate_and_eta_while_running(registries):
    reg = registries()
    job = reg.submit(tc(epochs=200), mc())
    job.set_delay(0.001)
    wait_until(lambda: job.snapshot().step >= 20, what="20 steps")
    snap = job.snapshot()
    assert snap.samples_per_s and snap.samples_per_s > 0
    assert snap.eta_s is not None and snap.eta_s > 0
    job.pause()
    assert job.snapshot().eta_s is None  # no ETA while paused


def test_update_marks_an_event_and_rejects_bad_changes(registries):
    reg = registries()
    job = reg.submit(tc(epochs=5), mc(), start_paused=True)
    wait_until(lambda: job.trainer is not None, what="the trainer")
    job.step_once(2)
    wait_until(lambda: job.snapshot().step == 2, what="2 steps")
    text = job.update(beta=2.5, lr=5e-3)
    assert "beta" in text and "lr" in text
    ev = job.snapshot().history["events"]
    assert ev == [{"step": 2, "epoch": 1, "text": text}]
    job.step_once()
    wait_until(lambda: job.snapshot().step == 3, what="a step with the new beta")
    assert job.snapshot().history["step"]["beta"][-1] == 2.5
    with pytest.raises(ValueError, match="batch_size"):
        job.update(batch_size=8)
    with pytest.raises(ValueError, match="beta"):
        job.update(beta=-1.0)
    with pytest.raises(ValueError, match="delay"):
        job.set_delay(11)


def test_nan_ends_the_job_as_failed_with_the_last_good_weights(registries):
    reg = registries()
    job = reg.submit(tc(epochs=5000, batch_size=64), mc(), start_paused=True)  # 1 step = 1 epoch
    job.step_once()
    wait_until(lambda: job.snapshot().epoch == 1, what="epoch 1")
    job.update(lr=1e12, beta=100.0)  # diverges within a few steps
    good = {k: v.clone() for k, v in job.latest_weights()[1].items()}
    for _ in range(100):
        n = job.snapshot().step
        job.step_once()
        wait_until(lambda: job.snapshot().step > n or job.state == FAILED, what="a step or the failure")
        if job.state == FAILED:
            break
        good = {k: v.clone() for k, v in job.latest_weights()[1].items()}  # each step ends an epoch: good
    job.join(60)
    snap = job.snapshot()
    assert snap.state == FAILED and snap.extra["failed_step"] == snap.step + 1  # the step that failed: not counted
    assert f"step {snap.step + 1} " in snap.error and "lr" in snap.error
    _, weights, _ = job.latest_weights()
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert all(torch.equal(weights[k], good[k]) for k in good)  # the end of the last good epoch, restored
    assert job.checkpoint()["state_dict"]  # and savable


def test_an_exception_in_the_thread_is_reported(registries):
    reg = registries()
    wrong = model_config_for("moons")  # input_dim 2: does not fit digits (64)
    job = reg.submit(tc(), wrong)
    job.join(120)
    snap = job.snapshot()
    assert snap.state == FAILED and "does not match dataset" in snap.error
    assert snap.error.startswith("ValueError") and "Traceback" in snap.extra["traceback"]
    assert not reg.running()  # the slot is free again


def test_two_sessions_each_with_their_own_job(registries):
    reg = registries()  # one process-wide registry, two users
    mine = reg.submit(tc(epochs=500), mc(), name="session-1")
    theirs = reg.submit(tc(epochs=500), mc(), name="session-2")
    mine.set_delay(0.002)
    theirs.set_delay(0.002)
    wait_until(lambda: mine.snapshot().step > 3 and theirs.snapshot().step > 3, what="both to train")
    mine.stop()
    mine.join(60)
    before = theirs.snapshot().step
    wait_until(lambda: theirs.snapshot().step > before + 5, what="the other job to go on")
    assert mine.state == STOPPED and theirs.state == RUNNING
    assert copy_history(theirs.trainer.history)["step"]["step"][-1] >= before + 5


def test_snapshot_is_a_consistent_copy(registries):
    reg = registries()
    job = reg.submit(tc(epochs=4), mc())
    job.join(120)
    snap = job.snapshot()
    lengths = {len(v) for v in snap.history["step"].values()}
    assert lengths == {8} and len(snap.history["epoch"]["test_elbo"]) == 4
    snap.history["step"]["loss"].clear()
    assert len(job.snapshot().history["step"]["loss"]) == 8


def test_autosave_then_a_new_registry_restores_and_resumes(registries, tmp_path):
    reg = registries(autosave_dir=tmp_path, autosave_interval_s=0)  # every epoch, however short
    job = reg.submit(tc(epochs=4), mc(), name="survivor", start_paused=True)
    wait_until(lambda: job.trainer is not None, what="the trainer")
    job.set_delay(0.002)  # a lecture's slow motion: it comes back with the run
    job.update(beta=0.5)  # a mid-run change: an event on the curves
    job.step_once(4)  # two epochs, each autosaved
    wait_until(lambda: job.snapshot().epoch == 2, what="2 epochs")
    reg.flush()
    weights_at_2 = job.latest_weights()[1]
    history_at_2 = job.snapshot().history
    assert (tmp_path / f"{job.id}.pt").is_file() and job.event_count() == 1

    restarted = registries(autosave_dir=tmp_path)  # a new server process on the same folder
    back = restarted.get(job.id)
    assert back.event_count() == 1  # asked before anything else: the restored history is attached for it
    assert back is not None and back.name == "survivor" and back.state == INTERRUPTED and back.has_weights
    assert back.delay_s == 0.002
    snap = back.snapshot()
    assert snap.epoch == 2 and snap.step == 4
    assert snap.history["epoch"]["test_elbo"] == history_at_2["epoch"]["test_elbo"]
    restored = back.latest_weights()[1]
    assert all(torch.equal(restored[k], weights_at_2[k]) for k in weights_at_2)
    back.resume()
    back.join(120)
    assert back.state == FINISHED and back.snapshot().epoch == 4
    assert len(back.snapshot().history["epoch"]["test_elbo"]) == 4


def test_a_slow_motion_set_mid_epoch_survives_a_restart(tmp_path):
    """The lecturer's 2 s per step is kept at once, not at the next epoch end (an epoch of such steps away)."""
    with ending_like_a_server(autosave_dir=tmp_path, autosave_interval_s=3600) as reg:  # the first epoch's only
        job = reg.submit(tc(epochs=5000, max_examples=256), mc())
        wait_until(lambda: job.snapshot().epoch >= 1, what="an epoch")
        reg.flush()
        job.set_delay(2.0)  # as if the next epoch end were an hour away
        reg.flush()
    with ending_like_a_server(autosave_dir=tmp_path) as again:
        assert again.get(job.id).delay_s == 2.0


def test_a_slow_motion_set_before_the_first_epoch_end_writes_no_resumable_file(tmp_path):
    """Before its first epoch end a run has no resumable state: the mirror's (no Adam state, the seed's generator)
    must not be saved as one; its pending file keeps the delay."""
    with ending_like_a_server(autosave_dir=tmp_path) as reg:
        job = reg.submit(tc(epochs=4, max_examples=640), mc(), start_paused=True)  # 20 steps an epoch
        wait_until(lambda: job.trainer is not None, what="the trainer")
        job.step_once(3)
        wait_until(lambda: job.snapshot().step == 3, what="3 steps")
        job.set_delay(0.5)
        reg.flush()
        assert not (tmp_path / f"{job.id}.pt").exists() and (tmp_path / f"{job.id}.pending.json").exists()
    with ending_like_a_server(autosave_dir=tmp_path) as again:
        back = again.get(job.id)
        assert back.delay_s == 0.5 and back.state == INTERRUPTED and back.snapshot().extra.get("not_started")


def test_restored_ended_jobs_keep_their_state_and_a_stopped_interrupted_one_stays_stopped(registries, tmp_path):
    reg = registries(autosave_dir=tmp_path, autosave_interval_s=0)
    done = reg.submit(tc(epochs=1), mc(), name="done")
    half = reg.submit(tc(epochs=4), mc(), name="half", start_paused=True)
    done.join(120)
    wait_until(lambda: half.trainer is not None, what="the trainer")
    half.step_once(2)
    wait_until(lambda: half.snapshot().epoch == 1, what="1 epoch")
    reg.flush()
    second = registries(autosave_dir=tmp_path)
    assert second.get(done.id).state == FINISHED and second.get(done.id).checkpoint()["metrics"]
    assert second.get(half.id).state == INTERRUPTED
    second.get(half.id).stop()
    third = registries(autosave_dir=tmp_path)
    assert third.get(half.id).state == STOPPED
    third.remove(done.id)
    assert not (tmp_path / f"{done.id}.pt").exists()


def test_a_restored_run_that_cannot_be_attached_stays_stopped_once_stopped(registries, tmp_path, monkeypatch):
    """Its dataset gone after the restart: the run is listed with the reason, and a Stop is kept in its file."""
    import vae.jobs

    with ending_like_a_server(autosave_dir=tmp_path, autosave_interval_s=0) as reg:
        job = reg.submit(tc(epochs=4), mc(), name="orphan", start_paused=True)
        wait_until(lambda: job.trainer is not None, what="the trainer")
        job.step_once(2)
        wait_until(lambda: job.snapshot().epoch == 1, what="1 epoch")
        reg.flush()

    def gone(*args, **kwargs):
        raise OSError("the dataset's files are gone")

    monkeypatch.setattr(vae.jobs, "Trainer", gone)
    second = registries(autosave_dir=tmp_path)
    back = second.get(job.id)
    assert back.state == INTERRUPTED
    assert "the dataset's files are gone" in back.snapshot().extra["restore_error"] and not back.has_weights
    back.resume()  # it cannot run: failed here, but the file stays resumable for when the data is back
    assert back.join(60) and back.state == FAILED and "could not be restored" in back.error
    assert registries(autosave_dir=tmp_path).get(job.id).state == INTERRUPTED
    back.stop()
    assert "autosave_error" not in back.snapshot().extra
    again = registries(autosave_dir=tmp_path).get(job.id)
    assert again.state == INTERRUPTED  # (a failed run's Stop changes nothing)
    again.snapshot()  # attach: fails again, still patched
    again.stop()
    assert again.state == STOPPED and "autosave_error" not in again.snapshot().extra
    monkeypatch.undo()
    third = registries(autosave_dir=tmp_path)
    assert third.get(job.id).state == STOPPED and third.get(job.id).has_weights


def test_a_queued_run_survives_a_restart_and_a_stopped_queued_one_does_not(registries, tmp_path):
    """A queued run has no autosave (no trainer yet): a small pending file brings it back, never dropped."""
    reg = registries(autosave_dir=tmp_path, max_concurrent=1)
    holder = paused_run(reg, "the holder to start")
    waiting = reg.submit(tc(epochs=1), mc(hidden=(16,)), name="waiting")
    gone = reg.submit(tc(epochs=1), mc(), name="gone")
    assert (waiting.state, gone.state) == (QUEUED, QUEUED)
    gone.stop()  # stopped before it started: not offered again
    restarted = registries(autosave_dir=tmp_path, max_concurrent=1)  # the first server died with them in place
    back = restarted.get(waiting.id)
    assert back is not None and back.name == "waiting" and back.state == INTERRUPTED
    assert back.snapshot().extra["not_started"] and back.model_config.hidden == (16,)
    assert restarted.get(gone.id) is None
    back.resume()  # starts it from its first step
    back.join(120)
    assert back.state == FINISHED and back.snapshot().epoch == 1
    assert not (tmp_path / f"{waiting.id}.pending.json").exists()  # it has its autosave now
    assert restarted.get(holder.id).state == INTERRUPTED  # paused before its first epoch: back too
    third = registries(autosave_dir=tmp_path, max_concurrent=1)
    assert third.get(waiting.id).state == FINISHED  # its autosave, not the pending file, is what comes back


def test_settings_changed_before_a_run_starts_survive_a_restart(registries, tmp_path):
    reg = registries(autosave_dir=tmp_path, max_concurrent=1)
    paused_run(reg, "the holder to start")
    waiting = reg.submit(tc(epochs=1), mc())
    assert waiting.update(beta=3.0, grad_clip=5.0) == "beta: 1.0 -> 3.0, grad_clip: 0.0 -> 5.0"
    waiting.set_delay(0.25)
    with pytest.raises(ValueError, match="bogus: not a training option"):
        waiting.update(bogus=1)
    back = registries(autosave_dir=tmp_path, max_concurrent=1).get(waiting.id)
    assert (back.train_config.beta, back.train_config.grad_clip, back.delay_s) == (3.0, 5.0, 0.25)


def test_a_resumed_run_stopped_while_it_waits_in_the_queue_is_not_offered_again(registries, tmp_path):
    reg = registries(autosave_dir=tmp_path, autosave_interval_s=0)
    job = paused_run(reg, epochs=4)
    job.step_once(2)
    wait_until(lambda: job.snapshot().epoch == 1, what="1 epoch")
    reg.flush()
    second = registries(autosave_dir=tmp_path, max_concurrent=1)
    paused_run(second, "the holder to start")  # the only place, taken
    back = second.get(job.id)
    back.resume()  # interrupted -> queued behind the holder
    assert back.state == QUEUED
    back.stop()
    assert registries(autosave_dir=tmp_path).get(job.id).state == STOPPED


def test_no_queued_run_starts_while_the_server_exits(registries):
    reg = registries(max_concurrent=1)
    holder = paused_run(reg, "the holder to start")
    queued = reg.submit(tc(epochs=1), mc())
    reg._exiting = True  # as _at_exit sets it: the holder's end must not start the queued run
    holder.stop()
    holder.join(60)
    time.sleep(0.3)
    assert queued.state == QUEUED and queued._thread is None
    reg._exiting = False


def test_autosaves_of_short_epochs_are_spaced_but_the_end_is_always_saved(registries, tmp_path):
    import torch as _torch

    reg = registries(autosave_dir=tmp_path, autosave_interval_s=3600)
    job = reg.submit(tc(epochs=3), mc())  # 2 steps an epoch: all within the interval
    assert job.join(120)
    saved = _torch.load(tmp_path / f"{job.id}.pt", weights_only=True)
    assert saved["job"]["state"] == FINISHED and saved["job"]["trainer_state"]["epoch"] == 3
    assert saved["job"]["train_wall"]["steps"] == 6


def test_a_paused_run_is_saved_at_its_last_epoch_end_and_resumes_from_there_after_a_restart(registries, tmp_path):
    """An epoch that ends within the autosave interval is not saved while the run goes on; once the run waits,
    paused, its last epoch end is, so that a restart in a long pause loses only the epoch under way."""
    from vae.checkpoint import CheckpointError, read_checkpoint
    from vae.jobs import INTERRUPTED

    with ending_like_a_server(autosave_dir=tmp_path, autosave_interval_s=3600) as reg:
        job = reg.submit(tc(epochs=3), mc(), start_paused=True)
        wait_until(lambda: job.trainer is not None, what="the trainer")
        job.step_once(5)  # epoch 1 ends at step 2 (saved: the first), epoch 2 at step 4 (within the interval), then 1
        wait_until(lambda: job.snapshot().step == 5, what="5 steps")

        def saved_state():
            reg.flush()
            try:  # read_checkpoint: the per-step lists come back as lists
                return read_checkpoint(tmp_path / f"{job.id}.pt")["job"]["trainer_state"]
            except CheckpointError:
                return None

        wait_until(lambda: (saved_state() or {}).get("epoch") == 2, what="epoch 2's end saved once paused")
        state = saved_state()
        h = state["history"]
        assert state["step_count"] == 4 and h["step"]["step"] == [1, 2, 3, 4]  # up to that epoch end, not step 5
        assert h["epoch"]["epoch"] == [1, 2]
    # the registry has ended as a server process does (a restart), with the run paused
    back = registries(autosave_dir=tmp_path, autosave_interval_s=3600).get(job.id)
    assert back is not None and back.state == INTERRUPTED and back.snapshot().step == 4
    back.resume()
    assert back.join(120)
    h = back.snapshot().history
    assert h["step"]["step"] == [1, 2, 3, 4, 5, 6] and h["epoch"]["epoch"] == [1, 2, 3]  # each step once


def test_a_status_snapshot_can_skip_the_step_curves(registries):
    reg = registries()
    job = reg.submit(tc(epochs=2), mc())
    assert job.join(120)
    light, full = job.snapshot(steps=False), job.snapshot()
    assert light.history["step"]["loss"] == [] and len(full.history["step"]["loss"]) == 4
    assert light.history["epoch"] == full.history["epoch"] and light.step == full.step == 4


def test_remove_refuses_an_active_job(registries):
    reg = registries()
    job = reg.submit(tc(), mc(), start_paused=True)
    with pytest.raises(ValueError, match="stop it"):
        reg.remove(job.id)


def test_bad_settings_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="at least 1"):
        JobRegistry(max_concurrent=0)
    monkeypatch.setenv("VAE_JOB_THREADS", "lots")
    with pytest.raises(ValueError, match="VAE_JOB_THREADS"):
        default_threads()
    monkeypatch.setenv("VAE_JOB_THREADS", "0")
    with pytest.raises(ValueError, match="VAE_JOB_THREADS='0' is not allowed"):
        JobRegistry(restore=False, warm_up=False)
    monkeypatch.setenv("VAE_JOB_THREADS", "3")
    assert default_threads() == 3
    assert JobRegistry(restore=False, warm_up=False).job_threads() == 3
    monkeypatch.delenv("VAE_JOB_THREADS")
    assert default_threads() is None
    monkeypatch.setenv("VAE_JOB_NICE", "-5")
    with pytest.raises(ValueError, match="VAE_JOB_NICE"):
        JobRegistry(restore=False, warm_up=False)
    monkeypatch.setenv("VAE_JOB_NICE", "4")
    assert default_nice() == 4
    monkeypatch.delenv("VAE_JOB_NICE")
    assert default_nice() == 10
    with pytest.raises(ValueError, match="nice=-1"):
        JobRegistry(restore=False, warm_up=False, nice=-1)


def test_threads_per_job_share_the_cores():
    assert threads_per_job(1, cores=8) == 7  # alone: all but one, which the server and the browser keep
    assert threads_per_job(2, cores=8) == 3
    assert threads_per_job(1, cores=2) == 1
    assert threads_per_job(3, cores=2) == 1  # never zero
    assert threads_per_job(0, cores=1) == 1


def test_workers_run_at_lower_priority_and_share_the_cores(registries, tmp_path, monkeypatch):
    monkeypatch.delenv("VAE_JOB_THREADS", raising=False)
    reg = registries(max_concurrent=2, autosave_dir=tmp_path, restore=False, warm_up=False, nice=5, threads=None)
    assert reg.threads is None
    alone, half = threads_per_job(1), threads_per_job(2)
    a = reg.submit(tc(epochs=5000), mc())
    wait_until(lambda: a.snapshot().extra.get("threads") == alone, what="job a to train on its cores")
    assert a.snapshot().extra["pid"] != os.getpid()  # in a process of its own
    nice_a = os.getpriority(os.PRIO_PROCESS, a.snapshot().extra["pid"]) if hasattr(os, "getpriority") else None
    b = reg.submit(tc(epochs=5000), mc())
    wait_until(lambda: a.snapshot().extra.get("threads") == half and b.snapshot().extra.get("threads") == half,
               what="both jobs to share the cores")
    b.stop()
    b.join(30)
    wait_until(lambda: a.snapshot().extra.get("threads") == alone, what="job a to take the cores again")
    a.stop()
    a.join(30)
    if nice_a is not None:
        assert nice_a >= min(19, os.nice(0) + 5)  # at least that much lower (the worker server may be lower still)

def test_the_snapshot_says_which_rate_it_shows(registries):
    """The live rate while it runs (slow-motion pauses included); once it has ended, the last epoch's steps alone."""
    reg = registries()
    job = reg.submit(tc(epochs=2), mc())
    wait_until(lambda: job.snapshot().step > 2 or not job.snapshot().active, what="a few steps")
    job.join(120)
    snap = job.snapshot(steps=False)
    assert snap.state == FINISHED and not snap.live_rate
    assert snap.samples_per_s == snap.history["epoch"]["samples_per_s"][-1]
    slow = reg.submit(tc(epochs=50), mc())
    slow.set_delay(0.02)  # a lecture's pace: the live rate counts the pauses
    wait_until(lambda: slow.snapshot(steps=False).step >= 8, what="8 slow steps")
    live = slow.snapshot(steps=False)
    assert live.state == RUNNING and live.live_rate and live.samples_per_s < 64 / 0.02
    slow.stop()


def test_the_autosave_writer_rests_after_a_save_but_a_flush_does_not_wait(tmp_path, monkeypatch):
    import vae.jobs as jobs_module

    written = []

    def slow_save(path, ckpt):
        time.sleep(0.02)
        written.append(ckpt["n"])

    monkeypatch.setattr(jobs_module, "save_checkpoint", slow_save)
    w = jobs_module._AutosaveWriter()
    w.REST_FACTOR = 200.0  # at least 4 s of rest after a 0.02 s save
    w.put(tmp_path / "a.pt", {"n": 1}, None)
    wait_until(lambda: written == [1], 30, "the first save")
    w.put(tmp_path / "a.pt", {"n": 2}, None)
    w.put(tmp_path / "a.pt", {"n": 3}, None)  # replaces 2: only the newest is kept
    time.sleep(0.5)
    assert written == [1]  # resting
    w.flush()
    assert written == [1, 3]


def test_the_autosave_writer_takes_the_file_waiting_longest_first(tmp_path, monkeypatch):
    import threading

    import vae.jobs as jobs_module

    written, gate = [], threading.Event()

    def save(path, ckpt):
        if ckpt["n"] == "x":
            assert gate.wait(30)  # busy with x while the others come in
        written.append(ckpt["n"])

    monkeypatch.setattr(jobs_module, "save_checkpoint", save)
    w = jobs_module._AutosaveWriter()
    w.REST_FACTOR = 0.0
    w.put(tmp_path / "x.pt", {"n": "x"}, None)
    wait_until(lambda: w._busy, 30, "the writer busy with x")
    w.put(tmp_path / "a.pt", {"n": "a1"}, None)
    w.put(tmp_path / "b.pt", {"n": "b"}, None)
    w.put(tmp_path / "a.pt", {"n": "a2"}, None)  # a's newer state keeps a's place in the line
    gate.set()
    w.flush()
    assert written == ["x", "a2", "b"]  # with the newest first, a job saved as often as b could wait for ever


def test_a_change_after_the_saved_epoch_end_is_not_paired_with_its_state_after_a_restart(registries, tmp_path):
    """A pause saves the last epoch end's state: the file's settings, weights and events are that state's, so a
    change made after it (mid-epoch) is not restored with the older optimizer. The run's owner comes back too."""
    from vae.checkpoint import read_checkpoint

    with ending_like_a_server(autosave_dir=tmp_path, autosave_interval_s=3600) as reg:
        job = reg.submit(tc(epochs=3), mc(), start_paused=True, owner="browser-1")
        wait_until(lambda: job.trainer is not None, what="the trainer")
        job.step_once(3)  # epoch 1 ends at step 2 (its state saved); step 3, then paused
        wait_until(lambda: job.snapshot().step == 3, what="3 steps")
        job.update(lr=1e-4)  # after the saved epoch end
        job.step_once(1)  # epoch 2 ends at step 4: its state (with lr 1e-4) is the paused run's save
        wait_until(lambda: job.snapshot().step == 4, what="4 steps")
        job.update(lr=5e-5)
        job.step_once(1)  # step 5, mid-epoch 3, then paused again: epoch 2's end is what the file holds

        def saved():
            reg.flush()
            try:
                return read_checkpoint(tmp_path / f"{job.id}.pt")
            except Exception:
                return None

        wait_until(lambda: (saved() or {}).get("job", {}).get("trainer_state", {}).get("epoch") == 2,
                   what="epoch 2 saved")
        ck = saved()
        assert ck["train_config"]["lr"] == ck["job"]["trainer_state"]["train_config"]["lr"] == 1e-4  # not 5e-5
        assert [e["step"] for e in ck["history"]["events"]] == [3]  # the lr 1e-4 change, not the later one
        sd, ws = ck["state_dict"], ck["job"]["trainer_state"]["model"]
        assert all(torch.equal(sd[k], ws[k]) for k in ws)  # the file's weights are the state's
        assert ck["job"]["owner"] == "browser-1"
    # the registry has ended as a server process does (a restart), with the run paused
    back = registries(autosave_dir=tmp_path).get(job.id)
    assert back.owner == "browser-1" and back.train_config.lr == 1e-4
