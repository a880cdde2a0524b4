"""Shared fixtures for the core tests: tiny models, the offline digits data, and one small trained 2-D model.

Everything runs on the CPU with tiny tensors; the whole core suite takes well under a minute on 2 cores.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest_e2e import _playwright, browser, page, server  # noqa: F401  (fixtures of the browser tests)
from vae import ModelConfig, Trainer, TrainConfig, VAE, load_dataset
from vae.trainer import build_model, default_model_config

REPO = Path(__file__).resolve().parents[1]

# The tensors here are tiny: one thread is as fast as two, and far faster when the machine is busy (OpenMP
# threads spin-waiting on a loaded 2-core box made a 3-second fixture take 30 seconds).
torch.set_num_threads(1)


def gen(seed: int = 0) -> torch.Generator:
    """A fresh CPU generator: every random draw in the tests goes through one of these, never the global RNG."""
    return torch.Generator().manual_seed(seed)


def tiny_model(seed: int = 0, **overrides) -> VAE:
    """A freshly initialised small VAE (default: 8x8 images, MLP 32, d = 3), the same for the same seed."""
    kw = dict(input_dim=64, image_shape=(8, 8), hidden=(32,), latent_dim=3)
    kw.update(overrides)
    return build_model(ModelConfig(**kw), seed)


@pytest.fixture(scope="session")
def digits_train():
    return load_dataset("digits", "train")


@pytest.fixture(scope="session")
def digits_test():
    return load_dataset("digits", "test")


@pytest.fixture
def small_train_config():
    """Factory for a quick digits TrainConfig (12 steps per epoch at batch 128)."""

    def make(**overrides) -> TrainConfig:
        kw = dict(dataset="digits", epochs=2, batch_size=128, lr=1e-2, seed=0, device="cpu")
        kw.update(overrides)
        return TrainConfig(**kw)

    return make


@pytest.fixture
def make_trainer(digits_train, digits_test, small_train_config):
    """Factory: a Trainer on digits with a small MLP (hidden 32, d = 4) unless overridden."""

    def make(model_overrides: dict | None = None, fused: bool = True, **train_overrides) -> Trainer:
        mkw = dict(hidden=(32,), latent_dim=4)
        mkw.update(model_overrides or {})
        return Trainer(small_train_config(**train_overrides), default_model_config(digits_train, **mkw),
                       digits_train, digits_test, fused=fused)

    return make


@pytest.fixture(scope="session")
def trained_z2(digits_train, digits_test):
    """A small VAE with a 2-D latent trained for a few epochs on digits (a few seconds): it has a real ELBO gap,
    and its log p(x) can be integrated on a grid."""
    cfg = TrainConfig(dataset="digits", epochs=8, batch_size=64, lr=5e-3, seed=0, device="cpu")
    trainer = Trainer(cfg, default_model_config(digits_train, hidden=(64,), latent_dim=2), digits_train, digits_test)
    trainer.fit()
    return trainer.model.eval()


@pytest.fixture(params=[
    dict(arch="mlp", likelihood="bernoulli"),
    dict(arch="mlp", hidden=(32, 16), likelihood="gaussian", sigma=0.2),
    dict(arch="mlp", likelihood="gaussian-learned"),
    dict(arch="mlp", decoder="autoregressive"),
    dict(arch="conv", hidden=(16,)),
    dict(arch="conv", hidden=(16,), input_dim=784, image_shape=(28, 28)),
    dict(arch="mlp", input_dim=2, image_shape=(2,), likelihood="gaussian-learned", latent_dim=2),
], ids=["mlp-bernoulli", "mlp-gaussian", "mlp-gaussian-learned", "mlp-autoregressive", "conv-8x8", "conv-28x28",
        "mlp-points"])
def any_model(request) -> VAE:
    """One tiny model of each architecture / likelihood / decoder kind."""
    return tiny_model(**request.param)
