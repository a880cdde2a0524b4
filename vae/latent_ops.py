"""Driving the decoder p_theta(x|z) from the latent side: slider layouts ordered by KL, traversal grids,
interpolation (linear and spherical), prior samples with a temperature, and the decoder's sensitivity to each
dimension. Latent points go in as NumPy arrays (d,) or (B, d); decoded images come out as E[x|z], (..., D) in [0, 1].
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .diagnostics import ACTIVE_THRESHOLD

SLIDER_LIMIT = 3.0  # sliders and traversals span +-3 prior standard deviations
MAX_SLIDERS = 16  # above this many dimensions, show the most informative ones and hold the rest
START_KINDS = ("zero", "prior", "image")


def _tensor(z, model) -> torch.Tensor:
    return torch.as_tensor(np.asarray(z, dtype=np.float32), device=model.device)


@torch.inference_mode()
def decode_points(model, z) -> np.ndarray:
    """E[x|z] for latent points z (..., d): (..., D) float32 on the CPU."""
    return model.decode_mean(_tensor(z, model)).float().cpu().numpy()


@contextmanager
def intra_op_threads(n: int):
    """Run the block with n intra-op CPU threads, then restore the previous number. With PyTorch's OpenMP backend
    the setting belongs to the calling thread only (a Streamlit script thread), not to training threads."""
    prev = torch.get_num_threads()
    if prev == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def decode_one(model, z) -> np.ndarray:
    """E[x|z] for one latent point z (d,): (D,). What a slider move runs. One image is too little work to share
    between threads: on a busy CPU (another process, or a training thread in the same server) waiting for the
    other threads costs far more than the arithmetic (a 28x28 conv decoder: ~90 ms with 2 threads under load,
    ~4 ms with 1), so it runs on a single thread."""
    if model.device.type != "cpu":
        return decode_points(model, z)
    with intra_op_threads(1):
        return decode_points(model, z)


def encode_split(model, x, threads: int | str | None = "auto"):
    """Posterior parameters of a whole split, (mu, logvar) as (N, d) float32 arrays (vae.diagnostics.encode_dataset).

    On the CPU this runs on `threads` intra-op threads: "auto" takes the cores not already busy
    (vae.projection.free_cpu_threads), None PyTorch's default. On a busy 2-core CPU (load ~10) encoding 10k MNIST
    images took 0.5-0.8 s with 2 threads and 0.16 s with 1."""
    from .diagnostics import encode_dataset
    from .projection import free_cpu_threads

    x = torch.as_tensor(x)
    if threads == "auto":
        threads = free_cpu_threads()
        threads = None if threads is None else min(threads, torch.get_num_threads())
    if threads is None or model.device.type != "cpu":
        mu, logvar = encode_dataset(model, x)
    else:
        with intra_op_threads(int(threads)):
            mu, logvar = encode_dataset(model, x)
    return mu.numpy(), logvar.numpy()


@torch.inference_mode()
def encode_means(model, x) -> np.ndarray:
    """Posterior means mu(x) of inputs x (B, D): (B, d)."""
    mu, _ = model.encode(torch.as_tensor(np.asarray(x, dtype=np.float32), device=model.device))
    return mu.float().cpu().numpy()


def dims_by_kl(kl) -> np.ndarray:
    """Dimension indices ordered by KL, most informative first (ties keep index order)."""
    return np.argsort(-np.asarray(kl, dtype=np.float64), kind="stable")


@dataclass
class SliderLayout:
    shown: np.ndarray  # dimensions that get a slider, most informative first
    held: np.ndarray  # dimensions held at their starting value (beyond max_sliders)
    active: np.ndarray  # (d,) bool
    kl: np.ndarray  # (d,) nats
    kl_known: bool = True  # False: no data and no recorded KL, so labels leave the KL out

    def label(self, dim: int) -> str:
        if not self.active[dim]:
            return f"z{dim + 1} · inactive: barely moves the image"
        return f"z{dim + 1} · KL {self.kl[dim]:.2f} nats" if self.kl_known else f"z{dim + 1}"


def slider_layout(kl, active=None, max_sliders: int = MAX_SLIDERS, kl_known: bool = True) -> SliderLayout:
    """Which dimensions get sliders: all of them up to max_sliders, else the top max_sliders by KL."""
    kl = np.asarray(kl, dtype=np.float64)
    active = np.ones(len(kl), bool) if active is None else np.asarray(active, dtype=bool)
    if active.shape != kl.shape:
        raise ValueError(f"active has shape {active.shape}, kl has {kl.shape}: give one flag per dimension")
    order = dims_by_kl(kl)
    k = max(1, min(int(max_sliders), len(kl)))
    return SliderLayout(order[:k], order[k:], active, kl, kl_known)


def compose_latent(base, dims, values) -> np.ndarray:
    """base (d,) with base[dims] replaced by values: the latent point the sliders describe."""
    z = np.array(base, dtype=np.float32, copy=True)
    z[np.asarray(dims, dtype=int)] = np.asarray(values, dtype=np.float32)
    return z


def start_point(kind: str, d: int, seed: int = 0, z_image=None, limit: float = SLIDER_LIMIT) -> np.ndarray:
    """Where the sliders start: zero, a prior sample z ~ N(0, I), or an image's encoding; clipped to +-limit."""
    if kind == "zero":
        z = np.zeros(d)
    elif kind == "prior":
        z = np.random.default_rng(seed).standard_normal(d)
    elif kind == "image":
        if z_image is None:
            raise ValueError("start='image' needs the encoding of an image: choose a test image")
        z = np.asarray(z_image, dtype=np.float64).reshape(-1)
        if z.shape != (d,):
            raise ValueError(f"the image's encoding has {z.size} dimensions, the model has {d}")
    else:
        raise ValueError(f"start={kind!r} is not known: choose one of {', '.join(START_KINDS)}")
    return np.clip(z, -limit, limit).astype(np.float32)


# ---- traversals -------------------------------------------------------------------------------------------------
def traversal_values(n: int = 9, limit: float = SLIDER_LIMIT) -> np.ndarray:
    """n evenly spaced values over [-limit, limit] (prior standard deviations)."""
    if n < 2:
        raise ValueError(f"n={n}: a traversal needs at least 2 values")
    return np.linspace(-limit, limit, int(n)).astype(np.float32)


def traversal_latents(base, dims, values) -> np.ndarray:
    """(R, C, d): row r moves dimension dims[r] through values, every other dimension stays at base."""
    base = np.asarray(base, dtype=np.float32)
    dims = np.asarray(dims, dtype=int)
    values = np.asarray(values, dtype=np.float32)
    z = np.broadcast_to(base, (len(dims), len(values), base.shape[0])).copy()
    z[np.arange(len(dims)), :, dims] = values[None, :]
    return z


def traversal_grid(model, base, dims, values) -> np.ndarray:
    """Decoded traversal: (R, C, D) with rows = dims (e.g. ordered by KL), columns = values."""
    return decode_points(model, traversal_latents(base, dims, values))


# ---- interpolation ----------------------------------------------------------------------------------------------
def lerp(z0, z1, t) -> np.ndarray:
    """(1 - t) z0 + t z1 for each t: (len(t), d)."""
    z0, z1 = np.asarray(z0, dtype=np.float64), np.asarray(z1, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)[:, None]
    return (1 - t) * z0 + t * z1


def slerp(z0, z1, t, eps: float = 1e-7) -> np.ndarray:
    """Spherical interpolation (Shoemake 1985; White 2016 for generative models): moves along the great circle
    between the directions of z0 and z1, so points keep the norm of the endpoints when their norms are equal.
    Falls back to lerp when z0 and z1 are (anti)parallel or zero."""
    z0, z1 = np.asarray(z0, dtype=np.float64), np.asarray(z1, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)[:, None]
    n0, n1 = np.linalg.norm(z0), np.linalg.norm(z1)
    if n0 < eps or n1 < eps:
        return lerp(z0, z1, t[:, 0])
    cos = np.clip(np.dot(z0, z1) / (n0 * n1), -1.0, 1.0)
    omega = np.arccos(cos)
    so = np.sin(omega)
    if so < 1e-6:
        return lerp(z0, z1, t[:, 0])
    return (np.sin((1 - t) * omega) / so) * z0 + (np.sin(t * omega) / so) * z1


def interpolate(z0, z1, n: int = 10, method: str = "linear") -> np.ndarray:
    """n points from z0 to z1 inclusive: (n, d), float32."""
    if n < 2:
        raise ValueError(f"n={n}: an interpolation needs at least 2 points")
    t = np.linspace(0.0, 1.0, int(n))
    if method == "linear":
        z = lerp(z0, z1, t)
    elif method == "spherical":
        z = slerp(z0, z1, t)
    else:
        raise ValueError(f"method={method!r} is not known: choose linear or spherical")
    return z.astype(np.float32)


def interpolate_at(z0, z1, t: float, method: str = "linear") -> np.ndarray:
    """The point at fraction t in [0, 1] of interpolate()'s path from z0 to z1: (d,), float32."""
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t={t!r} is not allowed: give a number from 0 (z0) to 1 (z1)")
    if method == "linear":
        z = lerp(z0, z1, [t])
    elif method == "spherical":
        z = slerp(z0, z1, [t])
    else:
        raise ValueError(f"method={method!r} is not known: choose linear or spherical")
    return z[0].astype(np.float32)


# ---- a selection of rows in a URL ---------------------------------------------------------------------------------
def encode_rows(rows) -> str:
    """Sorted row indices as compact text for a URL: [3, 17, 18, 19, 20, 25] -> "3,17-20,25"."""
    out, rows = [], sorted({int(r) for r in rows})
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        out.append(str(rows[i]) if i == j else f"{rows[i]}-{rows[j]}")
        i = j + 1
    return ",".join(out)


def decode_rows(text: str, n: int) -> list[int]:
    """The inverse of encode_rows, keeping only rows in [0, n); anything that is not such text gives []."""
    rows: set[int] = set()
    try:
        for part in str(text or "").split(","):
            if not part:
                continue
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
            if b < a or b - a > n:
                return []
            rows.update(range(max(a, 0), min(b, n - 1) + 1))
    except ValueError:
        return []
    return sorted(rows)


def encode_point(z, base) -> str:
    """A latent point for a URL, two decimals a coordinate ("0.5,-1.2,0"), or "" where it is base (to two
    decimals): a page's link then carries it only once it has been moved from its start."""
    z, base = np.asarray(z, dtype=float).ravel(), np.asarray(base, dtype=float).ravel()
    if z.shape == base.shape and np.all(np.round(z, 2) == np.round(base, 2)):
        return ""
    def short(v: float) -> str:  # 0.50 -> "0.5", -1.00 -> "-1", -0.001 -> "0"
        t = f"{v:.2f}".rstrip("0").rstrip(".")
        return "0" if t in ("-0", "") else t

    return ",".join(short(v) for v in z)


def decode_point(text, d: int, clip: bool = True) -> np.ndarray | None:
    """The inverse of encode_point for a d-dimensional latent, each coordinate brought into [-SLIDER_LIMIT,
    SLIDER_LIMIT] (unless clip=False); None for anything else (another model's point, not numbers, not finite)."""
    try:
        z = np.array([float(v) for v in str(text or "").split(",")], dtype=float)
    except ValueError:
        return None
    if z.shape != (d,) or not np.all(np.isfinite(z)):
        return None
    return np.clip(z, -SLIDER_LIMIT, SLIDER_LIMIT) if clip else z


# ---- prior samples ----------------------------------------------------------------------------------------------
def prior_latents(n: int, d: int, temperature: float = 1.0, seed: int = 0) -> np.ndarray:
    """n draws z ~ N(0, T^2 I), seeded: (n, d)."""
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} is not allowed: give a number >= 0 (1 = the prior)")
    g = torch.Generator().manual_seed(int(seed))
    return (temperature * torch.randn(int(n), int(d), generator=g)).numpy()


def prior_samples(model, n: int = 32, temperature: float = 1.0, seed: int = 0) -> np.ndarray:
    """E[x|z] for n draws z ~ N(0, T^2 I): (n, D). T < 1 gives typical, cleaner samples; T > 1 stranger ones."""
    return decode_points(model, prior_latents(n, model.config.latent_dim, temperature, seed))


# ---- decoder sensitivity ----------------------------------------------------------------------------------------
def decoder_sensitivity(model, z, batch_size: int = 256) -> np.ndarray:
    """Mean over the points z (B, d) of ||d E[x|z] / d z_d||_2, for each dimension d: (d,).

    Forward-mode autograd: one Jacobian-vector product per dimension gives dx/dz_d for the whole batch. A dimension
    the decoder ignores gets 0, whatever its KL."""
    from torch.func import jvp

    z = _tensor(z, model)
    if z.ndim != 2:
        raise ValueError(f"z must be (B, d), got shape {tuple(z.shape)}")
    d = z.shape[1]
    total = torch.zeros(d, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's first forward-mode call warns about jit.script
            for s in range(0, z.shape[0], batch_size):
                zb = z[s:s + batch_size]
                for k in range(d):
                    tangent = torch.zeros_like(zb)
                    tangent[:, k] = 1.0
                    _, dx = jvp(model.decode_mean, (zb,), (tangent,))  # (b, D) = dx/dz_k per example
                    total[k] += dx.double().norm(dim=1).sum().cpu()
    finally:
        model.train(was_training)
    return (total / z.shape[0]).numpy()


def inactive_by_kl(kl, threshold: float = ACTIVE_THRESHOLD) -> np.ndarray:
    """Fallback flags when no data is at hand to measure Var_x(mu_d): a dimension whose recorded KL is below
    threshold nats carries no information. (With data, use vae.projection.dimension_stats.)"""
    return np.asarray(kl, dtype=np.float64) < threshold
