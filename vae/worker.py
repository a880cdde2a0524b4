"""The training process behind a dashboard job (vae.jobs): one Trainer, driven by commands over a pipe.

Training runs in its own process, not in a thread of the web server: the server's Python (every page's script run)
and the training loop then never wait for one another's GIL, and the process runs at a lower OS priority, so the
pages answer as fast while a job trains as when nothing does, and the job gets the CPU the pages leave.

Parent -> worker, any time: (seq, "pause") (seq, "resume") (seq, "step", n) (seq, "stop") (seq, "delay", s)
(seq, "update", {changes}) (seq, "threads", n). The worker handles them between steps.
Worker -> parent: ("sync", payload) with what is new since the last sync (step and epoch records, events, the
counters, the model weights, the last command handled, and now and then the whole resumable state without the
history), at most every SYNC_S while running, after every step in slow motion or single steps, and before it waits
while paused; ("end", {...}) once, last. The test evaluations run beside the steps (Trainer(background_eval=True)):
a sync carries the epochs whose records are in, and an epoch end's resumable state goes out, with the records up
to it, once that epoch's record is in (syncs wait for it meanwhile).
"""
from __future__ import annotations

import io
import os
import queue
import signal
import threading
import time
import traceback

import torch

from .config import ModelConfig, TrainConfig
from .device import flush_denormals
from .trainer import Trainer, TrainingDiverged

SYNC_S = 0.2  # seconds between syncs while running at full speed
COMMAND_POLL_S = 0.005  # ... and between looks for commands: a pipe's poll() costs ~30 µs, 3 % of a 1 ms step
CHUNK_MAX = 64  # steps taken in one Trainer.steps call between those looks
WEIGHTS_S = 1.0  # ... and between the model weights they carry (every sync: in single steps, pauses and slow
SLOW_WEIGHTS_S = 0.1  # motion of at least this delay a step; a page shows a running job's images per epoch, so
# weights after each of a hundred steps a second would only load the server)


def pack(obj) -> bytes:
    """Bytes for the pipe: torch.save of plain containers and tensors (no shared-memory handles to keep alive)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes):
    """The inverse of pack(), with torch.load(weights_only=True): a message can carry data, never code."""
    return torch.load(io.BytesIO(data), weights_only=True)


class _Worker:
    def __init__(self, conn, trainer: Trainer, opts: dict):
        self.conn, self.trainer = conn, trainer
        # messages go out from a sender thread: a server busy redrawing a page reads them late, and the training
        # loop must not wait for it (one message with the weights fills a pipe's buffer)
        self.outbox: queue.Queue = queue.Queue()
        self.sender = threading.Thread(target=self._send_loop, name="vae-worker-sender", daemon=True)
        self.sender.start()
        self.last_weights = float("-inf")
        self.paused = bool(opts.get("paused"))
        self.steps_requested = int(opts.get("steps_requested", 0))
        self.stop = bool(opts.get("stop"))
        self.delay = float(opts.get("delay_s", 0.0))
        self.full_interval = float(opts.get("autosave_interval_s", 1.0))
        self.ack = int(opts.get("seq", 0))
        self.sent = self._lengths()  # what the parent has of the history
        self.last_sync = 0.0
        self.next_poll = 0.0  # the first iteration looks at once
        self.step_s = COMMAND_POLL_S  # a step's wall time (a moving average): the first chunk is one step
        self.last_full = float("-inf")
        # (sync payload, epoch, what had been sent before it) of an epoch end's resumable state waiting for that
        # epoch's test evaluation
        self.held = None
        self.full_epoch = trainer.epoch  # the epoch end of the last resumable state the parent has (or started from)
        self.wall = {"t0": time.time(), "t1": None, "step0": trainer.step_count, "steps": 0,
                     "batch_size": trainer.config.batch_size}

    def _lengths(self) -> dict:
        h = self.trainer.history
        return {"step": len(h["step"]["step"]), "epoch": len(h["epoch"]["epoch"]), "events": len(h["events"])}

    # ---- commands -----------------------------------------------------------------------------------------------
    def handle(self, msg):
        seq, kind, *args = msg
        if kind == "pause":
            self.paused = True
        elif kind == "resume":
            self.paused = False
        elif kind == "step":
            self.paused = True
            self.steps_requested += int(args[0])
        elif kind == "stop":
            self.stop = True
        elif kind == "delay":
            self.delay = float(args[0])
        elif kind == "update":
            self.trainer.update(**args[0])  # validated by the parent first
        elif kind == "threads":
            torch.set_num_threads(int(args[0]))
        self.ack = max(self.ack, seq)

    def drain(self) -> bool:
        """Handle every command that has arrived. True if there were any."""
        got = False
        while self.conn.poll(0):
            self.handle(self.conn.recv())
            got = True
        return got

    # ---- syncs --------------------------------------------------------------------------------------------------
    def _send_loop(self):
        while True:
            data = self.outbox.get()
            if data is None:
                return
            try:
                self.conn.send_bytes(data)
            except (OSError, ValueError):  # the server has gone: the training loop finds out at its next read
                return

    def close(self, timeout: float = 60.0):
        """Send what is queued, then stop the sender thread."""
        self.outbox.put(None)
        self.sender.join(timeout)

    def _payload(self) -> dict:
        """A sync's records since the last (the per-step ones and the events; the epochs go in with _epochs) and the
        counters, config and acknowledgements as they are now."""
        t, h = self.trainer, self.trainer.history
        s, v = self.sent["step"], self.sent["events"]
        self.sent["step"], self.sent["events"] = len(h["step"]["step"]), len(h["events"])
        return {"steps": {k: x[s:] for k, x in h["step"].items()}, "events": h["events"][v:],
                "step_count": t.step_count, "config": t.config.to_dict(),
                "paused": self.paused and not self.steps_requested, "ack": self.ack,
                "train_wall": dict(self.wall, steps=t.step_count - self.wall["step0"]),
                "threads": torch.get_num_threads(), "pid": os.getpid()}

    def _epochs(self, payload: dict, upto: int):
        """The epoch records up to epoch upto into payload, with that epoch count (the mirror's counters then match
        the history it has, although the test evaluations of the last epochs may still be running)."""
        h, e = self.trainer.history, self.sent["epoch"]
        payload["epochs"] = {k: x[e:upto] for k, x in h["epoch"].items()}
        payload["epoch"] = upto
        self.sent["epoch"] = upto

    def sync(self, full: bool = False, kind: str = "sync", **extra):
        self._flush_held()  # an epoch end's state first: the parent applies syncs in order
        t = self.trainer
        # the epochs whose test evaluation (on the evaluator thread) is done; all of them unless at full speed
        t.settle(wait=full or kind != "sync" or self.paused or self.delay > 0 or bool(self.steps_requested))
        payload = self._payload()
        self._epochs(payload, len(t.history["epoch"]["epoch"]))
        now = time.monotonic()
        if full:
            payload["full"] = t.state_dict(history=False)  # the parent has the history, record by record
            payload["weights"] = payload["full"]["model"]
            self.last_full = self.last_weights = now
            self.full_epoch = t.epoch
        elif (kind != "sync" or self.paused or self.delay >= SLOW_WEIGHTS_S or self.steps_requested
              or now - self.last_weights >= WEIGHTS_S):
            payload["weights"] = t.model.state_dict()  # no copy: pack() serialises it before training goes on
            self.last_weights = now
        payload.update(extra)
        self.outbox.put(pack((kind, payload)))
        self.last_sync = now

    def hold_state(self):
        """At an epoch end due for an autosave: the resumable state and the records up to it, taken now and sent by
        send_held() once that epoch's test evaluation is in (it runs beside the next steps: waiting for it here
        would leave nothing to overlap when epochs are longer than the autosave interval). Syncs wait meanwhile."""
        self._flush_held()
        t = self.trainer
        t.settle(wait=False)
        before = self.sent["step"], self.sent["events"]
        payload = self._payload()
        payload["full"] = t.state_dict(history=False)  # copies: the steps go on
        payload["weights"] = payload["full"]["model"]
        self.held = (payload, t.epoch, before)
        self.last_full = self.last_weights = time.monotonic()

    def _flush_held(self):
        """Send the held state now, waiting for its epoch's records; if they cannot come (that evaluation failed),
        its records go with the next sync, without the state."""
        try:
            sent = self.send_held(wait=True)
        except Exception:
            self._drop_held()
            raise
        if not sent:
            self._drop_held()

    def _drop_held(self):
        """Forget the held state; its records are sent again with the next sync."""
        if self.held is not None:
            self.sent["step"], self.sent["events"] = self.held[2]
            self.held = None

    def send_held(self, wait: bool) -> bool:
        """Send the held epoch end's sync if its epoch's records are in (wait: wait for them). True once sent."""
        if self.held is None:
            return True
        payload, epoch, _ = self.held
        # up to its epoch only (the one that has just ended runs on); a failed evaluation raises here: the run fails
        self.trainer.settle(wait=wait, upto=epoch)
        if len(self.trainer.history["epoch"]["epoch"]) < epoch:
            return False
        self.held = None
        self._epochs(payload, epoch)
        self.outbox.put(pack(("sync", payload)))
        self.last_sync = time.monotonic()
        self.full_epoch = epoch
        return True

    def save_last_epoch_end(self):
        """Before the worker waits while paused: the last epoch end's resumable state, if the parent has none of it
        yet (an epoch that ended within autosave_interval_s of the last autosave), so that a server restart during
        a long pause loses no more than the epoch under way. The parent's autosave keeps the history up to it."""
        t = self.trainer
        if t.epoch <= self.full_epoch:
            return
        state = t.epoch_end_state()
        if state is None:
            return
        self.sync()  # the records so far, and the epochs up to this one
        payload = self._payload()
        self._epochs(payload, len(t.history["epoch"]["epoch"]))
        payload["full_events"] = state.pop("events")  # the history's events then (a change after it is not in it)
        payload["full"] = state  # no "weights": the page shows the weights of now
        self.outbox.put(pack(("sync", payload)))
        self.full_epoch = state["epoch"]

    # ---- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> str:
        t = self.trainer
        self.sync()
        while True:
            # at full speed, commands are looked for every COMMAND_POLL_S (Pause, Stop: within a few ms); in slow
            # motion, single steps and pauses after every step
            now = time.monotonic()
            if (now >= self.next_poll or self.delay > 0 or self.paused or self.steps_requested) and self.drain():
                self.sync()  # the parent may be waiting for this command's acknowledgement
            if now >= self.next_poll:
                self.next_poll = now + COMMAND_POLL_S
            if self.stop:
                return "stopped"
            if t.done:
                self.drain()  # a command sent during the last steps is handled (an update then shows in the end
                return "finished"  # sync's config), not left unread
            if self.paused and not self.steps_requested:
                self.save_last_epoch_end()
                self.handle(self.conn.recv())  # waits; nothing runs while paused
                self.sync()
                continue
            if self.steps_requested:
                self.steps_requested -= 1
            if self.delay > 0 or self.paused or self.steps_requested:
                rec = t.step()
            else:  # full speed: a chunk of steps that lasts about COMMAND_POLL_S (Trainer.steps: one C call)
                t0 = time.perf_counter()
                recs = t.steps(max(1, min(CHUNK_MAX, int(COMMAND_POLL_S / self.step_s))))
                rec = recs[-1]
                if not rec["epoch_end"]:  # an epoch's end also evaluates the test set: not a step's time
                    self.step_s = 0.8 * self.step_s + 0.2 * (time.perf_counter() - t0) / len(recs)
            # the resumable state (for the autosave) only right at an epoch end: a resumed run starts an epoch
            if rec["epoch_end"] and time.monotonic() - self.last_full >= self.full_interval:
                self.hold_state()
            if self.held is not None:  # at full speed, sent once its test evaluation is in; otherwise now
                self.send_held(wait=self.delay > 0 or self.paused or bool(self.steps_requested))
            elif self.delay > 0 or self.paused or time.monotonic() - self.last_sync >= SYNC_S:
                self.sync()
            if self.delay > 0:
                self.conn.poll(self.delay)  # an interruptible sleep: a command ends it


def worker_main(conn, train_config: dict, model_config: dict | None, state: dict | None, opts: dict):
    """Entry point of the training process."""
    # a Ctrl-C in the server's terminal reaches its whole process group: the server decides what happens to the
    # run (the worker ends when the pipe closes), so the worker does not die of it on its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(opts.get("environ", {}))
    if opts.get("cwd"):
        os.chdir(opts["cwd"])
    if hasattr(os, "nice"):  # the server's priority + nice (the forkserver may have lowered it part of the way)
        try:
            delta = int(opts.get("base_nice", 0)) + int(opts.get("nice", 0)) - os.nice(0)
            if delta > 0:
                os.nice(delta)
        except OSError:
            pass
    flush_denormals()  # before the thread pool starts, which takes it from this thread
    torch.set_num_threads(int(opts.get("threads", 1)))
    trainer = worker = None
    try:
        # each epoch's test evaluation beside the next epoch's steps, on the core the job leaves to the pages (a
        # one-thread job otherwise spends a fifth of its time on them: docs/performance.md); so a one-thread job
        # uses a little more than one core (0.1-0.4 more on digits, where epochs are shortest)
        trainer = Trainer(TrainConfig.from_dict(train_config),
                          ModelConfig.from_dict(model_config) if model_config else None, background_eval=True)
        if state is not None:
            trainer.load_state_dict(unpack(state))
        worker = _Worker(conn, trainer, opts)
        end = {"state": worker.run()}
    except TrainingDiverged as exc:  # the trainer has put the last good weights back
        end = {"state": "failed", "error": str(exc), "failed_step": exc.step}
    except (EOFError, BrokenPipeError, ConnectionResetError):
        if trainer is not None:
            trainer.close(settle=False)
        return  # the server has gone: nothing to report to
    except Exception as exc:
        end = {"state": "failed", "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc(limit=6)}
    try:
        if worker is not None:
            try:
                trainer.close()  # the last evaluations into the history, and the evaluator thread ended
            except Exception as exc:  # an evaluation that failed after the steps had ended
                if end["state"] != "failed":
                    end = {"state": "failed", "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc(limit=6)}
            worker.wall["t1"] = time.time()
            try:
                # the final state, unless a failed test evaluation left the history short of its epochs: the server
                # then saves what it has (its mirror's weights, counters and history agree)
                worker.sync(full=len(trainer.history["epoch"]["epoch"]) == trainer.epoch, kind="end", end=end)
            except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
                raise
            except Exception as exc:  # the end must reach the server whatever happened: after what is queued
                worker.outbox.put(pack(("end", {"end": {"state": "failed", "error": f"{type(exc).__name__}: {exc}",
                                                        "traceback": traceback.format_exc(limit=6)}})))
            worker.close()
        else:
            conn.send_bytes(pack(("end", {"end": end})))
    except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
        pass
    finally:
        conn.close()
