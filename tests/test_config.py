"""Config validation: every bad value raises ValueError whose message starts with the field's name."""
from __future__ import annotations

import dataclasses
import math

import pytest

from vae import ModelConfig, TrainConfig
from vae.config import parse_hidden

BAD_MODEL = [
    ({"latent_dim": 0}, "latent_dim"),
    ({"latent_dim": True}, "latent_dim"),  # a bool is not an int here
    ({"latent_dim": 2.0}, "latent_dim"),
    ({"input_dim": 0}, "input_dim"),
    ({"arch": "transformer"}, "arch"),
    ({"hidden": ()}, "hidden"),
    ({"hidden": (0,)}, "hidden"),
    ({"hidden": (32, True)}, "hidden"),
    ({"likelihood": "poisson"}, "likelihood"),
    ({"decoder": "pixelcnn"}, "decoder"),
    ({"sigma": 0.0}, "sigma"),
    ({"sigma": math.nan}, "sigma"),
    ({"input_dim": 2, "image_shape": (2,), "arch": "conv"}, "arch"),  # conv needs (H, W) images
    ({"input_dim": 36, "image_shape": (6, 6), "arch": "conv"}, "arch"),  # H, W not divisible by 4
    ({"input_dim": 64, "image_shape": (28, 28)}, "image_shape"),  # product != input_dim
    ({"decoder": "autoregressive", "likelihood": "gaussian"}, "decoder"),
]

BAD_TRAIN = [
    ({"lr": 0}, "lr"),
    ({"lr": -1e-3}, "lr"),
    ({"lr": math.nan}, "lr"),
    ({"lr": math.inf}, "lr"),
    ({"lr": "0.001"}, "lr"),
    ({"beta": -1}, "beta"),
    ({"dataset": "nope"}, "dataset"),
    ({"epochs": 0}, "epochs"),
    ({"epochs": True}, "epochs"),  # a bool is not an int here
    ({"batch_size": 12.5}, "batch_size"),
    ({"grad_clip": -1.0}, "grad_clip"),
    ({"beta_schedule": "exponential"}, "beta_schedule"),
    ({"warmup_epochs": 0}, "warmup_epochs"),
    ({"cycles": 0}, "cycles"),
    ({"cycle_ratio": 0}, "cycle_ratio"),
    ({"cycle_ratio": 1.5}, "cycle_ratio"),
    ({"capacity_max": -5}, "capacity_max"),
    ({"free_bits": -0.1}, "free_bits"),
    ({"seed": -1}, "seed"),
    ({"device": "tpu"}, "device"),
    ({"max_examples": 0}, "max_examples"),
]


@pytest.mark.parametrize("changes, field", BAD_MODEL, ids=[f"{f}={c}" for c, f in BAD_MODEL])
def test_bad_model_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"^{field}=") as info:
        ModelConfig(**changes)
    assert "is not allowed" in str(info.value)


@pytest.mark.parametrize("changes, field", BAD_TRAIN, ids=[f"{f}={c}" for c, f in BAD_TRAIN])
def test_bad_train_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"^{field}=") as info:
        TrainConfig(**changes)
    assert "is not allowed" in str(info.value)


def test_defaults_are_valid_and_round_trip_through_dicts():
    m, t = ModelConfig(), TrainConfig()
    assert ModelConfig.from_dict(m.to_dict()) == m
    assert TrainConfig.from_dict(t.to_dict()) == t
    # a checkpoint written by a newer version may carry extra keys: they are ignored
    assert ModelConfig.from_dict({**m.to_dict(), "future_field": 1}) == m
    # lists (as JSON gives them back) become tuples
    d = m.to_dict()
    assert isinstance(d["hidden"], list) and isinstance(d["image_shape"], list)
    assert ModelConfig.from_dict(d).hidden == (256, 128)


def test_valid_special_cases():
    ModelConfig(input_dim=784, image_shape=(28, 28), arch="conv")
    ModelConfig(input_dim=2, image_shape=(2,), likelihood="gaussian-learned", latent_dim=2)
    ModelConfig(decoder="autoregressive")
    TrainConfig(beta=0, free_bits=0.5, grad_clip=1.0, cycle_ratio=1.0, max_examples=10)


def test_replace_revalidates():
    """Trainer.update relies on dataclasses.replace running __post_init__ again."""
    with pytest.raises(ValueError, match=r"^beta="):
        dataclasses.replace(TrainConfig(), beta=-1)


@pytest.mark.parametrize("text, sizes", [("256,128", (256, 128)), (" 64 , 32 ", (64, 32)), ("16", (16,)),
                                         ("8,", (8,))])
def test_parse_hidden(text, sizes):
    assert parse_hidden(text) == sizes


@pytest.mark.parametrize("text", ["", ",", "a,b", "1.5", "256,,128"])
def test_parse_hidden_rejects(text):
    with pytest.raises(ValueError, match=r"^hidden="):
        parse_hidden(text)
