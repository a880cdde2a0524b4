"""A process-wide registry of background training jobs (no Streamlit here: the UI holds one registry in
st.cache_resource and polls snapshots).

    registry = JobRegistry(max_concurrent=2, autosave_dir="checkpoints/autosave")
    job = registry.submit(TrainConfig(epochs=20), ModelConfig(latent_dim=2), name="demo")
    job.pause(); job.step_once(); job.resume(); job.update(beta=4.0); job.stop()
    snap = job.snapshot()          # a consistent copy, taken under the job's lock

Each job has a daemon thread in this process that never touches the UI, and its training runs in a worker process
(vae.worker) that the thread drives over a pipe: the web server's Python and the training loop then never wait for
each other's GIL. The thread keeps a mirror Trainer (config, history, counters, the latest weights) up to date from
the worker's syncs (a few a second, and after every single step), which is what snapshots, the model picker and
checkpoints read. The registry caps how many jobs run at once; jobs over the cap wait in a FIFO queue (never
dropped) and start as others end. Every finished epoch is autosaved atomically by a background writer, so a server
restart loses at most one epoch: restored jobs come back as "interrupted" and can be resumed; ended ones keep their
weights. (Epochs shorter than a second are saved at most once a second: see JobRegistry.autosave_interval_s.)

CPU: a job's worker trains with the machine's cores but one (left to the web server and the browser) while it runs
alone, and with an equal share of those when several run, so that jobs do not oversubscribe a small machine
(OpenMP spin-waits make that many times slower). $VAE_JOB_THREADS fixes the count. Workers run at a lower OS
priority (nice +10, $VAE_JOB_NICE), so the web server's script runs, and a browser on the same machine, take the CPU
first: training gets what the UI leaves.
"""
from __future__ import annotations

import atexit
import collections
import copy
import dataclasses
import itertools
import json
import multiprocessing.util  # noqa: F401  (its exit hook must be registered before ours: see _at_exit)
import os
import secrets
import threading
import weakref
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointError, make_checkpoint, read_checkpoint, save_checkpoint
from .config import ModelConfig, TrainConfig
from .trainer import Trainer, describe_changes, make_optimizer
from .worker import pack, unpack, worker_main

QUEUED, RUNNING, PAUSED, FINISHED, STOPPED, FAILED, INTERRUPTED = (
    "queued", "running", "paused", "finished", "stopped", "failed", "interrupted")
ACTIVE = (QUEUED, RUNNING, PAUSED)
MAX_JOBS_ENV = "VAE_MAX_JOBS"
PAUSE_HOLD_S = 300.0  # a run paused this long gives its place to a waiting run (JobRegistry.pause_hold_s)
THREADS_ENV = "VAE_JOB_THREADS"
NICE_ENV = "VAE_JOB_NICE"
RATE_WINDOW = 16  # syncs (about 3 s at full speed) over which the live samples/s (and so the ETA) is measured
# settings that may change while a run goes on (Trainer.update validates the values)
LIVE_SETTINGS = ("beta", "beta_schedule", "warmup_epochs", "cycles", "cycle_ratio", "capacity_max", "free_bits",
                 "lr", "grad_clip")


@dataclass
class JobSnapshot:
    id: str
    name: str
    state: str
    error: str | None
    epoch: int
    step: int
    total_steps: int
    epochs: int
    steps_per_epoch: int
    samples_per_s: float | None  # live wall-clock rate over the last steps (pauses excluded), else the last epoch's
    eta_s: float | None
    queue_position: int | None  # 1-based place in the queue while queued
    delay_s: float
    history: dict
    train_config: dict
    model_config: dict | None
    weights_version: int  # bumps when the weights seen here change (about once a second while a run goes on, every
    # step in slow motion or single steps): a cache key for the latest weights
    created: float
    group: str | None = None
    extra: dict = field(default_factory=dict)
    live_rate: bool = False  # samples_per_s is the live rate (wall clock), not the last epoch's steps alone

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


def copy_history(h: dict, steps: bool = True) -> dict:
    """A consistent copy of a trainer history, fast: the trainer only appends to its lists and never changes an item
    after appending it, so copying the lists (not the floats and per-dim lists in them) is enough. Far cheaper than
    deepcopy, which matters because the copy is taken under the job's lock while training waits. steps=False leaves
    the per-step lists empty (the per-epoch ones are all a status display needs)."""
    return {"step": {k: list(v) if steps else [] for k, v in h.get("step", {}).items()},
            "epoch": {k: list(v) for k, v in h.get("epoch", {}).items()},
            "events": list(h.get("events", []))}


def history_upto(h: dict, steps: int, epochs: int, events: int | None = None) -> dict:
    """The history as it was at a resumable state: its first `steps` step records, `epochs` epoch records and
    `events` events (all of them if None). A history's lists hold one record per step and per epoch, from the
    first; h is changed and returned (give it a copy)."""
    for k in h.get("step", {}):
        del h["step"][k][steps:]
    for k in h.get("epoch", {}):
        del h["epoch"][k][epochs:]
    if events is not None:
        del h["events"][events:]
    return h


def _env_int(name: str, minimum: int) -> int | None:
    env = os.environ.get(name)
    if not env:
        return None
    try:
        n = int(env)
    except ValueError:
        n = None
    if n is None or n < minimum:
        raise ValueError(f"${name}={env!r} is not allowed: give a whole number >= {minimum}")
    return n


def default_threads() -> int | None:
    """torch CPU threads per job fixed by $VAE_JOB_THREADS, else None: threads_per_job() decides as jobs come
    and go."""
    return _env_int(THREADS_ENV, 1)


def threads_per_job(running: int, cores: int | None = None) -> int:
    """The cores but one (left to the web server and a browser on the same machine), shared equally among the
    running jobs, at least 1 each. On 2 cores a job trains on 1 thread: with a browser drawing the live view on the
    other core, 2 OpenMP threads wait on each other and run slower than 1 (benchmarks/bench_dashboard.py)."""
    cores = cores or os.cpu_count() or 1
    return max(1, (cores - 1) // max(1, running))


def default_nice() -> int:
    """How much lower than the server's a job thread's CPU priority is: $VAE_JOB_NICE, else 10."""
    n = _env_int(NICE_ENV, 0)
    return 10 if n is None else n


_REGISTRIES: "weakref.WeakSet[JobRegistry]" = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's own exit hook, so it runs before that one ends the workers
def _at_exit():
    for registry in list(_REGISTRIES):
        registry._at_exit()


class _WorkerLost(RuntimeError):
    """The worker process ended without saying how (killed, crashed, or the server is shutting down)."""


_CONTEXT = None
WORKER_NAME_PREFIX = "vae-job-"


def _guard_main_module():
    """Start worker processes without re-running the parent's __main__ in them.

    multiprocessing's spawn and forkserver start methods tell a child to import the parent's main module first (the
    pickled target might live there). Under `streamlit run`, sys.modules["__main__"] is the app script itself, so
    each training process re-ran app.py: its imports and page code (the Collapse lab's five runs, from the
    browser: 10.7 s before, 7.6 s after), and a burst of "missing ScriptRunContext" warnings in the server's log. The target, vae.worker.worker_main, is importable on its own,
    so for processes named WORKER_NAME_PREFIX... the main module is left out of what the child is told to prepare.
    Other processes are untouched."""
    from multiprocessing import spawn

    original = spawn.get_preparation_data
    if getattr(original, "_vae_guard", False):
        return

    def get_preparation_data(name):
        data = original(name)
        if str(name).startswith(WORKER_NAME_PREFIX):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    get_preparation_data._vae_guard = True
    spawn.get_preparation_data = get_preparation_data


def worker_context():
    """The multiprocessing context for worker processes: forkserver where there is one (a clean server that has
    imported torch once, so a worker starts in a fraction of a second), else spawn."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing as mp

        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["vae._worker_preload"])
        else:
            ctx = mp.get_context("spawn")
        _guard_main_module()
        _CONTEXT = ctx
    return _CONTEXT


class Job:
    def __init__(self, registry: "JobRegistry", train_config: TrainConfig, model_config: ModelConfig | None,
                 name: str = "", job_id: str | None = None, group: str | None = None, start_paused: bool = False):
        self.registry = registry
        self.id = job_id or secrets.token_hex(4)
        self.name = name or self.id
        self.group = group  # e.g. a sweep id: jobs of one sweep share it
        self.owner: str | None = None  # an opaque id of the browser that started it (set by the UI)
        self.train_config = train_config
        self.model_config = model_config
        self.created = time.time()
        self.state = QUEUED
        self.error: str | None = None
        self.trainer: Trainer | None = None
        self.delay_s = 0.0  # slow motion: a pause after every step
        self.extra: dict = {}
        self._lock = threading.RLock()  # guards the trainer and the fields above
        self._cond = threading.Condition(self._lock)
        self._paused = start_paused
        self._stop = False
        self._steps_requested = 0  # single steps asked for while paused
        self._weights_version = 0
        self._thread: threading.Thread | None = None
        self._occupies_slot = False  # True from start until the worker is done: what the concurrency cap counts
        # paused long enough, with runs waiting, a job gives its place to them (JobRegistry.pause_hold_s): its
        # worker stays, paused; Resume then waits in the queue for a place like any run
        self._paused_at: float | None = None  # time.monotonic() when it was last paused (or stepped)
        self._released = False
        self._resume_state: dict | None = None  # a restored trainer state, attached lazily (see _ensure_trainer)
        self._attach_tried = False
        self._t_started: float | None = None
        self._t_ended: float | None = None
        self._rate = collections.deque(maxlen=RATE_WINDOW)  # (time, step) of recent steps, cleared on pause
        self._conn = None  # the pipe to the worker process while one runs
        self._last_threads: int | None = None  # the thread count last sent to the worker
        self._send_lock = threading.Lock()
        self._seq = 0  # commands sent to the worker
        self._acked = 0  # the last command the worker has handled and synced
        self._worker_state: dict | None = None  # the worker's last resumable state (without the history)
        self._worker_state_events: int | None = None  # how many events the history had at that state (None: all)
        self._worker_config: dict | None = None  # the train config of the worker's last sync

    # ---- controls (any thread) --------------------------------------------------------------------------------
    def _command(self, *cmd) -> int | None:
        """Send a command to the worker process, if one runs (call with the lock held). Returns its number."""
        if self._conn is None:
            return None
        self._seq += 1
        try:
            with self._send_lock:
                self._conn.send((self._seq, *cmd))
        except (OSError, ValueError):  # the worker has just ended: the job thread reports how
            return None
        return self._seq

    def _wait_for(self, seq: int | None, timeout: float = 30.0):
        """Wait until the worker has handled command `seq` and the mirror shows its effect."""
        if seq is None:
            return
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._acked < seq and self._conn is not None and time.monotonic() < deadline:
                self._cond.wait(timeout=0.05)

    def pause(self):
        """Pause after the current step. Returns once the worker has paused (so the step count then stays put)."""
        with self._cond:
            self._paused = True
            if self.state == RUNNING or (self.state == QUEUED and self._released):  # (out of the queue again)
                self.state = PAUSED
                self._paused_at = time.monotonic()
            self._rate.clear()
            seq = self._command("pause")
            self._cond.notify_all()
        self._wait_for(seq)
        self.registry._schedule()  # its hold starts: the scheduler times it if runs wait (and drops it from the queue)
        self.registry._share_threads()  # its cores go to the others

    def resume(self):
        with self._cond:
            self._paused = False
            back_in_line = self._released and self.state == PAUSED  # its place went to a waiting run
            if back_in_line:
                self.state = QUEUED  # the worker is told to go on once a place is free (_start)
            else:
                if self.state == PAUSED:
                    self.state = RUNNING
                self._command("resume")
            self._paused_at = None
            self._rate.clear()
            self._cond.notify_all()
            requeue = back_in_line or self.state == INTERRUPTED
        if requeue:
            self.registry._requeue(self)
        self.registry._share_threads()

    def step_once(self, n: int = 1):
        """Run n single steps, then stay paused (a job that gave its place away while paused takes them without
        one: a batch is short)."""
        with self._cond:
            self._paused = True
            if self.state == RUNNING or (self.state == QUEUED and self._released):
                self.state = PAUSED
            if self.state == PAUSED:
                self._paused_at = time.monotonic()  # stepping through is using the run: its hold starts again
            if self._command("step", n) is None:
                self._steps_requested += n  # a worker yet to start takes them
            self._rate.clear()
            self._cond.notify_all()
            interrupted = self.state == INTERRUPTED
        if interrupted:
            self.registry._requeue(self)
        else:
            self.registry._schedule()  # as for pause()

    def stop(self):
        with self._cond:
            self._stop = True
            was_interrupted = self.state == INTERRUPTED
            was_queued = self.state == QUEUED and not self._released  # (a released one's worker ends it)
            if was_interrupted or was_queued:
                self.state = STOPPED
                self._t_ended = time.time()
            self._command("stop")
            self._cond.notify_all()
        if was_interrupted or was_queued:  # record the new state, so the next server start does not offer it
            self.registry._autosave(self, final=True)  # (with no trainer yet: its pending file goes)
        self.registry._schedule()

    def set_delay(self, seconds: float):
        try:
            seconds = float(seconds)
        except (TypeError, ValueError):
            raise ValueError(f"delay={seconds!r} is not allowed: give 0 to 10 seconds per step") from None
        if not (0 <= seconds <= 10):
            raise ValueError(f"delay={seconds!r} is not allowed: give 0 to 10 seconds per step")
        with self._cond:
            self.delay_s = seconds
            self._rate.clear()
            self._command("delay", seconds)
            self._cond.notify_all()
            self.registry._write_pending(self, refresh=True)  # a run yet to start keeps it across a restart
            # and one under way: its next autosave may be an epoch of slow steps away (23 steps of 2 s). Only a
            # resumable state is saved: the worker's last epoch end, or a restored run's own; before its first
            # epoch end a running job has none (its pending file keeps the delay), and the mirror's is not one
            saved = self._worker_state is not None or (self._conn is None and (self.trainer is not None or
                                                                              self._resume_state is not None))
        if saved:
            self.registry._autosave(self, background=True)

    def update(self, **changes) -> str:
        """Change lr / beta / schedule settings mid-run; recorded as an event on the curves. ValueError if bad."""
        with self._lock:
            if self.trainer is None:  # not started yet: any setting may change
                unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(TrainConfig)})
                if unknown:
                    raise ValueError(f"{', '.join(unknown)}: not a training option")
                self.train_config, text = describe_changes(self.train_config, changes)
                self.registry._write_pending(self, refresh=True)  # kept across a restart too
                return text
            bad = sorted(set(changes) - set(LIVE_SETTINGS))
            if bad:
                raise ValueError(f"{', '.join(bad)} cannot change once a run has started: only "
                                 f"{', '.join(LIVE_SETTINGS)} can; start a new run for the others")
            if self._conn is None:  # no worker now: the mirror takes it (a resumed run starts from it)
                text = self.trainer.update(**changes)
                self.train_config = self.trainer.config
                return text
            new_cfg, text = describe_changes(self.trainer.config, changes)  # ValueError before anything changes
            self.trainer.config = self.train_config = new_cfg
            seq = self._command("update", changes)  # the worker records the event; the next sync brings it
        self._wait_for(seq)
        return text

    # ---- reading (any thread) ---------------------------------------------------------------------------------
    @property
    def pause_requested(self) -> bool:
        """Pause was asked for (also true for a queued job that will start paused)."""
        return self._paused

    @property
    def has_weights(self) -> bool:
        """True when the job has a model to show or save (a live trainer, or a restored state not yet attached)."""
        return self.trainer is not None or (self._resume_state is not None and "restore_error" not in self.extra)

    def snapshot(self, steps: bool = True) -> JobSnapshot:
        """A consistent copy of the job's state and history; steps=False skips the per-step curves (cheaper)."""
        queue_position = self.registry.queue_position(self)  # before our lock: never hold both the other way round
        self._ensure_trainer()
        with self._lock:
            t = self.trainer
            hist = copy_history(t.history, steps) if t is not None else _empty_history(self._resume_state, steps)
            step = t.step_count if t else 0
            total = t.total_steps if t else 0
            spe = t.steps_per_epoch if t else 0
            sps = hist["epoch"]["samples_per_s"][-1] if hist["epoch"].get("samples_per_s") else None
            eta, live_rate = None, False
            if t is not None and self.state in (RUNNING, PAUSED):
                steps_per_s = self._steps_per_s()
                if steps_per_s:
                    sps, live_rate = steps_per_s * t.config.batch_size, True
                    eta = (total - step) / steps_per_s if self.state == RUNNING else None
                elif sps and self.state == RUNNING:
                    eta = (total - step) * t.config.batch_size / sps
            # a copy first (one C call): the autosave writer may add a key without the lock (see _autosave)
            extra = {k: (dict(v) if isinstance(v, dict) else v) for k, v in dict(self.extra).items()}
            extra.update(started=self._t_started, ended=self._t_ended)
            return JobSnapshot(
                id=self.id, name=self.name, state=self.state, error=self.error, epoch=t.epoch if t else 0,
                step=step, total_steps=total, epochs=self.train_config.epochs, steps_per_epoch=spe,
                samples_per_s=sps, eta_s=eta, queue_position=queue_position,
                delay_s=self.delay_s, history=hist, train_config=self.train_config.to_dict(),
                model_config=(t.model.config.to_dict() if t else
                              (self.model_config.to_dict() if self.model_config else None)),
                weights_version=self._weights_version, created=self.created, group=self.group,
                extra=extra, live_rate=live_rate)

    def event_count(self) -> int:
        """How many mid-run changes the history holds (a restored run's too: its trainer is attached first)."""
        self._ensure_trainer()
        with self._lock:
            return len(self.trainer.history.get("events", [])) if self.trainer is not None else 0

    def _steps_per_s(self) -> float | None:
        if len(self._rate) < 2:
            return None
        (t0, s0), (t1, s1) = self._rate[0], self._rate[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def latest_weights(self):
        """(model_config dict, state_dict copy on the CPU, weights_version), or None before the model exists."""
        self._ensure_trainer()
        with self._lock:
            if self.trainer is None:
                return None
            m = self.trainer.model
            return (m.config.to_dict(), {k: v.detach().cpu().clone() for k, v in m.state_dict().items()},
                    self._weights_version)

    def checkpoint(self) -> dict:
        """A checkpoint of the current (or last good) weights, with the history so far."""
        self._ensure_trainer()
        with self._lock:
            if self.trainer is None:
                reason = self.extra.get("restore_error")
                raise ValueError(f"run {self.name!r} has no weights" + (f": {reason}" if reason else
                                                                         " yet: start it first"))
            t = self.trainer
            return make_checkpoint(t.model, train_config=t.config, history=copy.deepcopy(t.history),
                                   metrics=t.final_metrics(), dataset=t.config.dataset)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the job has ended (also while it still waits in the queue). True if it has."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            thread = self._thread
            if thread is not None:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            ended = self.state not in ACTIVE and (thread is None or not thread.is_alive())
            if ended or (deadline is not None and time.monotonic() >= deadline):
                return ended
            time.sleep(0.01)

    # ---- the worker thread ------------------------------------------------------------------------------------
    def _ensure_trainer(self):
        """Attach a trainer to a job restored from an autosave (once): its weights can then be shown and saved."""
        if self.trainer is not None or self._resume_state is None or self._attach_tried:
            return
        with self._lock:
            if self.trainer is None and self._resume_state is not None and not self._attach_tried:
                self._attach_tried = True
                _attach_restored_trainer(self)

    def _start(self) -> bool:
        """Start the queued job's thread; False if it was stopped since the scheduler picked it (stop() changes the
        state under this lock only, so it can land between the scheduler's look at the queue and this). A job that
        gave its place away while paused has its worker still: it goes on."""
        with self._cond:
            if self._stop or self.state != QUEUED:
                return False
            if self._released:
                self._released = False
                self._occupies_slot = True
                self.extra.pop("released", None)
                self.state = RUNNING
                self._command("resume")
                self._cond.notify_all()
                threading.Thread(target=self.registry._share_threads, daemon=True).start()  # not under the lock
                return True
            self.state = PAUSED if self._paused else RUNNING
            self._paused_at = time.monotonic() if self._paused else None
            self._t_started = time.time()
            self._t_ended = None
            self._occupies_slot = True
        thread = threading.Thread(target=self._run, name=f"{WORKER_NAME_PREFIX}{self.id}", daemon=True)
        thread.start()
        self._thread = thread  # only once started: join() may run in another thread at any time
        return True

    def _run(self):
        conn = child_conn = proc = None
        outcome = None  # (state, error, extra) once the worker has ended; applied after the final autosave
        try:
            self._ensure_trainer()
            with self._lock:
                trainer, train_config, model_config = self.trainer, self.train_config, self.model_config
            if trainer is None:
                reason = self.extra.get("restore_error")
                if reason:
                    raise RuntimeError(f"the autosaved run could not be restored: {reason}")
                # the mirror: built from the same seed as the worker's trainer, so it starts with the same weights;
                # on the CPU whatever the run trains on (it never trains: a server on a GPU machine keeps no copy of
                # each run's data and model there)
                trainer = Trainer(train_config, model_config, device="cpu")
            ctx = worker_context()
            conn, child_conn = ctx.Pipe()
            with self._lock:
                if self.trainer is not None:  # a restored run resumes where its autosave ended
                    state = pack(self.trainer.state_dict())
                else:
                    state = None
                    trainer.config = self.train_config  # update() may have changed it while the mirror was built
                self.trainer = trainer
                self.model_config = trainer.model.config
                self._weights_version += 1
                opts = {"paused": self._paused, "steps_requested": self._steps_requested, "stop": self._stop,
                        "delay_s": self.delay_s, "seq": self._seq, "nice": self.registry.nice,
                        "base_nice": os.nice(0) if hasattr(os, "nice") else 0,
                        "threads": self.registry.job_threads(extra=0 if self._paused else 1),
                        "autosave_interval_s": self.registry.autosave_interval_s,
                        "environ": dict(os.environ), "cwd": os.getcwd()}
                self._steps_requested = 0
                self._acked = self._seq
                self._last_threads = opts["threads"]
                self._conn = conn  # from here on, the controls talk to the worker
                args = (child_conn, self.train_config.to_dict(), self.model_config.to_dict(), state, opts)
            proc = ctx.Process(target=worker_main, args=args, name=f"{WORKER_NAME_PREFIX}{self.id}", daemon=True)
            try:
                proc.start()
            finally:
                child_conn.close()
            self.registry._share_threads()
            crashed = "the training process ended unexpectedly (exit code {}); the weights of its last sync are kept"
            end = None
            while end is None:
                if not conn.poll(0.5):
                    if not proc.is_alive():
                        raise _WorkerLost(crashed.format(proc.exitcode))
                    continue
                try:
                    kind, payload = unpack(conn.recv_bytes())
                except (EOFError, OSError):
                    proc.join(5)
                    raise _WorkerLost(crashed.format(proc.exitcode)) from None
                with self._cond:
                    if "steps" in payload:
                        self._apply_sync(trainer, payload)
                    if kind == "end":
                        end = payload["end"]
                        if "full" not in payload:  # an end without its state (a failed test evaluation): the
                            self._worker_state = None  # mirror's weights, counters and history agree, save those
                    elif "full" in payload:  # an epoch ended: autosave, queued before anyone sees the new epoch
                        self.registry._autosave(self, background=True)
                    self._cond.notify_all()
            extra = {k: end[k] for k in ("failed_step", "traceback") if k in end}
            outcome = (FAILED, end.get("error"), extra) if end["state"] == "failed" else \
                (FINISHED if end["state"] == "finished" else STOPPED, None, {})
        except Exception as exc:  # shown on the page, not only in the console
            if self.registry._exiting:  # the server is shutting down: the last autosave stands (resumable)
                outcome = "exiting"
            elif isinstance(exc, _WorkerLost):
                with self._lock:  # the mirror's weights, counters and history agree (the epoch count is the
                    self._worker_state = None  # epochs whose records came): save those
            if outcome is None:
                outcome = (FAILED, f"{type(exc).__name__}: {exc}", {"traceback": traceback.format_exc(limit=6)})
        finally:
            with self._cond:
                self._conn = None
                self._rate.clear()
                self._cond.notify_all()
            if conn is not None:
                conn.close()
            if proc is not None and proc.pid is not None:  # it started
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
            if outcome != "exiting":
                with self._lock:  # the final state, then its autosave: the job is not "ended" before it is saved
                    state, error, extra = outcome
                    self.state, self.error = state, error if error is not None else self.error
                    self.extra.update(extra)
                    self._t_ended = time.time()
                    self._weights_version += 1
                    self.registry._autosave(self, final=True)
            self._occupies_slot = False
            self.registry._schedule()
            self.registry._share_threads()

    def _apply_sync(self, t: Trainer, p: dict):
        """Bring the mirror trainer up to date with a worker sync (called with the lock held)."""
        h = t.history
        for part, key in (("step", "steps"), ("epoch", "epochs")):
            for k, v in p[key].items():
                h[part].setdefault(k, []).extend(v)
        h["events"].extend(p["events"])
        if p["config"] != self._worker_config:  # the worker applied an update(): the mirror follows
            self._worker_config = p["config"]
            t.config = self.train_config = TrainConfig.from_dict(p["config"])
        moved = p["step_count"] != t.step_count
        t.step_count, t.epoch = int(p["step_count"]), int(p["epoch"])
        if "weights" in p:  # at most every WEIGHTS_S at full speed
            t.model.load_state_dict(p["weights"])
            self._weights_version += 1
        if "full" in p:
            self._worker_state = p["full"]
            self._worker_state_events = p.get("full_events")
        self._acked = max(self._acked, int(p["ack"]))
        self.extra.update(train_wall=p["train_wall"], threads=p["threads"], pid=p["pid"])
        if moved:
            if self.state == RUNNING:
                self._rate.append((time.perf_counter(), t.step_count))


def _empty_history(state: dict | None, steps: bool = True) -> dict:
    if state is not None:
        return copy_history(state["history"], steps)
    from .trainer import new_history

    return new_history()


class _AutosaveWriter:
    """One background thread that writes autosaves, so a training step never waits for a disk. Only the newest
    pending checkpoint of each job is kept: if epochs end faster than files are written, older ones are skipped.
    After a save of s seconds the writer rests REST_FACTOR * s before the next (flush() does not wait for that):
    a long run's history makes each file bigger, and the saves must not take the server's core from the pages."""

    REST_FACTOR = 3.0  # autosaves take at most a quarter of a core

    def __init__(self):
        self._cond = threading.Condition()
        self._pending: dict[Path, tuple] = {}
        self._busy = False
        self._rest_until = 0.0
        self._hurry = 0  # flush() calls waiting: no rest
        self._thread: threading.Thread | None = None

    def put(self, path: Path, ckpt: dict, on_error):
        with self._cond:
            self._pending[path] = (ckpt, on_error)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="vae-autosave", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def discard(self, path: Path):
        with self._cond:
            self._pending.pop(path, None)

    def flush(self, timeout: float = 10.0):
        """Wait until every pending autosave is written."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._hurry += 1
            self._cond.notify_all()
            try:
                while (self._pending or self._busy) and time.monotonic() < deadline:
                    self._cond.wait(timeout=0.05)
            finally:
                self._hurry -= 1

    def _loop(self):
        while True:
            with self._cond:
                while True:
                    rest = self._rest_until - time.monotonic()
                    if self._pending and (rest <= 0 or self._hurry):
                        break
                    self._cond.wait(timeout=rest if self._pending else None)
                path = next(iter(self._pending))  # the one waiting longest: another job's frequent saves
                ckpt, on_error = self._pending.pop(path)  # cannot keep it waiting (a new put keeps its place)
                self._busy = True
            t0 = time.monotonic()
            try:
                save_checkpoint(path, ckpt)
            except OSError as exc:  # a full disk must not kill the run
                on_error(exc)
            finally:
                with self._cond:
                    now = time.monotonic()
                    self._rest_until = now + self.REST_FACTOR * (now - t0)
                    self._busy = False
                    self._cond.notify_all()


def _warm_up():
    """The first optimiser a process creates imports torch's compiler stack (torch._dynamo): seconds of import, more
    on a busy machine. Done once in the background when the registry is made, so Start answers at once."""
    try:
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], 1e-3)
        if worker_context().get_start_method() == "forkserver":  # boot it now: it imports torch once, for good
            from multiprocessing import forkserver

            forkserver.ensure_running()
    except Exception:  # only a head start: the job would then pay the cost itself
        pass


class JobRegistry:
    def __init__(self, max_concurrent: int | None = None, autosave_dir: str | os.PathLike | None = None,
                 restore: bool = True, threads: int | None = None, warm_up: bool = True,
                 autosave_interval_s: float = 1.0, nice: int | None = None, pause_hold_s: float = PAUSE_HOLD_S):
        if max_concurrent is None:
            env = os.environ.get(MAX_JOBS_ENV, "2")
            try:
                max_concurrent = int(env)
            except ValueError:
                raise ValueError(f"${MAX_JOBS_ENV}={env!r} is not allowed: give a whole number >= 1") from None
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent={max_concurrent} is not allowed: at least 1 job must be able to run")
        self.max_concurrent = max_concurrent
        self.threads = int(threads) if threads is not None else default_threads()  # None: threads_per_job()
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={threads} is not allowed: give at least 1")
        self.nice = int(nice) if nice is not None else default_nice()
        if self.nice < 0:
            raise ValueError(f"nice={nice} is not allowed: give 0 (same priority as the UI) or more (lower)")
        self.autosave_dir = Path(autosave_dir) if autosave_dir else None
        # every epoch end autosaves, except within this many seconds of the job's last autosave (the worker decides,
        # when it sends its resumable state): digits epochs take ~0.1 s, and a save per epoch would cost ~20 % of
        # the throughput. A restart loses at most max(one epoch, this interval); the final state is always saved.
        self.autosave_interval_s = float(autosave_interval_s)
        # a run paused this long gives its place to a waiting one (a Step made in a tab since closed, a pause
        # forgotten, must not block the queue for good); a lecture's pause is shorter
        self.pause_hold_s = float(pause_hold_s)
        self._release_timer: threading.Timer | None = None
        self._release_due: float | None = None
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._queue: list[Job] = []
        self._counter = itertools.count(1)
        self._writer = _AutosaveWriter()
        self._share_lock = threading.Lock()
        self._exiting = False
        _REGISTRIES.add(self)  # see _at_exit()
        if warm_up:
            threading.Thread(target=_warm_up, name="vae-warm-up", daemon=True).start()
        if restore and self.autosave_dir is not None:
            self._restore()

    # ---- submitting and finding --------------------------------------------------------------------------------
    def submit(self, train_config: TrainConfig, model_config: ModelConfig | None = None, name: str = "",
               group: str | None = None, start_paused: bool = False, owner: str | None = None) -> Job:
        """owner: an opaque id of who started it (the UI's browser id), kept with the run across restarts."""
        job = Job(self, train_config, model_config, name=name, group=group, start_paused=start_paused)
        job.owner = owner
        self._write_pending(job)  # before it can start (and end, which removes the file)
        with self._lock:
            self._jobs[job.id] = job
            self._queue.append(job)
        self._schedule()
        return job

    # A run has no autosave until its first epoch ends (a queued one none at all): until then a small file of its
    # settings stands for it, so that a server restart brings it back (interrupted, not yet started) and never drops
    # it. It goes once the run has ended, is stopped or is forgotten; at a restart, also once its autosave exists.
    def _pending_path(self, job_id: str) -> Path | None:
        return self.autosave_dir / f"{job_id}.pending.json" if self.autosave_dir is not None else None

    def _write_pending(self, job: "Job", refresh: bool = False):
        """refresh: only rewrite a file that is there (settings changed before the run's first autosave)."""
        path = self._pending_path(job.id)
        if path is None:
            return
        with job._lock:  # never between a stop's removal and its state: a removed file stays removed
            if refresh and not path.exists():
                return
            meta = {"id": job.id, "name": job.name, "group": job.group, "created": job.created, "owner": job.owner,
                    "train_config": job.train_config.to_dict(), "delay_s": job.delay_s,
                    "model_config": job.model_config.to_dict() if job.model_config is not None else None}
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(json.dumps(meta))
                os.replace(tmp, path)
            except (OSError, TypeError, ValueError) as exc:
                job.extra["autosave_error"] = f"autosave failed: {exc}"

    def _drop_pending(self, job: "Job"):
        path = self._pending_path(job.id)
        if path is not None:
            with job._lock:
                path.unlink(missing_ok=True)

    def get(self, job_id: str | None) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id) if job_id else None

    def jobs(self, group: str | None = None) -> list[Job]:
        with self._lock:
            out = list(self._jobs.values())
        if group is not None:
            out = [j for j in out if j.group == group]
        return sorted(out, key=lambda j: j.created)

    def remove(self, job_id: str) -> None:
        """Forget a job that is not active (its autosave file goes too)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return
            if job.state in ACTIVE:
                raise ValueError(f"run {job.name!r} is {job.state}: stop it before removing it")
            del self._jobs[job_id]
        if job._thread is not None:  # its last autosave must not land after the file is gone
            job._thread.join(30)
        if self.autosave_dir is not None:
            path = self.autosave_dir / f"{job_id}.pt"
            self._writer.discard(path)
            self._writer.flush()
            path.unlink(missing_ok=True)
            self._drop_pending(job)

    def queue_position(self, job: Job) -> int | None:
        with self._lock:
            try:
                return self._queue.index(job) + 1
            except ValueError:
                return None

    def job_threads(self, extra: int = 0) -> int:
        """torch CPU threads for each training worker now: the cores shared among the running jobs that are not
        paused (and `extra` more about to start). Takes no lock (a job asks with its own lock held)."""
        if self.threads is not None:
            return self.threads
        jobs = list(self._jobs.values())
        n = sum(1 for j in jobs if j._occupies_slot and not j._paused and j._conn is not None) + extra
        return threads_per_job(n)

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j._occupies_slot]

    def flush(self, timeout: float = 10.0):
        """Wait until pending autosaves are on disk (tests, server exit)."""
        self._writer.flush(timeout)

    def shutdown(self, timeout: float = 5.0):
        """Stop every job and wait for the threads and the autosaves (tests, server exit)."""
        for j in self.jobs():
            j.stop()
        for j in self.jobs():
            j.join(timeout)
        self._cancel_release_timer()
        self.flush(timeout)

    # ---- internals --------------------------------------------------------------------------------------------
    def _at_exit(self):
        """The interpreter is exiting (the server stops): end the job threads without marking their runs failed
        (the last autosave stands, resumable after a restart), before torch is torn down under them."""
        self._exiting = True
        self._cancel_release_timer()
        jobs = self.jobs()
        for job in jobs:
            conn = job._conn
            if conn is not None:
                try:
                    conn.close()  # its worker sees the pipe close and ends; its thread stops waiting for it
                except OSError:
                    pass
        for job in jobs:
            if job._thread is not None:
                job._thread.join(5)
        self._writer.flush(5)

    def _schedule(self):
        with self._lock:
            if self._exiting:  # the server is stopping: queued runs stay queued (their pending files bring them back)
                return
            self._queue = [j for j in self._queue if j.state == QUEUED and not j._stop]
            busy = sum(1 for j in self._jobs.values() if j._occupies_slot)
            if len(self._queue) > self.max_concurrent - busy:
                busy -= self._release_held(len(self._queue) - (self.max_concurrent - busy))
            while self._queue and busy < self.max_concurrent:
                if self._queue.pop(0)._start():
                    busy += 1
            if self._queue:  # runs still wait: look again when the next paused run's hold is over
                self._release_held(0)

    def _release_held(self, wanted: int) -> int:
        """Up to `wanted` places given up by runs paused for pause_hold_s or more (the longest paused first); arms
        the timer for the next hold to end (called with the registry's lock held). Returns how many."""
        now, n, held = time.monotonic(), 0, []
        for j in self._jobs.values():
            with j._lock:  # resume() clears the time under this lock only
                if j._occupies_slot and j.state == PAUSED and j._paused_at is not None:
                    held.append((j._paused_at, j))
        for paused_at, j in sorted(held, key=lambda t: t[0]):
            if now - paused_at < self.pause_hold_s:
                self._arm_release(paused_at + self.pause_hold_s)  # sorted: the others end later
                break
            if n < wanted:
                with j._lock:
                    if j.state == PAUSED and j._occupies_slot and j._paused_at == paused_at:
                        j._occupies_slot = False
                        j._released = True
                        j.extra["released"] = time.time()
                        n += 1
        return n

    def _arm_release(self, due: float):
        """A timer that runs the scheduler at time.monotonic() == due (one at a time: the earliest wanted)."""
        if self._release_timer is not None and self._release_due is not None and self._release_due <= due:
            return
        if self._release_timer is not None:
            self._release_timer.cancel()
        self._release_due = due
        self._release_timer = threading.Timer(max(0.0, due - time.monotonic()) + 0.05, self._on_release_timer)
        self._release_timer.daemon = True
        self._release_timer.start()

    def _on_release_timer(self):
        with self._lock:
            self._release_timer = self._release_due = None  # this one has fired: the next look may arm another
        self._schedule()

    def _cancel_release_timer(self):
        with self._lock:
            if self._release_timer is not None:
                self._release_timer.cancel()
            self._release_timer = self._release_due = None

    def _share_threads(self):
        """Tell each running worker its share of the cores (after a job starts, ends, pauses or resumes). Serialised,
        so that a stale count never lands after a newer one."""
        with self._share_lock:
            n = self.job_threads()
            for job in self.running():
                with job._lock:
                    if job._last_threads != n:
                        if job._command("threads", n) is not None:
                            job._last_threads = n

    def _requeue(self, job: Job):
        """A run resumed without a place: an interrupted one (restored, or stepped), or one that gave its place away
        while paused (already QUEUED); it waits at the queue's end."""
        with self._lock:
            if job.state == INTERRUPTED:
                job.state = QUEUED
                job._stop = False
            if job.state == QUEUED and job not in self._queue:
                self._queue.append(job)
        self._schedule()

    def _autosave(self, job: Job, final: bool = False, background: bool = False):
        """Autosave a job's resumable state. The copy is taken under the job's lock; with background=True the file
        is written by the writer thread, else here (final saves: the state must be on disk when the job ends)."""
        if self.autosave_dir is None:
            return
        job._ensure_trainer()
        if job.trainer is None:
            if final:  # ended before it had a trainer (stopped, or failed at its start): nothing to resume
                self._drop_pending(job)
                # a restored run that cannot be attached (its dataset gone), stopped: its file must say so, or it
                # comes back; one that failed to resume for that reason stays resumable for when the data is back
                if "restore_error" in job.extra and job.state == STOPPED:
                    self._rewrite_state(job)
            return
        with job._lock:
            t = job.trainer
            cfg, weights = t.config, None
            if job._worker_state is not None:  # the worker's last resumable state, with the history up to it (a
                ws = job._worker_state  # paused run's last epoch end can be behind the steps the mirror has)
                state = {**ws, "history": history_upto(copy_history(t.history), int(ws["step_count"]),
                                                       int(ws["epoch"]), job._worker_state_events)}
                # the file's settings and weights are the state's too: a change made after it (mid-epoch, before a
                # pause) is not in it, and a restart must not pair that change with the older optimizer state
                if isinstance(ws.get("train_config"), dict):
                    cfg = TrainConfig.from_dict(ws["train_config"])
                weights = ws.get("model")
            else:  # a restored run not resumed since
                state = t.state_dict()
            # the history is stored once: the checkpoint's and the trainer state's are the same object
            ck = make_checkpoint(t.model, train_config=cfg, history=None, metrics=t.last_epoch() or {},
                                 dataset=cfg.dataset,  # the state's weights: CPU copies from the pipe
                                 weights=weights if isinstance(weights, dict) else None)
            ck["history"] = state["history"]
            ck["job"] = {"id": job.id, "name": job.name, "group": job.group, "state": job.state,
                         "error": job.error, "created": job.created, "trainer_state": state,
                         "delay_s": job.delay_s,  # a lecture's slow motion, kept across a server restart
                         "owner": job.owner,  # the browser that started it (a hash): still its own after a restart
                         "train_wall": dict(job.extra.get("train_wall") or {})}
        path = self.autosave_dir / f"{job.id}.pt"

        def failed(exc):  # on the writer thread; without the job's lock, which a final save holds while it
            job.extra["autosave_error"] = f"autosave failed: {exc}"  # waits for the writer (one dict item: atomic)

        if background:
            self._writer.put(path, ck, failed)
            return
        self._writer.discard(path)  # an older pending copy must not land after this one
        self._writer.flush()
        try:
            save_checkpoint(path, ck)
        except OSError as exc:
            failed(exc)
            return
        if final:
            self._drop_pending(job)

    def _rewrite_state(self, job: Job):
        """Write the job's state and error into its autosave file, which is otherwise kept as it was."""
        path = self.autosave_dir / f"{job.id}.pt"
        try:
            ck = read_checkpoint(path)
            ck["job"] = {**ck["job"], "state": job.state, "error": job.error}
            save_checkpoint(path, ck)
        except (CheckpointError, OSError, KeyError, TypeError) as exc:
            job.extra["autosave_error"] = f"autosave failed: {exc}"

    def _restore(self):
        """Bring back jobs autosaved by an earlier server process: active ones as INTERRUPTED (resumable). Their
        trainers are attached lazily, on first use, so that a server with many old runs still starts fast."""
        if not self.autosave_dir.is_dir():
            return
        for p in sorted(self.autosave_dir.glob("*.pt")):
            try:
                ck = read_checkpoint(p)
                meta = ck["job"]
                tc = TrainConfig.from_dict(ck["train_config"])
                mc = ModelConfig.from_dict(ck["model_config"])
                job = Job(self, tc, mc, name=meta.get("name", ""), job_id=meta["id"], group=meta.get("group"))
                job._resume_state = meta["trainer_state"]
            except (CheckpointError, KeyError, TypeError, ValueError):
                continue
            job.created = meta.get("created", p.stat().st_mtime)
            job.error = meta.get("error")
            job.owner = meta["owner"] if isinstance(meta.get("owner"), str) else None
            try:
                job.delay_s = min(max(float(meta.get("delay_s", 0.0)), 0.0), 10.0)
            except (TypeError, ValueError):
                job.delay_s = 0.0
            state = meta.get("state")
            job.state = state if state in (FINISHED, STOPPED, FAILED) else INTERRUPTED
            self._jobs[job.id] = job
        for p in sorted(self.autosave_dir.glob("*.pending.json")):
            job_id = p.name.removesuffix(".pending.json")
            if job_id in self._jobs:  # its autosave is there: that is the run
                p.unlink(missing_ok=True)
                continue
            try:
                meta = json.loads(p.read_text())
                tc = TrainConfig.from_dict(meta["train_config"])
                mc = ModelConfig.from_dict(meta["model_config"]) if meta.get("model_config") else None
                job = Job(self, tc, mc, name=str(meta.get("name", "")), job_id=job_id, group=meta.get("group"))
                job.created = float(meta.get("created", p.stat().st_mtime))
                job.delay_s = min(max(float(meta.get("delay_s", 0.0)), 0.0), 10.0)
            except (OSError, KeyError, TypeError, ValueError, AttributeError):
                continue
            job.owner = meta["owner"] if isinstance(meta.get("owner"), str) else None
            job.state = INTERRUPTED  # Resume starts it from its first step
            job.extra["not_started"] = True
            self._jobs[job.id] = job


def _attach_restored_trainer(job: Job):
    """Build a trainer for a restored job from its autosaved state, so its weights can be read and saved and a
    resumed run goes on from there (no thread runs here). Called with the job's lock held."""
    try:
        t = Trainer(job.train_config, job.model_config, device="cpu")  # as the mirror of a running job
        t.load_state_dict(job._resume_state)
    except Exception as exc:  # its dataset may be gone: keep the entry, say why
        job.extra["restore_error"] = f"{type(exc).__name__}: {exc}"
        return
    job.trainer = t
    job.model_config = t.model.config
    job._resume_state = None
    job._weights_version += 1


__all__ = ["JobRegistry", "Job", "JobSnapshot", "copy_history", "default_threads", "threads_per_job", "default_nice",
           "QUEUED", "RUNNING", "PAUSED", "FINISHED", "STOPPED", "FAILED", "INTERRUPTED", "ACTIVE", "LIVE_SETTINGS"]
