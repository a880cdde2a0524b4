"""Configuration dataclasses, validated on creation.

Every bad value raises ValueError naming the field, the value and what is allowed, so the CLI and the UI can show it
as a one-line message.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

ARCHS = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned")
DECODERS = ("standard", "autoregressive")
SCHEDULES = ("constant", "linear", "logistic", "cyclical", "capacity")
DEVICES = ("auto", "cpu", "cuda", "mps")


def _bad(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not allowed: {allowed}")


def _check_number(name, value, *, minimum=None, exclusive=False, integer=False, maximum=None):
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise _bad(name, value, "expected " + ("an integer" if integer else "a number"))
    if not integer and not math.isfinite(value):
        raise _bad(name, value, "expected a finite number")
    if minimum is not None:
        if exclusive and value <= minimum:
            raise _bad(name, value, f"must be > {minimum}")
        if not exclusive and value < minimum:
            raise _bad(name, value, f"must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise _bad(name, value, f"must be <= {maximum}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise _bad(name, value, "choose one of " + ", ".join(choices))


@dataclass
class ModelConfig:
    input_dim: int = 64  # D: flattened data dimension
    image_shape: tuple = (8, 8)  # shape of one example for display: (H, W) for images, (2,) for 2-D points
    arch: str = "mlp"  # mlp | conv (conv needs an (H, W) image with H, W divisible by 4)
    hidden: tuple = (256, 128)  # MLP hidden sizes (encoder; the decoder mirrors them). conv: size of the dense layer
    latent_dim: int = 16  # d: number of latent dimensions
    likelihood: str = "bernoulli"  # bernoulli (logits) | gaussian (fixed sigma) | gaussian-learned (per-pixel sigma)
    sigma: float = 0.1  # decoder std for the fixed-variance Gaussian likelihood
    decoder: str = "standard"  # standard | autoregressive (sees previous pixels: strong enough to ignore z)

    def __post_init__(self):
        self.image_shape = tuple(int(s) for s in self.image_shape)
        self.hidden = tuple(self.hidden)
        _check_number("input_dim", self.input_dim, minimum=1, integer=True)
        _check_number("latent_dim", self.latent_dim, minimum=1, integer=True, maximum=1024)
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("likelihood", self.likelihood, LIKELIHOODS)
        _check_choice("decoder", self.decoder, DECODERS)
        _check_number("sigma", self.sigma, minimum=0, exclusive=True)
        if not self.hidden:
            raise _bad("hidden", self.hidden, "give at least one hidden size, e.g. 256,128")
        for h in self.hidden:
            _check_number("hidden", h, minimum=1, integer=True, maximum=8192)
        if math.prod(self.image_shape) != self.input_dim:
            raise _bad("image_shape", self.image_shape, f"its product must equal input_dim={self.input_dim}")
        if self.arch == "conv":
            if len(self.image_shape) != 2 or self.image_shape[0] % 4 or self.image_shape[1] % 4:
                raise _bad("arch", self.arch, f"conv needs an (H, W) image with H and W divisible by 4, "
                                              f"got image_shape={self.image_shape}; use arch=mlp")
        if self.decoder == "autoregressive" and self.likelihood != "bernoulli":
            raise _bad("decoder", self.decoder, "the autoregressive decoder needs likelihood=bernoulli")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_shape"] = list(self.image_shape)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainConfig:
    dataset: str = "digits"  # a name from vae.data.DATASETS
    data_root: str | None = None  # folder for MNIST-style files; None: $VAE_DATA_ROOT or data/
    binarize: bool = False  # static Bernoulli binarisation of the data (seeded)
    epochs: int = 30  # passes over the training split
    batch_size: int = 128
    lr: float = 1e-3  # Adam learning rate
    grad_clip: float = 0.0  # max gradient norm; 0 disables clipping
    beta: float = 1.0  # KL weight (the target value for warm-up schedules; gamma for capacity annealing)
    beta_schedule: str = "constant"  # constant | linear | logistic | cyclical | capacity
    warmup_epochs: float = 10.0  # linear/logistic warm-up length; capacity: epochs to ramp C to capacity_max
    cycles: int = 4  # cyclical: number of cycles M over the whole run (Fu et al. 2019)
    cycle_ratio: float = 0.5  # cyclical: fraction R of each cycle spent increasing beta
    capacity_max: float = 25.0  # capacity annealing: C_max in nats (Burgess et al. 2018)
    free_bits: float = 0.0  # lambda: per-dimension floor on the batch-averaged KL, nats (Kingma et al. 2016)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    max_examples: int | None = None  # use only the first N training examples (quick runs)

    def __post_init__(self):
        from .data import DATASETS  # local import: data imports nothing from config

        _check_choice("dataset", self.dataset, tuple(DATASETS))
        _check_number("epochs", self.epochs, minimum=1, integer=True, maximum=100_000)
        _check_number("batch_size", self.batch_size, minimum=1, integer=True, maximum=1_000_000)
        _check_number("lr", self.lr, minimum=0, exclusive=True)
        _check_number("grad_clip", self.grad_clip, minimum=0)
        _check_number("beta", self.beta, minimum=0)
        _check_choice("beta_schedule", self.beta_schedule, SCHEDULES)
        _check_number("warmup_epochs", self.warmup_epochs, minimum=0, exclusive=True)
        _check_number("cycles", self.cycles, minimum=1, integer=True)
        _check_number("cycle_ratio", self.cycle_ratio, minimum=0, exclusive=True, maximum=1)
        _check_number("capacity_max", self.capacity_max, minimum=0)
        _check_number("free_bits", self.free_bits, minimum=0)
        _check_number("seed", self.seed, minimum=0, integer=True)
        _check_choice("device", self.device, DEVICES)
        if self.max_examples is not None:
            _check_number("max_examples", self.max_examples, minimum=1, integer=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def parse_hidden(text: str) -> tuple:
    """'256,128' or '256 128' -> (256, 128), with a clear error for anything else."""
    parts = str(text).strip().split(",")
    if parts and not parts[-1].strip():
        parts.pop()  # a trailing comma ("256,128,")
    # spaces separate sizes too ("256 128"; they were dropped, which read it as 256128); an empty part between
    # commas ("256,,128") stays an error
    parts = [w for p in parts for w in (p.split() or [""])]
    try:
        sizes = tuple(int(s) for s in parts)
    except ValueError:
        raise _bad("hidden", text, "give positive integers separated by commas or spaces, e.g. 256,128") from None
    if not sizes:
        raise _bad("hidden", text, "give positive integers separated by commas or spaces, e.g. 256,128")
    return sizes


__all__ = ["ModelConfig", "TrainConfig", "parse_hidden", "ARCHS", "LIKELIHOODS", "DECODERS", "SCHEDULES", "DEVICES"]
