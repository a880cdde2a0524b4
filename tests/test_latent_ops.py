"""vae.latent_ops: traversals, interpolation, prior samples and decoder sensitivity against simple references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vae import ModelConfig
from vae import latent_ops as L
from vae.trainer import build_model


def tiny(d=4, **kw) -> torch.nn.Module:
    cfg = dict(input_dim=64, image_shape=(8, 8), hidden=(32,), latent_dim=d)
    cfg.update(kw)
    return build_model(ModelConfig(**cfg), 0).eval()


def ignoring_dim(model, k: int):
    """Zero the decoder's first-layer weights for dimension k: the decoder then ignores z_k entirely."""
    first = model.decoder[0][0] if isinstance(model.decoder[0], torch.nn.Sequential) else model.decoder[0]
    with torch.no_grad():
        first.weight[:, k] = 0.0
    return model


def test_dims_by_kl_and_slider_layout():
    kl = np.array([0.1, 2.0, 0.0, 2.0, 0.5])
    assert list(L.dims_by_kl(kl)) == [1, 3, 4, 0, 2]  # ties keep index order
    lay = L.slider_layout(kl, active=kl > 0.01, max_sliders=3)
    assert list(lay.shown) == [1, 3, 4] and list(lay.held) == [0, 2]
    assert "inactive: barely moves the image" in lay.label(2)
    assert lay.label(1).startswith("z2 · KL 2.00")
    assert len(L.slider_layout(np.zeros(20)).shown) == L.MAX_SLIDERS
    assert L.slider_layout(np.zeros(3), kl_known=False).label(1) == "z2"  # no KL to show
    with pytest.raises(ValueError, match="one flag per dimension"):
        L.slider_layout(kl, active=[True])


def test_compose_and_start_point():
    z = L.compose_latent(np.zeros(4), [2, 0], [1.5, -1.0])
    np.testing.assert_array_equal(z, [-1.0, 0.0, 1.5, 0.0])
    np.testing.assert_array_equal(L.start_point("zero", 3), np.zeros(3))
    a, b = L.start_point("prior", 5, seed=1), L.start_point("prior", 5, seed=1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(L.start_point("prior", 500, seed=2)).max() <= L.SLIDER_LIMIT  # clipped to the slider range
    np.testing.assert_allclose(L.start_point("image", 2, z_image=[0.5, 9.0]), [0.5, 3.0])
    with pytest.raises(ValueError, match="choose a test image"):
        L.start_point("image", 2)
    with pytest.raises(ValueError, match="not known"):
        L.start_point("middle", 2)


def test_traversal_grid_shape_and_content():
    m = tiny(d=4)
    base = np.array([0.3, -0.2, 0.1, 0.0], np.float32)
    values = L.traversal_values(5)
    np.testing.assert_allclose(values, [-3, -1.5, 0, 1.5, 3])
    zs = L.traversal_latents(base, [2, 0], values)
    assert zs.shape == (2, 5, 4)
    np.testing.assert_array_equal(zs[0, :, 2], values)
    np.testing.assert_array_equal(zs[1, :, 0], values)
    np.testing.assert_array_equal(zs[0, :, [0, 1, 3]].T, np.broadcast_to(base[[0, 1, 3]], (5, 3)))
    grid = L.traversal_grid(m, base, [2, 0], values)
    assert grid.shape == (2, 5, 64)
    with torch.no_grad():
        ref = torch.sigmoid(m.decode(torch.tensor(zs[1, 3])[None]))[0].numpy()
    np.testing.assert_allclose(grid[1, 3], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        L.traversal_values(1)


def test_lerp_and_slerp():
    rng = np.random.default_rng(0)
    z0, z1 = rng.standard_normal(8), rng.standard_normal(8)
    z1 = z1 / np.linalg.norm(z1) * np.linalg.norm(z0)  # equal norms
    for method in ("linear", "spherical"):
        path = L.interpolate(z0, z1, 7, method)
        assert path.shape == (7, 8)
        np.testing.assert_allclose(path[0], z0, atol=1e-6)
        np.testing.assert_allclose(path[-1], z1, atol=1e-6)
    sl = L.slerp(z0, z1, np.linspace(0, 1, 11))
    np.testing.assert_allclose(np.linalg.norm(sl, axis=1), np.linalg.norm(z0), rtol=1e-10)  # stays on the sphere
    li = L.lerp(z0, z1, np.linspace(0, 1, 11))
    assert np.linalg.norm(li[5]) < np.linalg.norm(z0) - 1e-3  # the straight line cuts inside the sphere
    np.testing.assert_allclose(li[5], (z0 + z1) / 2)
    # equal angles: slerp at t moves the direction by t * omega
    omega = np.arccos(z0 @ z1 / np.linalg.norm(z0) ** 2)
    ang = np.arccos(np.clip(sl[3] @ z0 / (np.linalg.norm(sl[3]) * np.linalg.norm(z0)), -1, 1))
    assert abs(ang - 0.3 * omega) < 1e-8
    # parallel or zero endpoints fall back to the straight line
    np.testing.assert_allclose(L.slerp(z0, 2 * z0, [0.5]), L.lerp(z0, 2 * z0, [0.5]))
    np.testing.assert_allclose(L.slerp(np.zeros(8), z1, [0.25]), L.lerp(np.zeros(8), z1, [0.25]))
    with pytest.raises(ValueError, match="linear or spherical"):
        L.interpolate(z0, z1, 5, "cubic")


def test_prior_samples_and_temperature():
    m = tiny(d=3)
    a = L.prior_samples(m, 6, temperature=1.0, seed=4)
    assert a.shape == (6, 64) and (a >= 0).all() and (a <= 1).all()
    np.testing.assert_array_equal(a, L.prior_samples(m, 6, temperature=1.0, seed=4))
    z1, z05 = L.prior_latents(2000, 3, 1.0, seed=0), L.prior_latents(2000, 3, 0.5, seed=0)
    np.testing.assert_allclose(z05, 0.5 * z1, rtol=1e-6)
    assert abs(z1.std() - 1.0) < 0.05
    np.testing.assert_array_equal(L.prior_latents(3, 3, 0.0), np.zeros((3, 3)))  # T = 0: the prior's mode
    with pytest.raises(ValueError, match="temperature"):
        L.prior_latents(3, 3, -1.0)


def test_decoder_sensitivity_matches_jacobian_and_is_zero_for_ignored_dim():
    m = ignoring_dim(tiny(d=4), 2)
    z = L.prior_latents(12, 4, seed=1)
    sens = L.decoder_sensitivity(m, z, batch_size=5)  # several batches
    assert sens.shape == (4,)
    assert sens[2] == 0.0
    assert (sens[[0, 1, 3]] > 1e-3).all()
    ref = np.zeros(4)
    for zb in torch.tensor(z):
        J = torch.autograd.functional.jacobian(lambda v: m.decode_mean(v[None])[0], zb)  # (D, d)
        ref += J.norm(dim=0).double().numpy()
    np.testing.assert_allclose(sens, ref / len(z), rtol=1e-4, atol=1e-7)
    assert not m.training


def test_decoder_sensitivity_conv_and_autoregressive():
    conv = tiny(d=3, arch="conv", hidden=(16,))
    assert (L.decoder_sensitivity(conv, L.prior_latents(4, 3)) > 0).all()
    ar = ignoring_dim(tiny(d=3, decoder="autoregressive"), 0)
    s = L.decoder_sensitivity(ar, L.prior_latents(4, 3))
    assert s[0] == 0.0 and (s[1:] > 0).all()


def test_encode_decode_helpers():
    m = tiny(d=2)
    x = np.random.default_rng(0).uniform(size=(3, 64)).astype(np.float32)
    mu = L.encode_means(m, x)
    with torch.no_grad():
        ref, _ = m.encode(torch.tensor(x))
    np.testing.assert_allclose(mu, ref.numpy(), rtol=1e-6)
    assert L.decode_points(m, mu[0]).shape == (64,)
    np.testing.assert_array_equal(L.inactive_by_kl([0.0, 0.5, 0.005]), [True, False, True])


def test_decode_one_matches_and_restores_threads():
    m = tiny(d=3, arch="conv", hidden=(16,))
    z = L.prior_latents(1, 3, seed=2)[0]
    before = torch.get_num_threads()
    np.testing.assert_allclose(L.decode_one(m, z), L.decode_points(m, z[None])[0], rtol=1e-5, atol=1e-6)
    assert torch.get_num_threads() == before
    with L.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_encode_split_matches_encode_dataset():
    from vae.diagnostics import encode_dataset

    m = tiny(d=3)
    x = torch.rand(50, 64, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    mu, logvar = L.encode_split(m, x)
    ref_mu, ref_lv = encode_dataset(m, x)
    np.testing.assert_allclose(mu, ref_mu.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logvar, ref_lv.numpy(), rtol=1e-5, atol=1e-6)
    assert torch.get_num_threads() == before
    np.testing.assert_allclose(L.encode_split(m, x, threads=None)[0], mu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "spherical"])
def test_interpolate_at_is_a_point_of_the_path(method):
    from vae.latent_ops import interpolate, interpolate_at

    rng = np.random.default_rng(0)
    z0, z1 = rng.normal(size=5), rng.normal(size=5)
    assert np.allclose(interpolate_at(z0, z1, 0.0, method), z0, atol=1e-6)
    assert np.allclose(interpolate_at(z0, z1, 1.0, method), z1, atol=1e-6)
    path = interpolate(z0, z1, 5, method)  # t = 0, 0.25, 0.5, 0.75, 1
    assert np.allclose(interpolate_at(z0, z1, 0.25, method), path[1], atol=1e-6)
    assert interpolate_at(z0, z1, 0.5, method).dtype == np.float32
    with pytest.raises(ValueError, match="t=1.5"):
        interpolate_at(z0, z1, 1.5, method)


def test_rows_round_trip_through_compact_url_text():
    from vae.latent_ops import decode_rows, encode_rows

    rows = [25, 3, 17, 18, 19, 20, 20]
    assert encode_rows(rows) == "3,17-20,25" and decode_rows("3,17-20,25", 100) == [3, 17, 18, 19, 20, 25]
    assert encode_rows([]) == "" and decode_rows("", 10) == []
    assert decode_rows("5,8-12,99", 10) == [5, 8, 9]  # rows past the split's end are dropped
    assert all(decode_rows(bad, 10) == [] for bad in ("x", "3,,a", "9-2", "1-99999999"))  # a bad link: no rows


def test_a_latent_point_in_a_url_round_trips():
    import numpy as np

    from vae.latent_ops import SLIDER_LIMIT, decode_point, encode_point

    base = np.zeros(5)
    assert encode_point(base + 0.001, base) == ""  # the start (to two decimals): nothing to carry
    text = encode_point([0.5, -1.2, 0.0, -0.5, 2.25], base)
    assert text == "0.5,-1.2,0,-0.5,2.25"
    np.testing.assert_allclose(decode_point(text, 5), [0.5, -1.2, 0.0, -0.5, 2.25])
    assert encode_point([-0.001, 1.0], [1.0, 1.0]) == "0,1"  # no "-0"
    np.testing.assert_allclose(decode_point("9,-9", 2), [SLIDER_LIMIT, -SLIDER_LIMIT])  # brought into range
    for bad in ("1,2", "a,b,c", "1,nan,2", "1,inf,2", "", None):
        assert decode_point(bad, 3) is None, bad
