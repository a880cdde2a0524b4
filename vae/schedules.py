"""KL-weight schedules behind one interface: beta(step), plus capacity(step) for capacity annealing.

    constant   beta
    linear     beta * min(1, step / warmup)                                   (Bowman et al. 2016)
    logistic   beta / (1 + exp(-k (step - warmup / 2))), k = 10 / warmup       (Bowman et al. 2016)
    cyclical   M cycles; in each, beta rises linearly over a fraction R, then stays (Fu et al. 2019)
    capacity   loss = recon + gamma |KL - C(step)|, C = C_max * min(1, step / warmup) (Burgess et al. 2018)
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    kind: str = "constant"
    beta_max: float = 1.0  # target beta (gamma for capacity)
    warmup_steps: int = 1  # linear/logistic warm-up length; capacity ramp length
    total_steps: int = 1  # cyclical: the whole run
    cycles: int = 4
    ratio: float = 0.5
    capacity_max: float = 25.0

    def __post_init__(self):
        if self.warmup_steps < 1 or self.total_steps < 1:
            raise ValueError(f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps}: both must be >= 1")

    def beta(self, step: int) -> float:
        b = self.beta_max
        if self.kind in ("constant", "capacity"):
            return b
        if self.kind == "linear":
            return b * min(1.0, step / self.warmup_steps)
        if self.kind == "logistic":
            k = 10.0 / self.warmup_steps
            return b / (1.0 + math.exp(-k * (step - self.warmup_steps / 2)))
        if self.kind == "cyclical":
            period = self.total_steps / self.cycles
            tau = (step % period) / period
            return b * min(1.0, tau / self.ratio)
        raise ValueError(f"beta_schedule={self.kind!r} is not known")

    def capacity(self, step: int) -> float | None:
        if self.kind != "capacity":
            return None
        return self.capacity_max * min(1.0, step / self.warmup_steps)

    def describe(self) -> str:
        if self.kind == "constant":
            return f"beta = {self.beta_max:g}"
        if self.kind in ("linear", "logistic"):
            return f"{self.kind} warm-up of beta to {self.beta_max:g} over {self.warmup_steps} steps"
        if self.kind == "cyclical":
            return f"cyclical beta up to {self.beta_max:g}: {self.cycles} cycles, rising for {self.ratio:g} of each"
        return f"capacity: gamma = {self.beta_max:g}, C ramped to {self.capacity_max:g} nats over {self.warmup_steps} steps"


def make_schedule(cfg, steps_per_epoch: int) -> Schedule:
    """The schedule a TrainConfig asks for, with its epoch-based lengths converted to steps."""
    return Schedule(kind=cfg.beta_schedule, beta_max=cfg.beta,
                    warmup_steps=max(1, round(cfg.warmup_epochs * steps_per_epoch)),
                    total_steps=max(1, cfg.epochs * steps_per_epoch), cycles=cfg.cycles, ratio=cfg.cycle_ratio,
                    capacity_max=cfg.capacity_max)
