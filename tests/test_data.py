"""Datasets: the offline sets (digits, moons), binarisation, MNIST-style files read from a folder, and the errors.

load_dataset caches by (name, split, root, ...): every MNIST test uses its own tmp_path, so nothing leaks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vae import DatasetUnavailable, load_dataset
from vae.data import DATA_ROOT_ENV, DATASETS, _split_indices, data_root, write_fake_mnist, write_idx


def test_digits_shapes_and_range():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.x.shape == (1438, 64) and test.x.shape == (359, 64)  # 1797 images, 80/20
    assert len(train) == 1438 and train.dim == 64 and train.image_shape == (8, 8)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    for ds in (train, test):
        assert ds.x.min() >= 0 and ds.x.max() <= 1
        assert ds.x.max() == 1.0  # scaled by 16, the top grey level
        assert set(ds.y.tolist()) == set(range(10))
    assert not train.x.requires_grad
    assert train.info.default_likelihood == "bernoulli"


def test_digits_split_is_fixed_disjoint_and_complete():
    from sklearn.datasets import load_digits

    tr, te = _split_indices(1797, "train"), _split_indices(1797, "test")
    assert len(tr) == 1438 and len(te) == 359
    assert not set(tr.tolist()) & set(te.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(1797))
    # fixed: the same indices every call (a seeded permutation, not the global RNG)
    np.random.seed(123)
    np.testing.assert_array_equal(_split_indices(1797, "train"), tr)
    # and the tensors are exactly those rows of scikit-learn's data, scaled into [0, 1]
    d = load_digits()
    train = load_dataset("digits", "train")
    np.testing.assert_allclose(train.x.numpy(), d.data[tr] / 16.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(train.y.numpy(), d.target[tr])


def test_digits_is_deterministic():
    a = load_dataset("digits", "test")
    b = load_dataset("digits", "test")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_max_examples():
    full = load_dataset("digits", "train")
    small = load_dataset("digits", "train", max_examples=100)
    assert small.x.shape == (100, 64)
    assert torch.equal(small.x, full.x[:100])


def test_moons():
    train, test = load_dataset("moons", "train"), load_dataset("moons", "test")
    assert train.x.shape == (1600, 2) and test.x.shape == (400, 2)
    assert train.image_shape == (2,)
    both = torch.cat([train.x, test.x])
    assert both.min() >= 0.1 - 1e-6 and both.max() <= 0.9 + 1e-6  # scaled into [0.1, 0.9]^2
    assert set(train.y.tolist()) == {0, 1}
    assert DATASETS["moons"].default_likelihood == "gaussian-learned"


def test_binarize():
    grey = load_dataset("digits", "train")
    binary = load_dataset("digits", "train", binarize=True)
    assert set(binary.x.unique().tolist()) <= {0.0, 1.0}
    assert set(binary.x.unique().tolist()) == {0.0, 1.0}
    # a Bernoulli draw per pixel with p = the grey level: pixels that are 0 stay 0, the mean is preserved
    assert (binary.x[grey.x == 0] == 0).all()
    assert (binary.x[grey.x == 1] == 1).all()
    assert binary.x.mean().item() == pytest.approx(grey.x.mean().item(), abs=0.01)
    # seeded: a fresh draw (bypassing the cache) gives the same bits
    from vae.data import _load_cached

    again, _ = _load_cached.__wrapped__("digits", "train", "unused", True, True)
    assert torch.equal(again, binary.x)
    with pytest.raises(ValueError, match="binarize"):
        load_dataset("moons", binarize=True)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_style_files_from_a_folder(tmp_path, name, folder):
    raw = write_fake_mnist(tmp_path, name, n_train=64, n_test=16, seed=0)
    assert raw == tmp_path / folder / "raw"
    train = load_dataset(name, "train", root=tmp_path, download=False)
    test = load_dataset(name, "test", root=tmp_path, download=False)
    assert train.x.shape == (64, 784) and test.x.shape == (16, 784)
    assert train.image_shape == (28, 28) and train.x.dtype == torch.float32
    assert train.x.min() >= 0 and train.x.max() <= 1
    # exactly the bytes that were written, over 255 (write_fake_mnist draws with default_rng(seed))
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, size=(64, 28, 28)), rng.integers(0, 10, size=(64,))
    np.testing.assert_allclose(train.x.numpy(), images.reshape(64, -1) / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(train.y.numpy(), labels)
    binary = load_dataset(name, "train", root=tmp_path, download=False, binarize=True)
    assert set(binary.x.unique().tolist()) <= {0.0, 1.0}


def test_write_idx_header(tmp_path):
    write_idx(tmp_path / "a", np.arange(6).reshape(2, 3))
    raw = (tmp_path / "a").read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 2])  # uint8, 2 dimensions
    assert int.from_bytes(raw[4:8], "big") == 2 and int.from_bytes(raw[8:12], "big") == 3
    assert raw[12:] == bytes(range(6))


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_missing_files_without_download(tmp_path, name, folder):
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset(name, "train", root=tmp_path, download=False)
    msg = str(info.value)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte"):
        assert f in msg
    assert str(tmp_path / folder / "raw") in msg
    assert "digits" in msg  # says what works offline


@pytest.mark.parametrize("kwargs, field", [({"name": "cifar10"}, "dataset"), ({"split": "validation"}, "split")])
def test_bad_name_or_split(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        load_dataset(**kwargs)


def test_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    assert str(data_root()) == "data"
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert data_root() == tmp_path
    assert str(data_root("elsewhere")) == "elsewhere"  # the argument wins over the environment


def test_digits_read_without_scikit_learn_equal_load_digits(monkeypatch):
    from sklearn.datasets import load_digits

    from vae import data

    data_direct, target_direct = data.digits_arrays()  # the bundled CSV, read directly
    ref = load_digits()
    np.testing.assert_array_equal(data_direct, ref.data)
    np.testing.assert_array_equal(target_direct, ref.target)
    # where the CSV is not found (another layout of scikit-learn), load_digits() gives the same arrays
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    data_fallback, target_fallback = data.digits_arrays()
    np.testing.assert_array_equal(data_fallback, ref.data)
    np.testing.assert_array_equal(target_fallback, ref.target)


def test_a_failed_download_says_why_in_one_line_without_half_a_url(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(root, train=True, download=False):
        if download:  # torchvision's own words when every mirror fails
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://ossci-datasets.s3."
                               "amazonaws.com/mnist/, got:\n<urlopen error [Errno -3] Temporary failure>")
        raise RuntimeError("Dataset not found. You can use download=True to download it")

    monkeypatch.setattr(datasets, "MNIST", offline)
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset("mnist", "train", root=tmp_path, download=True)
    msg = str(info.value)
    assert "the download failed (RuntimeError: Error downloading train-images-idx3-ubyte.gz)" in msg
    assert "http" not in msg and "\n" not in msg and "'digits' works offline" in msg
