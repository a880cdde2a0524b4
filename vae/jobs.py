"""A process-wide registry of background training jobs (no Streamlit here: the UI holds one registry in
st.cache_resource and polls snapshots).

    registry = JobRegistry(max_concurrent=2, autosave_dir="checkpoints/autosave")
    job = registry.submit(TrainConfig(epochs=20), ModelConfig(latent_dim=2), name="demo")
    job.pause(); job.step_once(); job.resume(); job.update(beta=4.0); job.stop()
    snap = job.snapshot()          # a consistent copy, taken under the job's lock

Each job runs in its own daemon thread that never touches the UI. The registry caps how many run at once; jobs over
the cap wait in a FIFO queue (never dropped) and start as others end. Every finished epoch is autosaved atomically,
so a server restart loses at most one epoch: restored jobs come back as "interrupted" and can be resumed.
"""
from __future__ import annotations

import copy
import itertools
import os
import secrets
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import CheckpointError, make_checkpoint, read_checkpoint, save_checkpoint
from .config import ModelConfig, TrainConfig
from .trainer import Trainer, TrainingDiverged

QUEUED, RUNNING, PAUSED, FINISHED, STOPPED, FAILED, INTERRUPTED = (
    "queued", "running", "paused", "finished", "stopped", "failed", "interrupted")
ACTIVE = (QUEUED, RUNNING, PAUSED)
MAX_JOBS_ENV = "VAE_MAX_JOBS"


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
    samples_per_s: float | None
    eta_s: float | None
    queue_position: int | None  # 1-based place in the queue while queued
    delay_s: float
    history: dict
    train_config: dict
    model_config: dict | None
    weights_version: int  # bumps whenever the weights change (each step): a cache key for the latest weights
    created: float
    group: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


class Job:
    def __init__(self, registry: "JobRegistry", train_config: TrainConfig, model_config: ModelConfig | None,
                 name: str = "", job_id: str | None = None, group: str | None = None, start_paused: bool = False):
        self.registry = registry
        self.id = job_id or secrets.token_hex(4)
        self.name = name or self.id
        self.group = group  # e.g. a sweep id: jobs of one sweep share it
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
        self._resume_state: dict | None = None
        self._t_started: float | None = None

    # ---- controls (any thread) --------------------------------------------------------------------------------
    def pause(self):
        with self._cond:
            self._paused = True
            if self.state == RUNNING:
                self.state = PAUSED
            self._cond.notify_all()

    def resume(self):
        with self._cond:
            self._paused = False
            if self.state == PAUSED:
                self.state = RUNNING
            self._cond.notify_all()
        if self.state == INTERRUPTED:
            self.registry._requeue(self)

    def step_once(self, n: int = 1):
        """Run n single steps, then stay paused."""
        with self._cond:
            self._paused = True
            if self.state == RUNNING:
                self.state = PAUSED
            self._steps_requested += n
            self._cond.notify_all()
        if self.state == INTERRUPTED:
            self.registry._requeue(self)

    def stop(self):
        with self._cond:
            self._stop = True
            if self.state in (QUEUED, INTERRUPTED):
                self.state = STOPPED
            self._cond.notify_all()
        self.registry._schedule()

    def set_delay(self, seconds: float):
        if not (0 <= float(seconds) <= 10):
            raise ValueError(f"delay={seconds!r} is not allowed: give 0 to 10 seconds per step")
        with self._cond:
            self.delay_s = float(seconds)
            self._cond.notify_all()

    def update(self, **changes) -> str:
        """Change lr / beta / schedule settings mid-run; recorded as an event on the curves. ValueError if bad."""
        with self._lock:
            if self.trainer is None:
                self.train_config = TrainConfig.from_dict({**self.train_config.to_dict(), **changes})
                return ""
            text = self.trainer.update(**changes)
            self.train_config = self.trainer.config
            return text

    # ---- reading (any thread) ---------------------------------------------------------------------------------
    def snapshot(self) -> JobSnapshot:
        queue_position = self.registry.queue_position(self)  # before our lock: never hold both the other way round
        with self._lock:
            t = self.trainer
            hist = copy.deepcopy(t.history) if t is not None else _empty_history(self._resume_state)
            step = t.step_count if t else 0
            total = t.total_steps if t else 0
            spe = t.steps_per_epoch if t else 0
            sps = hist["epoch"]["samples_per_s"][-1] if hist["epoch"].get("samples_per_s") else None
            eta = None
            if t is not None and sps and self.state in (RUNNING, PAUSED):
                eta = (total - step) * t.config.batch_size / sps
            return JobSnapshot(
                id=self.id, name=self.name, state=self.state, error=self.error, epoch=t.epoch if t else 0,
                step=step, total_steps=total, epochs=self.train_config.epochs, steps_per_epoch=spe,
                samples_per_s=sps, eta_s=eta, queue_position=queue_position,
                delay_s=self.delay_s, history=hist, train_config=self.train_config.to_dict(),
                model_config=(t.model.config.to_dict() if t else
                              (self.model_config.to_dict() if self.model_config else None)),
                weights_version=self._weights_version, created=self.created, group=self.group,
                extra=dict(self.extra))

    def latest_weights(self):
        """(model_config dict, state_dict copy on the CPU, weights_version), or None before the model exists."""
        with self._lock:
            if self.trainer is None:
                return None
            m = self.trainer.model
            return (m.config.to_dict(), {k: v.detach().cpu().clone() for k, v in m.state_dict().items()},
                    self._weights_version)

    def checkpoint(self) -> dict:
        """A checkpoint of the current (or last good) weights, with the history so far."""
        with self._lock:
            if self.trainer is None:
                raise ValueError(f"run {self.name!r} has no weights yet: start it first")
            t = self.trainer
            return make_checkpoint(t.model, train_config=t.config, history=copy.deepcopy(t.history),
                                   metrics=t.final_metrics(), dataset=t.config.dataset)

    def join(self, timeout: float | None = None):
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the worker thread ------------------------------------------------------------------------------------
    def _start(self):
        with self._lock:
            self.state = PAUSED if self._paused else RUNNING
            self._t_started = time.time()
            self._occupies_slot = True
        self._thread = threading.Thread(target=self._run, name=f"vae-job-{self.id}", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            trainer = Trainer(self.train_config, self.model_config)
            if self._resume_state is not None:
                trainer.load_state_dict(self._resume_state)
                self._resume_state = None
            with self._lock:
                self.trainer = trainer
                self.model_config = trainer.model.config
                self._weights_version += 1
            while True:
                with self._cond:
                    while not trainer.done and self._paused and self._steps_requested == 0 and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        self.state = STOPPED
                        break
                    if trainer.done:
                        self.state = FINISHED
                        break
                    if self._steps_requested:
                        self._steps_requested -= 1
                    rec = trainer.step()
                    self._weights_version += 1
                    delay = self.delay_s
                if rec["epoch_end"]:
                    self.registry._autosave(self)
                if delay > 0:
                    with self._cond:  # an interruptible sleep: stop/pause/delay change wake it
                        self._cond.wait(timeout=delay)
        except TrainingDiverged as exc:
            with self._lock:
                self.state, self.error = FAILED, str(exc)
                self._weights_version += 1
        except Exception as exc:  # shown on the page, not only in the console
            with self._lock:
                self.state = FAILED
                self.error = f"{type(exc).__name__}: {exc}"
                self.extra["traceback"] = traceback.format_exc(limit=6)
        finally:
            self.registry._autosave(self, final=True)
            self._occupies_slot = False
            self.registry._schedule()


def _empty_history(state: dict | None) -> dict:
    if state is not None:
        return copy.deepcopy(state["history"])
    from .trainer import new_history

    return new_history()


class JobRegistry:
    def __init__(self, max_concurrent: int | None = None, autosave_dir: str | os.PathLike | None = None,
                 restore: bool = True):
        if max_concurrent is None:
            max_concurrent = int(os.environ.get(MAX_JOBS_ENV, "2"))
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent={max_concurrent} is not allowed: at least 1 job must be able to run")
        self.max_concurrent = max_concurrent
        self.autosave_dir = Path(autosave_dir) if autosave_dir else None
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._queue: list[Job] = []
        self._counter = itertools.count(1)
        if restore and self.autosave_dir is not None:
            self._restore()

    # ---- submitting and finding --------------------------------------------------------------------------------
    def submit(self, train_config: TrainConfig, model_config: ModelConfig | None = None, name: str = "",
               group: str | None = None, start_paused: bool = False) -> Job:
        job = Job(self, train_config, model_config, name=name, group=group, start_paused=start_paused)
        with self._lock:
            self._jobs[job.id] = job
            self._queue.append(job)
        self._schedule()
        return job

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
        if self.autosave_dir is not None:
            (self.autosave_dir / f"{job_id}.pt").unlink(missing_ok=True)

    def queue_position(self, job: Job) -> int | None:
        with self._lock:
            try:
                return self._queue.index(job) + 1
            except ValueError:
                return None

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j._occupies_slot]

    def shutdown(self, timeout: float = 5.0):
        """Stop every job and wait for the threads (tests, server exit)."""
        for j in self.jobs():
            j.stop()
        for j in self.jobs():
            j.join(timeout)

    # ---- internals --------------------------------------------------------------------------------------------
    def _schedule(self):
        with self._lock:
            self._queue = [j for j in self._queue if j.state == QUEUED and not j._stop]
            busy = sum(1 for j in self._jobs.values() if j._occupies_slot)
            while self._queue and busy < self.max_concurrent:
                job = self._queue.pop(0)
                job._start()
                busy += 1

    def _requeue(self, job: Job):
        with self._lock:
            if job.state == INTERRUPTED:
                job.state = QUEUED
                job._stop = False
                self._queue.append(job)
        self._schedule()

    def _autosave(self, job: Job, final: bool = False):
        if self.autosave_dir is None or job.trainer is None:
            return
        with job._lock:
            t = job.trainer
            ck = make_checkpoint(t.model, train_config=t.config, history=copy.deepcopy(t.history),
                                 metrics=t.last_epoch() or {}, dataset=t.config.dataset)
            ck["job"] = {"id": job.id, "name": job.name, "group": job.group, "state": job.state,
                         "error": job.error, "created": job.created, "trainer_state": t.state_dict()}
        try:
            save_checkpoint(self.autosave_dir / f"{job.id}.pt", ck)
        except OSError as exc:  # a full disk must not kill the run
            with job._lock:
                job.extra["autosave_error"] = f"autosave failed: {exc}"

    def _restore(self):
        """Bring back jobs autosaved by an earlier server process: active ones as INTERRUPTED (resumable)."""
        if not self.autosave_dir.is_dir():
            return
        for p in sorted(self.autosave_dir.glob("*.pt")):
            try:
                ck = read_checkpoint(p)
                meta = ck["job"]
                tc = TrainConfig.from_dict(ck["train_config"])
                mc = ModelConfig.from_dict(ck["model_config"])
            except (CheckpointError, KeyError, TypeError, ValueError):
                continue
            job = Job(self, tc, mc, name=meta.get("name", ""), job_id=meta["id"], group=meta.get("group"))
            job.created = meta.get("created", p.stat().st_mtime)
            job.error = meta.get("error")
            state = meta.get("state")
            job.state = state if state in (FINISHED, STOPPED, FAILED) else INTERRUPTED
            job._resume_state = meta["trainer_state"]
            self._jobs[job.id] = job
        # a finished/stopped/failed restored job still offers its weights through a paused-at-end trainer
        for job in self._jobs.values():
            if job.state != INTERRUPTED and job._resume_state is not None:
                _attach_restored_trainer(job)


def _attach_restored_trainer(job: Job):
    """Build a trainer for a restored, ended job so its weights can be read and saved (no thread runs)."""
    try:
        t = Trainer(job.train_config, job.model_config)
        t.load_state_dict(job._resume_state)
    except Exception as exc:  # its dataset may be gone: keep the entry, say why
        job.extra["restore_error"] = f"{type(exc).__name__}: {exc}"
        return
    job.trainer = t
    job._resume_state = None
    job._weights_version += 1


__all__ = ["JobRegistry", "Job", "JobSnapshot", "QUEUED", "RUNNING", "PAUSED", "FINISHED", "STOPPED", "FAILED",
           "INTERRUPTED", "ACTIVE"]
