"""Datasets as in-memory tensors: x (N, D) in [0, 1], labels y (N,), and the shape of one example.

    digits         scikit-learn's bundled 8x8 digits (1797 images); offline, the default
    mnist          28x28 MNIST through torchvision, from a data root (downloads when online)
    fashion-mnist  28x28 Fashion-MNIST, likewise
    moons          a 2-D toy set (two interleaved half-moons) scaled into [0, 1]^2, whose data space can be drawn

The train/test split of digits and moons is a fixed seeded permutation (80/20); MNIST-style sets use their own.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLIT_SEED = 0  # fixed: the split never changes between runs or machines
TEST_FRACTION = 0.2
DEFAULT_DATA_ROOT = "data"
DATA_ROOT_ENV = "VAE_DATA_ROOT"


class DatasetUnavailable(RuntimeError):
    """The dataset's files are missing and could not be downloaded."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    image_shape: tuple  # (H, W) for images, (2,) for points
    classes: tuple  # label names
    default_likelihood: str
    description: str


DATASETS = {
    "digits": DatasetInfo("digits", (8, 8), tuple(str(i) for i in range(10)), "bernoulli",
                          "scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline)"),
    "mnist": DatasetInfo("mnist", (28, 28), tuple(str(i) for i in range(10)), "bernoulli",
                         "MNIST 28x28 handwritten digits (60,000 train / 10,000 test)"),
    "fashion-mnist": DatasetInfo("fashion-mnist", (28, 28),
                                 ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                  "Sneaker", "Bag", "Ankle boot"), "bernoulli",
                                 "Fashion-MNIST 28x28 clothing images (60,000 train / 10,000 test)"),
    "moons": DatasetInfo("moons", (2,), ("upper moon", "lower moon"), "gaussian-learned",
                         "2-D toy set: two interleaved half-moons scaled into [0,1]^2 (2,000 points)"),
}

_TORCHVISION = {"mnist": ("MNIST", "MNIST"), "fashion-mnist": ("FashionMNIST", "FashionMNIST")}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


@dataclass
class Dataset:
    name: str
    split: str
    x: torch.Tensor  # (N, D) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64 labels
    image_shape: tuple

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    @property
    def info(self) -> DatasetInfo:
        return DATASETS[self.name]


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: the argument, else $VAE_DATA_ROOT, else data/."""
    return Path(root if root is not None else os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


def _split_indices(n: int, split: str) -> np.ndarray:
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(n * TEST_FRACTION))
    return np.sort(perm[n_test:] if split == "train" else perm[:n_test])


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: data (1797, 64) with values 0..16 and the labels, as load_digits() gives
    them. Read straight from the CSV that scikit-learn ships, without importing scikit-learn (about a second at a
    cold start, on the Home page's first render); through load_digits() where the file is not found."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running its __init__
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data, d.target


def _load_digits(split):
    data, target = digits_arrays()
    idx = _split_indices(len(target), split)
    x = torch.from_numpy((data[idx] / 16.0).astype(np.float32))
    return x, torch.from_numpy(target[idx].astype(np.int64))


def _load_moons(split):
    from sklearn.datasets import make_moons

    pts, labels = make_moons(n_samples=2000, noise=0.06, random_state=SPLIT_SEED)
    lo, hi = pts.min(0), pts.max(0)
    pts = 0.1 + 0.8 * (pts - lo) / (hi - lo)  # into [0.1, 0.9]^2
    idx = _split_indices(len(labels), split)
    return torch.from_numpy(pts[idx].astype(np.float32)), torch.from_numpy(labels[idx].astype(np.int64))


def _load_torchvision(name, split, root: Path, download: bool):
    from torchvision import datasets

    cls_name, folder = _TORCHVISION[name]
    cls = getattr(datasets, cls_name)
    raw = root / folder / "raw"
    try:
        ds = cls(str(root), train=(split == "train"), download=False)
    except RuntimeError:  # torchvision: "Dataset not found. You can use download=True to download it"
        ds = None
    reason = "download disabled"
    if ds is None and download:
        try:
            ds = cls(str(root), train=(split == "train"), download=True)
        except Exception as exc:  # offline: URLError, socket errors, HTTP errors ...
            # the error's own words up to their first URL ("Error downloading x.gz: Tried https://..." was cut
            # mid-address): the files, and where to put them, are said next
            words = str(exc).split("\n")[0].split(" Tried ")[0].split(" http")[0].rstrip(" :")[:100]
            reason = f"the download failed ({type(exc).__name__}: {words})" if words else \
                f"the download failed ({type(exc).__name__})"
    if ds is None:
        raise DatasetUnavailable(
            f"dataset '{name}' is not available: {reason}. Put the four files {', '.join(_IDX_FILES)} "
            f"(optionally .gz) into {raw}/ or set --data-root / ${DATA_ROOT_ENV} to a folder that has them, "
            f"or connect to the internet to download them; 'digits' works offline.")
    x = ds.data.reshape(len(ds.data), -1).to(torch.float32) / 255.0
    return x, ds.targets.to(torch.int64)


@functools.lru_cache(maxsize=16)
def _load_cached(name, split, root, download, binarize):
    if name == "digits":
        x, y = _load_digits(split)
    elif name == "moons":
        x, y = _load_moons(split)
    else:
        x, y = _load_torchvision(name, split, Path(root), download)
    if binarize:
        g = torch.Generator().manual_seed(SPLIT_SEED + (split == "test"))
        x = torch.bernoulli(x, generator=g)
    x.requires_grad_(False)
    return x.contiguous(), y


def load_dataset(name: str = "digits", split: str = "train", root: str | os.PathLike | None = None,
                 download: bool = True, binarize: bool = False, max_examples: int | None = None) -> Dataset:
    """Load a dataset split into memory. Raises ValueError for a bad name/split, DatasetUnavailable when missing."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not known: choose one of {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not allowed: choose train or test")
    if binarize and name == "moons":
        raise ValueError("binarize=True is not allowed for 'moons': its points are continuous")
    x, y = _load_cached(name, split, str(data_root(root)), bool(download), bool(binarize))
    if max_examples is not None:
        x, y = x[:max_examples], y[:max_examples]
    return Dataset(name, split, x, y, DATASETS[name].image_shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format MNIST uses (for tests and offline set-ups)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    Path(path).write_bytes(header + array.tobytes())


def write_fake_mnist(root: str | os.PathLike, name: str = "mnist", n_train: int = 64, n_test: int = 16,
                     seed: int = 0) -> Path:
    """Write small random MNIST-format files under root (what torchvision reads). Returns the raw folder."""
    raw = Path(root) / _TORCHVISION[name][1] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, size=(n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, size=(n,)))
    return raw
