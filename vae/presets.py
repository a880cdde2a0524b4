"""Training presets for the Train page: small, seeded digits runs that each tell one story in seconds on a CPU.

    cfg, mcfg = preset_configs("reproduce KL collapse")     # (TrainConfig, ModelConfig overrides)

Settings follow REFERENCES.md: on digits with a 16-dimensional latent, beta = 4 with no warm-up collapses every
dimension; free bits lambda = 0.5 at the same beta keeps them active; with a linear warm-up to beta = 1 (Bowman et
al. 2016) they go quiet in the first epochs and come back as the decoder learns to use z (seed 0 on this CPU: 0
active from epoch 2 to 8, 16 by epoch 17, 11-16 after).
"""
from __future__ import annotations

import math

from .config import ModelConfig, TrainConfig
from .data import DATASETS

PRESETS: dict[str, dict] = {
    "fast demo": {
        "description": "A 2-layer MLP VAE on the bundled 8x8 digits: the reconstruction NLL falls, the KL rises, and "
                       "the reconstructions and samples sharpen epoch by epoch. It sets slow motion to 0.01 s a "
                       "step, so that the run takes about 20 s and the class can watch it; with slow motion off it "
                       "takes a few seconds.",
        "delay_s": 0.01,
        "train": dict(dataset="digits", epochs=50, batch_size=64, lr=3e-3, beta=1.0, beta_schedule="constant",
                      free_bits=0.0, seed=0),
        "model": dict(arch="mlp", hidden=(256, 128), latent_dim=8, likelihood="bernoulli", decoder="standard"),
    },
    "reproduce KL collapse": {
        "description": "β = 4 from the first step, no warm-up, 16 latent dimensions: the KL penalty wins, every "
                       "dimension's KL goes to 0 nats and the active units fall to 0 (posterior collapse). Slow motion "
                       "0.02 s a step: about 10 s.",
        "delay_s": 0.02,
        "train": dict(dataset="digits", epochs=30, batch_size=128, lr=2e-3, beta=4.0, beta_schedule="constant",
                      free_bits=0.0, seed=0),
        "model": dict(arch="mlp", hidden=(256, 128), latent_dim=16, likelihood="bernoulli", decoder="standard"),
    },
    "fix it with free bits": {
        "description": "The same β = 4, with free bits λ = 0.5 nats (Kingma et al. 2016): each dimension's "
                       "batch-averaged KL below λ costs nothing, so the dimensions come back to life. Slow motion "
                       "0.02 s a step: about 10 s.",
        "delay_s": 0.02,
        "train": dict(dataset="digits", epochs=30, batch_size=128, lr=2e-3, beta=4.0, beta_schedule="constant",
                      free_bits=0.5, seed=0),
        "model": dict(arch="mlp", hidden=(256, 128), latent_dim=16, likelihood="bernoulli", decoder="standard"),
    },
    "fix it with warm-up": {
        "description": "KL warm-up (Bowman et al. 2016): β rises linearly from 0 to 1 over 10 epochs. Watch "
                       "the active units: on digits they still go quiet in the first epochs, while the decoder "
                       "cannot use z yet, and come back as it learns to, around and after the end of the warm-up "
                       "(with β = 4 they never do). Warm-up delays the penalty, it does not lower it: a warm-up "
                       "to β = 4 still collapses once β is high. Slow motion 0.02 s a step: about 10 s.",
        "delay_s": 0.02,
        "train": dict(dataset="digits", epochs=30, batch_size=128, lr=2e-3, beta=1.0, beta_schedule="linear",
                      warmup_epochs=10.0, free_bits=0.0, seed=0),
        "model": dict(arch="mlp", hidden=(256, 128), latent_dim=16, likelihood="bernoulli", decoder="standard"),
    },
}


def preset_configs(name: str) -> tuple[TrainConfig, dict]:
    """(TrainConfig, model-config overrides) for a preset; ValueError for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is not known: choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    return TrainConfig(**p["train"]), dict(p["model"])


def model_config_for(dataset: str, likelihood: str | None = "auto", **overrides) -> ModelConfig:
    """A ModelConfig that fits a dataset without loading it: its dimension and shape come from vae.data.DATASETS;
    likelihood None or "auto" takes the dataset's usual one. ValueError (naming the field) for bad values."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is not known: choose one of {', '.join(DATASETS)}")
    info = DATASETS[dataset]
    lik = info.default_likelihood if likelihood in (None, "", "auto") else likelihood
    return ModelConfig(input_dim=math.prod(info.image_shape), image_shape=info.image_shape, likelihood=lik,
                       **overrides)


__all__ = ["PRESETS", "preset_configs", "model_config_for"]
