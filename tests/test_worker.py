"""The training worker process behind dashboard jobs (vae.worker), and how a job survives its worker's loss."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from test_jobs import mc, registries, tc, wait_until  # noqa: F401  (registries is a fixture)
from vae.jobs import FAILED
from vae.trainer import Trainer
from vae.worker import _Worker, pack, unpack


class FakePipe:
    """The worker's end of the pipe: commands queued in advance, messages kept."""

    def __init__(self, commands=()):
        self.commands, self.sent = list(commands), []

    def poll(self, timeout=0):
        return bool(self.commands)

    def recv(self):  # a worker waiting while paused, with nothing more to do, gets a stop
        return self.commands.pop(0) if self.commands else (99, "stop")

    def send_bytes(self, data):
        self.sent.append(unpack(data))


def test_resumable_states_are_sent_only_at_epoch_ends():
    t = Trainer(tc(epochs=3, max_examples=160), mc())  # 5 steps per epoch
    pipe = FakePipe()
    w = _Worker(pipe, t, {"delay_s": 1e-4, "autosave_interval_s": 0.0})  # slow motion: a sync after every step
    assert w.run() == "finished"
    w.close()  # the sender thread has sent everything
    syncs = [p for kind, p in pipe.sent if kind == "sync"]
    assert len(syncs) == 1 + t.step_count  # the first one, then one per step
    full = [p["full"]["step_count"] for p in syncs if "full" in p]
    assert full == [5, 10, 15]
    # the syncs together carry the whole history, once
    steps = [s for p in syncs for s in p["steps"]["step"]]
    assert steps == t.history["step"]["step"]
    assert [e for p in syncs for e in p["epochs"]["epoch"]] == [1, 2, 3]
    assert all("weights" in p for p in syncs)  # in slow motion every sync carries the weights


def test_commands_are_handled_between_steps_and_acknowledged():
    t = Trainer(tc(epochs=50), mc())
    pipe = FakePipe([(1, "step", 3), (2, "update", {"beta": 2.0})])
    w = _Worker(pipe, t, {"paused": True})
    assert w.run() == "stopped"  # 3 single steps, then it waits (paused), then the stop
    w.close()
    assert t.step_count == 3 and t.config.beta == 2.0
    assert t.history["events"] == [{"step": 0, "epoch": 0, "text": "beta: 1.0 -> 2.0"}]
    assert [s for s in t.history["step"]["beta"]] == [2.0] * 3
    assert pipe.sent[-1][1]["ack"] == 99 and pipe.sent[-1][1]["paused"]


def test_pack_unpack_round_trip_refuses_code():
    obj = {"a": torch.arange(3), "b": [1.5, "x", None, (1, 2)]}
    back = unpack(pack(obj))
    assert torch.equal(back["a"], obj["a"]) and back["b"] == obj["b"]

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with pytest.raises(Exception):
        unpack(pack(Evil()))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_killed_worker_fails_the_job_and_keeps_consistent_weights(registries, tmp_path):  # noqa: F811
    reg = registries(autosave_dir=tmp_path, autosave_interval_s=0)
    job = reg.submit(tc(epochs=5000), mc())
    job.set_delay(0.002)
    wait_until(lambda: job.snapshot().epoch >= 2 and "pid" in job.snapshot().extra, what="two epochs")
    os.kill(job.snapshot().extra["pid"], signal.SIGINT)  # a Ctrl-C in the terminal: ignored by the worker
    steps = job.snapshot().step
    wait_until(lambda: job.snapshot().step > steps + 3, what="training to go on after SIGINT")
    os.kill(job.snapshot().extra["pid"], signal.SIGKILL)
    assert job.join(60)
    snap = job.snapshot()
    assert snap.state == FAILED and "ended unexpectedly" in snap.error
    ck = job.checkpoint()
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())
    reg.flush()
    saved = torch.load(tmp_path / f"{job.id}.pt", weights_only=True)
    state = saved["job"]["trainer_state"]
    assert saved["job"]["state"] == FAILED
    assert state["step_count"] == len(state["history"]["step"]["step"]) == snap.step
    assert all(torch.equal(state["model"][k], saved["state_dict"][k]) for k in saved["state_dict"])
