"""The VAE module: shapes for every architecture, value ranges, seeded reparameterisation, and the autoregressive
decoder's two decoding modes."""
from __future__ import annotations

import pytest
import torch

from conftest import gen, tiny_model
from vae import VAE


def test_shapes(any_model: VAE):
    c = any_model.config
    B, D, d = 5, c.input_dim, c.latent_dim
    x = torch.rand(B, D, generator=gen(0))
    mu, logvar = any_model.encode(x)
    assert mu.shape == logvar.shape == (B, d)
    out = any_model(x, generator=gen(1))
    assert out.recon.shape == (B, D) and out.z.shape == (B, d)
    torch.testing.assert_close(out.mu, mu)
    assert any_model.decode(out.z).shape == (B, D)
    assert any_model.decode(torch.randn(3, B, d, generator=gen(2)), x=x).shape == (3, B, D)  # K samples each
    assert any_model.log_likelihood(x, out.z).shape == (B,)
    assert any_model.sample(7, generator=gen(3)).shape == (7, D)
    assert any_model.reconstruct(x).shape == (B, D)
    assert any_model.num_parameters() == sum(p.numel() for p in any_model.parameters()) > 0
    assert any_model.device == torch.device("cpu")


def test_ranges(any_model: VAE):
    """Images decode to [0, 1]; 2-D points are not clamped (the data space is drawn as is)."""
    c = any_model.config
    x = torch.rand(4, c.input_dim, generator=gen(0))
    samples = any_model.sample(16, temperature=2.0, generator=gen(1))
    recons = any_model.reconstruct(x)
    for values in (samples, recons):
        assert torch.isfinite(values).all()
        if c.image_shape != (2,):
            assert values.min() >= 0 and values.max() <= 1
    if c.likelihood == "bernoulli":
        torch.testing.assert_close(any_model.decode_mean(torch.zeros(1, c.latent_dim)),
                                   torch.sigmoid(any_model.decode(torch.zeros(1, c.latent_dim))))


def test_points_are_not_clamped():
    model = tiny_model(input_dim=2, image_shape=(2,), likelihood="gaussian-learned", latent_dim=2)
    with torch.no_grad():
        model.decoder[-1].bias.fill_(5.0)
    assert (model.decode_mean(torch.zeros(3, 2)) > 1).any()


def test_sampling_is_seeded():
    model = tiny_model()
    torch.testing.assert_close(model.sample(4, generator=gen(9)), model.sample(4, generator=gen(9)))
    assert not torch.equal(model.sample(4, generator=gen(9)), model.sample(4, generator=gen(10)))
    # temperature 0 decodes the prior mean, z = 0, every time
    s = model.sample(3, temperature=0.0, generator=gen(1))
    torch.testing.assert_close(s, model.decode_mean(torch.zeros(3, 3)).detach())


def test_reparameterize_with_a_seeded_generator():
    g = gen(0)
    mu, logvar = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    z1 = VAE.reparameterize(mu, logvar, gen(42))
    z2 = VAE.reparameterize(mu, logvar, gen(42))
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, VAE.reparameterize(mu, logvar, gen(43)))
    eps = torch.randn(6, 4, generator=gen(42))
    torch.testing.assert_close(z1, mu + torch.exp(0.5 * logvar) * eps)
    # the global RNG is not touched
    state = torch.get_rng_state()
    VAE.reparameterize(mu, logvar, gen(1))
    assert torch.equal(state, torch.get_rng_state())


def test_forward_is_seeded():
    model = tiny_model()
    x = torch.rand(3, 64, generator=gen(0))
    a, b = model(x, generator=gen(5)), model(x, generator=gen(5))
    assert torch.equal(a.z, b.z) and torch.equal(a.recon, b.recon)


def test_logvar_is_clamped():
    model = tiny_model()
    with torch.no_grad():
        model.enc_out.bias[3:].fill_(1e4)  # the logvar half
    _, logvar = model.encode(torch.zeros(1, 64))
    assert logvar.max().item() == 20.0


@pytest.fixture
def ar_model():
    """An autoregressive model with random (non-zero) pixel-to-pixel weights: the init is zeros."""
    model = tiny_model(decoder="autoregressive")
    with torch.no_grad():
        model.ar.weight.copy_(torch.randn(64, 64, generator=gen(8)))
        model.ar.bias.copy_(torch.randn(64, generator=gen(9)))
    return model


def test_autoregressive_teacher_forced_vs_sequential(ar_model):
    z = torch.randn(4, 3, generator=gen(1))
    x = torch.bernoulli(torch.full((4, 64), 0.5), generator=gen(2))
    teacher = ar_model.decode(z, x=x)
    sequential = ar_model.decode(z)
    assert teacher.shape == sequential.shape == (4, 64)
    # pixel 0 sees no other pixel: the same logit either way
    torch.testing.assert_close(teacher[:, 0], sequential[:, 0])
    assert not torch.allclose(teacher, sequential)  # later pixels do depend on what they were fed
    # sequential decoding feeds back each pixel's mean: teacher forcing on those means reproduces it exactly
    torch.testing.assert_close(ar_model.decode(z, x=torch.sigmoid(sequential)), sequential, atol=1e-5, rtol=1e-5)
    mean = ar_model.decode_mean(z)
    assert mean.shape == (4, 64) and mean.min() >= 0 and mean.max() <= 1


def test_autoregressive_pixel_sees_only_earlier_pixels(ar_model):
    z = torch.randn(2, 3, generator=gen(1))
    x = torch.rand(2, 64, generator=gen(2))
    i = 20
    x2 = x.clone()
    x2[:, i:] = torch.rand(2, 64 - i, generator=gen(3))  # change pixel i and every later pixel
    a, b = ar_model.decode(z, x=x), ar_model.decode(z, x=x2)
    torch.testing.assert_close(a[:, :i + 1], b[:, :i + 1])  # logits 0..i unchanged
    assert not torch.allclose(a[:, i + 1:], b[:, i + 1:])


def test_conv_geometry():
    """The conv encoder halves the image twice, the decoder doubles it back."""
    for shape in ((8, 8), (28, 28), (12, 16)):
        dim = shape[0] * shape[1]
        model = tiny_model(arch="conv", hidden=(8,), input_dim=dim, image_shape=shape)
        assert model.decode(torch.zeros(2, 3)).shape == (2, dim)
