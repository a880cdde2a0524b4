"""The trainer: in-memory batching on the device, Adam, a NaN/Inf guard, and a step-level API a UI can drive.

    t = Trainer(TrainConfig(dataset="digits", epochs=20), ModelConfig(latent_dim=2))
    t.fit()                      # or: while not t.done: t.step()   (pause/stop between steps)
    t.history["epoch"]["test_elbo"]

Seeded runs are deterministic on the CPU: the model init, the shuffling and the reparameterisation noise all come
from the seed, through generators owned by the trainer (never the global RNG, so threads do not interfere).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .config import ModelConfig, TrainConfig
from .data import Dataset, load_dataset
from .device import flush_denormals, resolve_device
from .diagnostics import evaluate
from .fused import AdamStep, FusedStep, unsupported_reason
from .losses import elbo_terms
from .model import VAE
from .schedules import make_schedule

_INIT_LOCK = threading.Lock()  # model init uses the global RNG: seed it under a lock, then restore it

STEP_KEYS = ("step", "epoch", "loss", "recon", "kl", "elbo", "beta", "lr")
EPOCH_KEYS = ("epoch", "step", "train_loss", "train_elbo", "train_recon", "train_kl", "test_elbo", "test_recon",
              "test_kl", "test_kl_per_dim", "active_units", "beta", "samples_per_s", "time_s")


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN/Inf. The model holds the last good weights."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


def new_history() -> dict:
    return {"step": {k: [] for k in STEP_KEYS}, "epoch": {k: [] for k in EPOCH_KEYS}, "events": []}


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where this torch supports it for the device, else the foreach implementation."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, foreach=True)


def _copy_optimizer_state(sd: dict) -> dict:
    """An optimizer state_dict whose tensors are copies (the groups' settings are plain values)."""
    return {"state": {k: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in s.items()}
                      for k, s in sd["state"].items()}, "param_groups": copy.deepcopy(sd["param_groups"])}


def describe_changes(config: TrainConfig, changes: dict) -> tuple[TrainConfig, str]:
    """The config with the changes (validated: ValueError naming the field) and the text marking them on curves."""
    new_cfg = dataclasses.replace(config, **changes)  # runs TrainConfig validation
    text = ", ".join(f"{k}: {getattr(config, k)!r} -> {v!r}" for k, v in changes.items() if getattr(config, k) != v)
    return new_cfg, text


def default_model_config(data: Dataset, **overrides) -> ModelConfig:
    """A model config that fits a dataset: its dimension, image shape and usual likelihood."""
    kw = dict(input_dim=data.dim, image_shape=data.image_shape, likelihood=data.info.default_likelihood)
    kw.update(overrides)
    return ModelConfig(**kw)


def build_model(config: ModelConfig, seed: int) -> VAE:
    """A freshly initialised VAE, the same for the same seed, without touching the global RNG state."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VAE(config)


MAX_PENDING_EVALS = 8  # background test evaluations queued before an epoch end waits for the oldest


class Trainer:
    def __init__(self, train_config: TrainConfig | None = None, model_config: ModelConfig | None = None,
                 train_data: Dataset | None = None, test_data: Dataset | None = None, model: VAE | None = None,
                 fused: bool = True, native: bool = True, background_eval: bool = False, device: str | None = None):
        """fused: the MLP's step with the backward pass written out (vae.fused; the same loss and gradients, in
        fewer operations) where the model allows; False always takes autograd. native: that step in C where
        vae.native's library is built (float32 on the CPU; see vae.native), else in torch. A Trainer sets the CPU
        to flush denormals to zero (vae.device.flush_denormals: Adam's state of a weight whose gradient is always 0
        would slow every step down for good), on this thread and on torch's thread pool if that has not started
        yet.

        background_eval: each epoch's test evaluation runs on a thread of its own, beside the next epoch's steps,
        on a copy of the model holding the epoch end's weights (on the CPU, while torch runs on one thread;
        otherwise it stays inline). The epoch records are the same, but they reach the history later, in order:
        settle() puts in those that are ready (or waits for all), and every method here that reads the history
        settles first (state_dict(history=False) does not: it holds none). An evaluation that fails raises at the
        settle() that meets it. The dashboard's training process uses it, so that a one-thread job spends its core
        on steps (vae.worker).

        device: where this trainer's model and data live, if not the config's device: the dashboard's server keeps
        a copy of each run (vae.jobs) on the CPU whatever the run trains on. A generator state of another device
        given to load_state_dict is then held as it is and handed back by state_dict (such a copy never trains)."""
        cfg = self.config = train_config or TrainConfig()
        self.device = resolve_device(device or cfg.device)
        self._placed = device is not None  # placed apart from its config's device (a copy that never trains)
        self._held_generator_state = None
        flush_denormals()  # Adam's state decays into denormals on constant pixels: see vae.device.flush_denormals
        self.train_data = train_data or load_dataset(cfg.dataset, "train", cfg.data_root, binarize=cfg.binarize,
                                                     max_examples=cfg.max_examples)
        self.test_data = test_data or load_dataset(cfg.dataset, "test", cfg.data_root, binarize=cfg.binarize)
        if model is None:
            model_config = model_config or default_model_config(self.train_data)
            if model_config.input_dim != self.train_data.dim:
                raise ValueError(f"input_dim={model_config.input_dim} does not match dataset '{cfg.dataset}' "
                                 f"(D={self.train_data.dim}); leave input_dim out to take the dataset's")
            model = build_model(model_config, cfg.seed)
        self.model = model.to(self.device)
        self.x_train = self.train_data.x.to(self.device)
        self.x_test = self.test_data.x.to(self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.optimizer = make_optimizer(self.model.parameters(), cfg.lr)
        self._adam = AdamStep(self.optimizer)
        self._fused = (FusedStep(self.model, native=native) if fused and unsupported_reason(self.model) is None
                       else None)
        self.steps_per_epoch = math.ceil(self.x_train.shape[0] / cfg.batch_size)
        self.schedule = make_schedule(cfg, self.steps_per_epoch)
        self.history = new_history()
        self.step_count = 0  # optimiser steps taken
        self.epoch = 0  # completed epochs
        self._perm = None
        self._pos = 0
        self._xb = None
        self._reset_epoch_sums()
        self._last_good = self._snapshot()
        self._last_good_at = None  # the counters of the last epoch end's snapshot (None: not an epoch end)
        self.background_eval = background_eval and self.device.type == "cpu"
        self._pending = collections.deque()  # (epoch record without its test figures, Future of them)
        self._evaluator = self._eval_model = None  # made at the first background evaluation

    # ---- state ------------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs

    @property
    def fused(self) -> bool:
        """True when steps run vae.fused's hand-written backward pass, False when they run autograd."""
        return self._fused is not None

    @property
    def step_path(self) -> str:
        """How a step is computed here: "native fused step" (vae.native, C), "fused step" (vae.fused, torch) or
        "autograd step"."""
        if self._fused is None:
            return "autograd step"
        if self._fused.can_chunk(self.x_train):  # the C library is there and takes this data
            return "native fused step"
        return "fused step"

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    def _counters(self) -> dict:
        """What a resumable state holds besides the weights and Adam's state, as of now (the config as the object:
        update() replaces it, never changes it, so its dict can wait until a state is asked for)."""
        return {"step_count": self.step_count, "epoch": self.epoch, "generator": self.generator.get_state(),
                "train_config": self.config, "events": len(self.history["events"])}

    def epoch_end_state(self) -> dict | None:
        """The resumable state (state_dict(history=False)) as of the last epoch end, taken from the snapshot made
        there (no copy now: nothing writes into it), with "events": how many events the history had then. None
        before the first epoch end of a run that did not start from a state. A paused run can be autosaved at its
        last epoch end this way, although it has taken steps since."""
        if self._last_good_at is None:
            return None
        weights, opt = self._last_good
        at = self._last_good_at
        return {"model": {k: v.cpu() for k, v in weights.items()}, "optimizer": opt, **at,
                "train_config": at["train_config"].to_dict()}

    def _snapshot(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}, \
            _copy_optimizer_state(self.optimizer.state_dict())

    def _restore_last_good(self):
        weights, opt = self._last_good
        self.model.load_state_dict(weights)
        # a copy: load_state_dict keeps the tensors it is given, and the steps after it must not write into the
        # snapshot (a second divergence in the same epoch goes back to the same state)
        self.optimizer.load_state_dict(_copy_optimizer_state(opt))
        for group in self.optimizer.param_groups:  # Adam's state goes back, but an lr set by update() stays
            group["lr"] = self.config.lr

    def _reset_epoch_sums(self):
        self._sums = {"n": 0, "loss": 0.0, "recon": 0.0, "kl": 0.0, "compute_s": 0.0}

    # ---- changes while running ----------------------------------------------------------------------------------
    def update(self, **changes) -> str:
        """Change lr, beta or the schedule's settings mid-run (validated). Returns the event text, also recorded."""
        new_cfg, text = describe_changes(self.config, changes)
        self.config = new_cfg
        if "lr" in changes:
            for group in self.optimizer.param_groups:
                group["lr"] = new_cfg.lr
        self.schedule = make_schedule(new_cfg, self.steps_per_epoch)
        if text:
            self.history["events"].append({"step": self.step_count, "epoch": self.epoch, "text": text})
        return text

    # ---- one optimiser step ------------------------------------------------------------------------------------
    def step(self) -> dict:
        """One batch: forward, backward, guard, Adam. Ends the epoch (with a test evaluation) on its last batch."""
        if self.done:
            raise RuntimeError(f"training is finished ({self.epoch} epochs); raise epochs to go on")
        t0 = time.perf_counter()
        cfg = self.config
        self._start_epoch()
        idx = self._perm[self._pos:self._pos + cfg.batch_size]
        b = idx.shape[0]
        beta = self.schedule.beta(self.step_count)
        capacity = self.schedule.capacity(self.step_count)
        if not self.model.training:  # train() walks every module: ~0.1 ms a step for nothing
            self.model.train()
        adam_done = False
        if self._fused is not None:  # sets every .grad; the C step takes Adam's too, where it can (not with a clip)
            vals, adam_done = self._fused.terms(self.x_train, beta, cfg.free_bits, capacity, self.generator,
                                                self._adam if cfg.grad_clip <= 0 else None, rows=idx)
        else:
            if self._xb is None or self._xb.shape[0] != b:  # one batch buffer, refilled each step
                self._xb = self.x_train.new_empty((b, self.x_train.shape[1]))
            xb = torch.index_select(self.x_train, 0, idx, out=self._xb)
            terms = elbo_terms(self.model, xb, beta=beta, free_bits=cfg.free_bits, capacity=capacity,
                               generator=self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            vals = torch.stack([terms.loss.detach(), terms.recon.detach(), terms.kl.detach()]).tolist()
        if cfg.grad_clip > 0:
            vals.append(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).item())
        if not all(math.isfinite(v) for v in vals):
            self._diverged(vals)
        if not adam_done:
            self._adam.step()
        self._sums["compute_s"] += time.perf_counter() - t0
        return self._record(vals, b, beta)

    def steps(self, n: int) -> list[dict]:
        """Up to n steps, as many single step() calls would take them (the same batches, draws and history), but
        never past the end of the epoch: the records of the steps taken (the last may end the epoch). Where the C
        library can (vae.native: the fused MLP step on the CPU, no gradient clipping), all but the epoch's last
        step run in one call, without Python between the steps; elsewhere, and for that last step, step()."""
        if n < 1:
            return []
        if self.done:
            raise RuntimeError(f"training is finished ({self.epoch} epochs); raise epochs to go on")
        cfg, size, B = self.config, self.x_train.shape[0], self.config.batch_size
        self._start_epoch()
        recs = []
        chunks = self._fused is not None and cfg.grad_clip <= 0 and self._fused.can_chunk(self.x_train)
        while n > 0 and not self.done and not (recs and recs[-1]["epoch_end"]):
            # full batches before the epoch's last step (which ends the epoch, and may be a smaller batch)
            k = min(n, (size - self._pos - 1) // B)
            tried, had_state = chunks and k >= 2, bool(self.optimizer.state)
            out = self._chunk(k) if tried else None
            if out is None:  # one step: the epoch's last, or the first of a run (Adam's state is made there)
                if tried and had_state:  # refused for another reason (a setting it does not cover): no more tries
                    chunks = False
                recs.append(self.step())
                n -= 1
            else:
                recs += out
                n -= len(out)
        return recs

    def _chunk(self, k: int) -> list[dict] | None:
        """k full-batch steps in one call (vae.fused.FusedStep.native_steps), or None where it cannot."""
        cfg, B, first = self.config, self.config.batch_size, self.step_count
        t0 = time.perf_counter()
        betas = [self.schedule.beta(first + i) for i in range(k)]
        caps = [self.schedule.capacity(first + i) for i in range(k)]
        if not self.model.training:
            self.model.train()
        out = self._fused.native_steps(self.x_train, self._perm[self._pos:self._pos + k * B], B, betas,
                                       cfg.free_bits, None if caps[0] is None else caps, self.generator, self._adam)
        if out is None:
            return None
        self._sums["compute_s"] += time.perf_counter() - t0
        recs = []
        for vals, beta in zip(out, betas):
            if not all(math.isfinite(v) for v in vals):
                self._diverged(vals)
            recs.append(self._record(vals, B, beta))
        return recs

    def _start_epoch(self):
        """The epoch's order of the training examples, drawn at its first step."""
        if self._perm is None:
            self._perm = torch.randperm(self.x_train.shape[0], generator=self.generator, device=self.device)
            self._pos = 0

    def _diverged(self, vals):
        """A step gave a loss (or gradient norm) that is not finite: back to the last epoch end's weights, and
        raise."""
        cfg = self.config
        self._restore_last_good()
        what = "gradient norm" if all(math.isfinite(v) for v in vals[:3]) else "loss"
        step = self.step_count + 1  # the step that went wrong (not counted: step_count is the steps completed)
        raise TrainingDiverged(step, (
            f"the {what} became {vals[0] if what == 'loss' else vals[3]} at step {step} "
            f"(epoch {self.epoch + 1}); the weights from the end of epoch {self.epoch} are kept. "
            f"Try a lower lr (now {cfg.lr:g}), gradient clipping, or a smaller beta"))

    def _record(self, vals, b, beta) -> dict:
        """Count a step taken (its terms vals, batch size b): the epoch's sums, the history, its record; ends the
        epoch on its last batch."""
        loss, recon, kl = vals[:3]
        n = self.x_train.shape[0]
        self.step_count += 1
        self._pos += b
        s = self._sums
        s["n"] += b
        s["loss"] += loss * b
        s["recon"] += recon * b
        s["kl"] += kl * b
        rec = {"step": self.step_count, "epoch": self.epoch + self._pos / n, "loss": loss, "recon": recon,
               "kl": kl, "elbo": -(recon + kl), "beta": beta, "lr": self.config.lr}
        for k in STEP_KEYS:
            self.history["step"][k].append(rec[k])
        rec["epoch_end"] = self._pos >= n
        if rec["epoch_end"]:
            self._end_epoch(beta)
        return rec

    def _end_epoch(self, beta):
        s = self._sums
        self.epoch += 1
        self._perm = None
        rec = {"epoch": self.epoch, "step": self.step_count, "train_loss": s["loss"] / s["n"],
               "train_elbo": -(s["recon"] + s["kl"]) / s["n"], "train_recon": s["recon"] / s["n"],
               "train_kl": s["kl"] / s["n"], "beta": beta, "samples_per_s": s["n"] / max(s["compute_s"], 1e-9),
               "time_s": s["compute_s"]}
        self._reset_epoch_sums()
        self._last_good = self._snapshot()
        self._last_good_at = self._counters()
        # beside the steps only when they run on one thread: two OpenMP teams on the same cores (the steps' and the
        # evaluation's) wait on each other, and training went five times slower that way (docs/performance.md)
        if not self.background_eval or torch.get_num_threads() > 1:
            self.settle()  # the records stay in epoch order
            self._add_epoch(rec, evaluate(self.model, self.x_test, seed=self.config.seed))
            return
        if self._evaluator is None:
            self._evaluator = ThreadPoolExecutor(1, thread_name_prefix="vae-eval")
            self._eval_model = copy.deepcopy(self.model).eval()
        if len(self._pending) >= MAX_PENDING_EVALS:  # the evaluations fall behind: wait for the oldest
            self._settle_one()
        # the snapshot's weights: copies, which no later step writes into
        self._pending.append((rec, self._evaluator.submit(self._evaluate_copy, self._last_good[0],
                                                          self.config.seed)))

    def _evaluate_copy(self, weights: dict, seed: int) -> dict:
        """The evaluator thread: the test split through a copy of the model holding the given weights (on one
        thread: a new thread takes torch's thread count of the moment, one here)."""
        self._eval_model.load_state_dict(weights)
        return evaluate(self._eval_model, self.x_test, seed=seed)

    def _add_epoch(self, rec: dict, test: dict):
        rec.update(test_elbo=test["elbo"], test_recon=test["recon"], test_kl=test["kl"],
                   test_kl_per_dim=test["kl_per_dim"], active_units=test["active_units"])
        for k in EPOCH_KEYS:
            self.history["epoch"][k].append(rec[k])

    def _settle_one(self):
        rec, fut = self._pending.popleft()
        try:
            test = fut.result()
        except BaseException:  # raised here; the later evaluations are dropped (no history with a gap in it)
            self._drop_pending()
            raise
        self._add_epoch(rec, test)

    def _drop_pending(self):
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()

    def settle(self, wait: bool = True, upto: int | None = None) -> int:
        """Put the background evaluations' epoch records into the history, in epoch order: all of them (waiting
        for those still running), or with wait=False those ready before the first that is not; with upto, only
        the epochs up to that one. Returns how many. Nothing to do without background_eval."""
        n = 0
        while self._pending:
            rec, fut = self._pending[0]
            if upto is not None and rec["epoch"] > upto:
                break  # a later one's failure must not stand in the way of these
            if not (fut.done() or wait):
                break
            self._settle_one()
            n += 1
        return n

    def close(self, settle: bool = True):
        """Settle (settle=False: drop the evaluations not yet in), then end the evaluator thread (a background_eval
        trainer; the next epoch end makes another)."""
        try:
            if settle:
                self.settle()
            else:
                self._drop_pending()
        finally:
            if self._evaluator is not None:
                self._evaluator.shutdown(wait=True)
                self._evaluator = None

    def run_epoch(self, on_step=None, should_stop=None) -> dict | None:
        """Steps to the end of the current epoch. on_step(record) after each step; should_stop() -> True stops
        between steps (returns None then). Returns the epoch record."""
        while not self.done:
            # in chunks (see steps()): 64 of the bench's steps take about 0.15 s; one at a time with should_stop
            for rec in self.steps(1 if should_stop is not None else 64):
                if on_step is not None:
                    on_step(rec)
                if rec["epoch_end"]:
                    return self.last_epoch()
            if should_stop is not None and should_stop():
                return None
        return None

    def fit(self, on_step=None, on_epoch=None, should_stop=None) -> dict:
        """Train for the configured epochs. Returns final_metrics()."""
        while not self.done:
            rec = self.run_epoch(on_step, should_stop)
            if rec is None:
                break
            if on_epoch is not None:
                on_epoch(rec)
        return self.final_metrics()

    def last_epoch(self) -> dict | None:
        self.settle()
        h = self.history["epoch"]
        if not h["epoch"]:
            return None
        return {k: v[-1] for k, v in h.items()}

    def final_metrics(self) -> dict:
        """Test-split figures of the current weights, in nats per example (the ELBO is negative)."""
        self.settle()
        test = evaluate(self.model, self.x_test, seed=self.config.seed)
        sps = self.history["epoch"]["samples_per_s"]
        return {"test_elbo": test["elbo"], "test_recon": test["recon"], "test_kl": test["kl"],
                "test_kl_per_dim": test["kl_per_dim"], "active_units": test["active_units"],
                "samples_per_s": sum(sps) / len(sps) if sps else None, "epochs": self.epoch,
                "steps": self.step_count}

    # ---- resumable state (autosave) -----------------------------------------------------------------------------
    def state_dict(self, history: bool = True) -> dict:
        """Everything needed to resume exactly at an epoch boundary: weights, Adam state, counters, RNG, history
        (history=False leaves it out, for a caller that has it already). Plain tensors and containers only, so it
        loads with weights_only=True."""
        if history:
            self.settle()
        # copies, not views: training goes on (in place, maybe in another thread) while the state is saved
        state = {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                 "optimizer": _copy_optimizer_state(self.optimizer.state_dict()), "step_count": self.step_count,
                 "epoch": self.epoch,
                 "generator": (self._held_generator_state if self._held_generator_state is not None
                               else self.generator.get_state()), "train_config": self.config.to_dict()}
        if history:
            state["history"] = copy.deepcopy(self.history)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.settle()  # an evaluation still running is of the weights being replaced: its record goes too
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count, self.epoch = int(state["step_count"]), int(state["epoch"])
        try:
            self.generator.set_state(state["generator"])
            self._held_generator_state = None
        except (RuntimeError, TypeError, ValueError):
            if not self._placed:
                raise  # a trainer on its config's device: a broken state, not another device's
            self._held_generator_state = state["generator"].clone()
        self.history = copy.deepcopy(state["history"])
        self._perm, self._pos = None, 0
        self._reset_epoch_sums()
        self._last_good = self._snapshot()
        self._last_good_at = self._counters()  # a resumable state is one of an epoch end

    def checkpoint(self) -> dict:
        """Everything a checkpoint file holds (see vae.checkpoint.save_checkpoint)."""
        from .checkpoint import make_checkpoint

        self.settle()
        return make_checkpoint(self.model, train_config=self.config, history=self.history,
                               metrics=self.final_metrics(), dataset=self.config.dataset)
