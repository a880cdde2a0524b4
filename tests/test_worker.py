"""The training worker process behind dashboard jobs (vae.worker), and how a job survives its worker's loss."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from test_jobs import mc, registries, tc, wait_until  # noqa: F401  (registries is a fixture)
from vae.jobs import FAILED
from vae.trainer import Trainer
from vae.worker import SLOW_WEIGHTS_S, _Worker, pack, unpack


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

    def close(self):
        pass


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
    # at this pace (1e-4 s a step) the weights go with the first sync and the resumable states only (the run takes
    # well under WEIGHTS_S), not with each step's
    assert [i for i, p in enumerate(syncs) if "weights" in p] == [0, 5, 10, 15]


def test_slow_motion_of_a_tenth_of_a_second_sends_the_weights_after_every_step():
    t = Trainer(tc(epochs=1, max_examples=96), mc())  # 3 steps
    pipe = FakePipe()
    w = _Worker(pipe, t, {"delay_s": SLOW_WEIGHTS_S, "autosave_interval_s": 60.0})
    assert w.run() == "finished"
    w.close()
    syncs = [p for kind, p in pipe.sent if kind == "sync"]
    assert len(syncs) == 1 + t.step_count and all("weights" in p for p in syncs)


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


SERVER_EXIT = r"""
import sys, time
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from test_jobs import mc, tc
from vae.jobs import JobRegistry

if __name__ == "__main__":
    reg = JobRegistry(autosave_dir=sys.argv[1], autosave_interval_s=0, threads=1)
    job = reg.submit(tc(epochs=5000), mc(), name="survivor")
    job.set_delay(0.002)
    deadline = time.monotonic() + 120
    while job.snapshot().epoch < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    reg.flush()
    print(job.id, flush=True)
    sys.exit(0)  # the server goes away with the run still going (as on Ctrl-C or a restart)
"""


def test_a_server_exit_leaves_a_running_job_resumable(tmp_path, registries):  # noqa: F811
    import subprocess
    import sys
    from pathlib import Path

    from vae.jobs import INTERRUPTED

    root, tests = Path(__file__).resolve().parent.parent, Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", SERVER_EXIT, str(tmp_path), str(root), str(tests)],
                         capture_output=True, text=True, timeout=180, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    job_id = out.stdout.split()[-1]
    back = registries(autosave_dir=tmp_path).get(job_id)
    assert back is not None and back.state == INTERRUPTED and back.has_weights  # not "failed"
    snap = back.snapshot()
    assert snap.epoch >= 3 and snap.step == snap.epoch * snap.steps_per_epoch  # saved at an epoch end
    back.resume()
    wait_until(lambda: back.snapshot().step > snap.step, what="the resumed run to go on")
    back.stop()
    assert back.join(60)


def test_a_worker_does_not_rerun_the_servers_main_script(registries, tmp_path, monkeypatch):  # noqa: F811
    """Under `streamlit run`, sys.modules["__main__"] is app.py: a worker process must not run it again."""
    import sys
    import types
    from multiprocessing import spawn

    from vae.jobs import worker_context

    marker = tmp_path / "ran"
    script = tmp_path / "app_like.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    fake_main = types.ModuleType("__main__")
    fake_main.__file__, fake_main.__spec__ = str(script), None
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    worker_context()  # installs the guard
    assert "init_main_from_path" in spawn.get_preparation_data("some-other-process")  # others keep the default
    assert "init_main_from_path" not in spawn.get_preparation_data("vae-job-1234")
    reg = registries()
    job = reg.submit(tc(epochs=1), mc())
    assert job.join(120) and job.snapshot().state == "finished"
    assert not marker.exists()


def test_at_full_speed_commands_are_looked_for_every_few_ms_not_every_step():
    """A pipe's poll() costs ~30 µs (3 % of a 1 ms step): at full speed the worker looks every COMMAND_POLL_S, and
    still stops soon."""
    import time

    from vae.worker import COMMAND_POLL_S

    class CountingPipe(FakePipe):
        polls = 0

        def poll(self, timeout=0):
            self.polls += 1
            if self.polls == 3:  # a Stop arrives while it runs
                self.commands.append((7, "stop"))
            return super().poll(timeout)

    t = Trainer(tc(epochs=500, max_examples=64, batch_size=8), mc())  # small steps, far more than 3 polls' worth
    pipe = CountingPipe()
    w = _Worker(pipe, t, {})
    t0 = time.monotonic()
    assert w.run() == "stopped"
    elapsed = time.monotonic() - t0
    w.close()
    assert pipe.polls <= 4 and t.step_count > pipe.polls  # several steps between looks
    assert elapsed < 20 * COMMAND_POLL_S + 1.0  # the stop took effect within a few polls, not at the end
    assert pipe.sent[-1][1]["ack"] == 7


def test_a_command_sent_during_the_last_steps_is_handled_before_the_end():
    class LatePipe(FakePipe):
        def poll(self, timeout=0):
            if t.done and not self.late_sent:  # arrives after the last look at full speed
                self.late_sent = True
                self.commands.append((5, "update", {"lr": 0.5}))
            return super().poll(timeout)

    t = Trainer(tc(epochs=1, max_examples=64), mc())
    pipe = LatePipe()
    pipe.late_sent = False
    w = _Worker(pipe, t, {})
    assert w.run() == "finished"
    w.close()
    assert pipe.late_sent and t.config.lr == 0.5 and pipe.commands == []


def test_with_background_evaluation_each_resumable_state_comes_with_its_epochs():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as a dashboard job runs: the test evaluations go to a thread of their own
    try:
        t = Trainer(tc(epochs=6, max_examples=160), mc(), background_eval=True)  # 5 steps per epoch
        pipe = FakePipe()
        w = _Worker(pipe, t, {"autosave_interval_s": 0.0})  # full speed, a resumable state at every epoch end
        assert w.run() == "finished"
        t.close()  # as worker_main ends: the last evaluations, then the end message with the final state
        w.sync(full=True, kind="end", end={"state": "finished"})
        w.close()
    finally:
        torch.set_num_threads(before)
    syncs = [p for kind, p in pipe.sent]
    assert [kind for kind, _ in pipe.sent][-1] == "end"
    sent = 0
    for p in syncs:
        sent += len(p["epochs"]["epoch"])
        if "full" in p:  # the parent's history is whole at each autosave: the state's epochs have all come
            assert sent == p["full"]["epoch"]
    assert [e for p in syncs for e in p["epochs"]["epoch"]] == [1, 2, 3, 4, 5, 6]


def test_an_epoch_end_autosave_does_not_wait_for_its_own_test_evaluation(monkeypatch):
    """With epochs longer than the autosave interval every epoch end sends a resumable state: the evaluation of
    that epoch must still run beside the next steps. Here each evaluation waits until training has gone past its
    epoch's end, so a worker that waited for it there would time out."""
    import threading

    import vae.trainer as trainer_module

    real, box, timed_out, calls = trainer_module.evaluate, {}, [], []

    def evaluate_after_the_next_step(model, x, **kw):
        if threading.current_thread().name.startswith("vae-eval"):
            calls.append(1)
            t, end = box["trainer"], 5 * len(calls)  # the n-th evaluation is of epoch n, which ends at step 5 n
            deadline = time.monotonic() + 20
            while not (t.step_count > end or t.done) and time.monotonic() < deadline:
                time.sleep(0.001)
            if time.monotonic() >= deadline:
                timed_out.append(end)
        return real(model, x, **kw)

    monkeypatch.setattr(trainer_module, "evaluate", evaluate_after_the_next_step)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = box["trainer"] = Trainer(tc(epochs=4, max_examples=160), mc(), background_eval=True)
        pipe = FakePipe()
        w = _Worker(pipe, t, {"autosave_interval_s": 0.0})  # a resumable state at every epoch end
        assert w.run() == "finished"
        t.close()
        w.sync(full=True, kind="end", end={"state": "finished"})
        w.close()
    finally:
        torch.set_num_threads(before)
    assert timed_out == []
    syncs = [p for kind, p in pipe.sent]
    assert [p["full"]["epoch"] for p in syncs if "full" in p] == [1, 2, 3, 4, 4]  # and the end's
    assert [e for p in syncs for e in p["epochs"]["epoch"]] == [1, 2, 3, 4]
    assert [s for p in syncs for s in p["steps"]["step"]] == list(range(1, 21))  # each step once, in order


def test_a_failed_background_evaluation_fails_the_run_and_the_end_still_reaches_the_server(monkeypatch):
    import threading

    import vae.trainer as trainer_module
    from vae.worker import worker_main

    real, calls = trainer_module.evaluate, []

    def failing_from_the_second(model, x, **kw):
        if threading.current_thread().name.startswith("vae-eval"):
            calls.append(1)
            if len(calls) >= 2:
                raise MemoryError("no room for the test split")
        return real(model, x, **kw)

    monkeypatch.setattr(trainer_module, "evaluate", failing_from_the_second)
    before = torch.get_num_threads()
    pipe = FakePipe()
    try:
        worker_main(pipe, tc(epochs=6, max_examples=160).to_dict(), mc().to_dict(), None,
                    {"threads": 1, "autosave_interval_s": 0.0})
    finally:
        torch.set_num_threads(before)
    kinds = [kind for kind, _ in pipe.sent]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    end = pipe.sent[-1][1]["end"]
    assert end["state"] == "failed" and "MemoryError: no room for the test split" in end["error"]
    epochs = [e for _, p in pipe.sent for e in p.get("epochs", {}).get("epoch", [])]
    assert epochs == [1]  # the epoch before the failure, and no record after a gap
    steps = [s for _, p in pipe.sent for s in p.get("steps", {}).get("step", [])]
    assert steps == list(range(1, pipe.sent[-1][1]["step_count"] + 1))  # every step taken, once, in order
    # epoch 1's state went out (the failure after it does not hold it back); the end has none: its history is
    # short of the epochs its counters say
    assert [p["full"]["epoch"] for _, p in pipe.sent if "full" in p] == [1]


def test_the_end_message_reaches_the_server_even_if_the_last_sync_fails(monkeypatch):
    real_sync = _Worker.sync

    def sync(self, full=False, kind="sync", **extra):
        if kind == "end":
            raise ValueError("cannot pack the final state")
        return real_sync(self, full, kind, **extra)

    monkeypatch.setattr(_Worker, "sync", sync)
    from vae.worker import worker_main

    before = torch.get_num_threads()
    pipe = FakePipe()
    try:
        worker_main(pipe, tc(epochs=2, max_examples=160).to_dict(), mc().to_dict(), None, {"threads": 1})
    finally:
        torch.set_num_threads(before)
    kind, payload = pipe.sent[-1]
    assert kind == "end" and [k for k, _ in pipe.sent].count("end") == 1
    assert payload["end"]["state"] == "failed" and "ValueError: cannot pack the final state" in payload["end"]["error"]


def test_before_waiting_paused_the_worker_sends_its_last_epoch_ends_state():
    t = Trainer(tc(epochs=5, max_examples=160), mc())  # 5 steps per epoch
    pipe = FakePipe()
    w = _Worker(pipe, t, {"paused": True, "steps_requested": 12, "autosave_interval_s": 3600.0})
    assert w.run() == "stopped"  # 12 single steps, then paused (FakePipe then answers with a stop)
    w.close()
    fulls = [p for kind, p in pipe.sent if "full" in p]
    # epoch 1's end (the first state), then, before waiting at step 12, epoch 2's (it ended within the interval)
    assert [(p["full"]["epoch"], p["full"]["step_count"]) for p in fulls] == [(1, 5), (2, 10)]
    last = fulls[-1]
    assert last["full_events"] == 0 and "weights" not in last  # the page keeps showing the weights of step 12
    assert last["step_count"] == 12
    ref = Trainer(tc(epochs=5, max_examples=160), mc())
    for _ in range(10):
        ref.step()
    want = ref.state_dict(history=False)
    assert all(torch.equal(last["full"]["model"][k], want["model"][k]) for k in want["model"])
    assert torch.equal(last["full"]["generator"], want["generator"]) and last["full"]["epoch"] == want["epoch"]
