"""The rate–distortion view of a VAE (Alemi et al. 2018) and the KL-collapse lab. Pure torch/numpy, no Streamlit.

    R = E_x KL(q_phi(z|x) || p(z))       rate, nats per example
    D = E_x E_q[-log p_theta(x|z)]        distortion, nats per example
    -ELBO = D + R                         so lines of equal ELBO have slope -1 in the (R, D) plane

A beta-VAE minimises D + beta R: its optimum lies where the achievable frontier has slope -beta. The rate splits
(ELBO surgery, Hoffman & Johnson 2016) into I_q(n; z), information about which example it is, and KL(q(z) || p(z)),
the mismatch between the aggregate posterior and the prior.

Also here: the run specs of a beta sweep and of the collapse lab (presets that collapse on digits, remedies on the
same seed), and the per-epoch curves a training history gives (trajectory, per-dimension KL heatmap).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig, TrainConfig
from .data import DATASETS
from .diagnostics import encode_dataset, evaluate, kl_decomposition


# ---- one model on the plane ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RDPoint:
    rate: float  # R = E_x KL(q(z|x) || p(z)), nats
    distortion: float  # D = E_x E_q[-log p(x|z)], nats (z_samples draws per example)
    elbo: float  # -(R + D)
    active_units: int  # Burda et al. 2015: Var_x(E_q[z_d]) > 0.01
    latent_dim: int
    kl_per_dim: tuple  # E_x KL(q(z_d|x) || N(0,1)) per dimension, nats; sums to R
    mutual_info: float | None = None  # I_q(n; z), nats (ELBO surgery)
    marginal_kl: float | None = None  # KL(q(z) || p(z)), nats; mutual_info + marginal_kl = R
    mutual_info_max: float | None = None  # log N: I_q(n; z) cannot exceed it
    n: int = 0  # examples evaluated
    z_samples: int = 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kl_per_dim"] = list(self.kl_per_dim)
        return d


@torch.inference_mode()
def rate_distortion(model, x: torch.Tensor, z_samples: int = 4, seed: int = 0, decomposition: bool = True,
                    mc_samples: int = 2000) -> RDPoint:
    """The model's (R, D) point on the data x (use the test split), with the ELBO-surgery split of R.

    R is exact (closed-form KL per example, averaged); D averages z_samples reparameterised draws per example, each
    from vae.diagnostics.evaluate with its own seed. Deterministic for a given seed.
    """
    if not isinstance(z_samples, int) or z_samples < 1:
        raise ValueError(f"z_samples={z_samples!r} is not allowed: give a whole number >= 1")
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x has shape {tuple(x.shape)}: give (N, D) data with at least 2 examples")
    first = evaluate(model, x, seed=seed)
    recons = [first["recon"]] + [evaluate(model, x, seed=seed + k)["recon"] for k in range(1, z_samples)]
    rate, distortion = first["kl"], float(np.mean(recons))
    mi = marginal = mi_max = None
    if decomposition:
        mu, logvar = encode_dataset(model, x)
        g = torch.Generator().manual_seed(seed)
        split = kl_decomposition(mu, logvar, n_samples=mc_samples, generator=g)
        mi, marginal, mi_max = split["mutual_info"], split["marginal_kl"], split["mutual_info_max"]
    return RDPoint(rate=rate, distortion=distortion, elbo=-(rate + distortion), active_units=first["active_units"],
                   latent_dim=len(first["kl_per_dim"]), kl_per_dim=tuple(first["kl_per_dim"]), mutual_info=mi,
                   marginal_kl=marginal, mutual_info_max=mi_max, n=first["n"], z_samples=z_samples)


# ---- lines on the plane -------------------------------------------------------------------------------------------
def nice_step(span: float, target: int = 6) -> float:
    """A round step (1, 2 or 5 times a power of ten) that cuts span into about target pieces."""
    if not math.isfinite(span) or span <= 0:
        return 1.0
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def clip_line(r0: float, d0: float, slope: float, box: tuple) -> tuple | None:
    """The part of the line D = d0 + slope (R - r0) inside box = (r_min, r_max, d_min, d_max), slope < 0:
    ((R_a, D_a), (R_b, D_b)) with R_a < R_b, or None when it misses the box."""
    r_min, r_max, d_min, d_max = box
    if slope >= 0:
        raise ValueError(f"slope={slope}: lines on the rate-distortion plane here fall, give a negative slope")
    # D(R) falls: D <= d_max from R >= r at d_max; D >= d_min up to R <= r at d_min
    r_lo = max(r_min, r0 + (d_max - d0) / slope)
    r_hi = min(r_max, r0 + (d_min - d0) / slope)
    if r_hi <= r_lo:
        return None
    return (r_lo, d0 + slope * (r_lo - r0)), (r_hi, d0 + slope * (r_hi - r0))


def iso_elbo_lines(box: tuple, target: int = 6) -> list[tuple[float, tuple]]:
    """Lines of constant ELBO, R + D = -ELBO, that cross box = (r_min, r_max, d_min, d_max).

    Returns [(elbo, ((R_a, D_a), (R_b, D_b))), ...], the ELBO levels at round values, best (highest) first.
    """
    r_min, r_max, d_min, d_max = box
    lo, hi = r_min + d_min, r_max + d_max  # -ELBO ranges over these inside the box
    step = nice_step(hi - lo, target)
    out = []
    c = math.ceil(lo / step) * step
    while c <= hi + 1e-9:
        seg = clip_line(0.0, c, -1.0, box)
        if seg is not None:
            out.append((-c, seg))
        c += step
    return out


def beta_line(point: tuple, beta: float, box: tuple) -> tuple | None:
    """The line of constant beta-VAE loss D + beta R through point (R, D): slope -beta, clipped to box.
    A beta-VAE at its optimum has the achievable frontier tangent to this line."""
    if not (beta > 0 and math.isfinite(beta)):
        return None
    r0, d0 = point
    return clip_line(r0, d0, -float(beta), box)


def plane_box(points, pad: float = 0.08) -> tuple:
    """A box (r_min, r_max, d_min, d_max) around (R, D) points with some margin; R starts at 0."""
    pts = np.asarray([p for p in points if all(math.isfinite(v) for v in p)], dtype=float).reshape(-1, 2)
    if len(pts) == 0:
        return 0.0, 10.0, 0.0, 30.0
    r_max = max(1.0, float(pts[:, 0].max()))
    d_lo, d_hi = float(pts[:, 1].min()), float(pts[:, 1].max())
    span = max(1.0, d_hi - d_lo, r_max)
    return 0.0, r_max * (1 + 1.5 * pad) + 0.5, d_lo - pad * span, d_hi + pad * span  # room for labels on the right


def outliers(points, k: float = 5.0, floor: float = 1.0) -> list[bool]:
    """Which (R, D) points lie far out on either axis: beyond the quartiles by more than k interquartile ranges
    (the range taken as at least `floor` nats, so that tight clusters do not make every neighbour an outlier). With
    fewer than 4 finite points, none; a non-finite point is one."""
    pts = [(float(r), float(d)) for r, d in points]
    ok = [math.isfinite(r) and math.isfinite(d) for r, d in pts]
    good = np.asarray([p for p, f in zip(pts, ok) if f], dtype=float).reshape(-1, 2)
    if len(good) < 4:
        return [not f for f in ok]
    q1, q3 = np.percentile(good, [25, 75], axis=0)
    reach = k * np.maximum(q3 - q1, floor)
    lo, hi = q1 - reach, q3 + reach
    return [not f or not (lo[0] <= r <= hi[0] and lo[1] <= d <= hi[1]) for (r, d), f in zip(pts, ok)]


def frontier(points) -> list[int]:
    """Indices of the empirical achievable frontier: the points that minimise D + beta R for some beta >= 0 (the
    lower-left convex hull), ordered by rate. Each one is the beta-VAE optimum among these models for the betas
    between the slopes of its two edges."""
    pts = [(float(r), float(d), i) for i, (r, d) in enumerate(points) if math.isfinite(r) and math.isfinite(d)]
    if not pts:
        return []
    pts.sort(key=lambda p: (p[0], p[1]))
    hull: list = []
    for p in pts:  # Andrew's monotone chain, lower hull
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
            hull.pop()
        hull.append(p)
    best = min(range(len(hull)), key=lambda k: (hull[k][1], hull[k][0]))  # lowest distortion ends the frontier
    return [p[2] for p in hull[:best + 1]]


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def describe_objective(train_config: dict | None) -> str:
    """A short text for a run's objective, from its train_config dict: 'β=4', 'β→1 linear warm-up (25 ep)',
    'γ=4, C→10 nats', each with ', free bits λ=0.5' when set."""
    tc = train_config or {}
    beta = tc.get("beta")
    if beta is None:
        return "β unknown"
    kind = tc.get("beta_schedule", "constant")
    if kind in ("linear", "logistic"):
        text = f"β→{beta:g} {kind} warm-up ({tc.get('warmup_epochs', 0):g} ep)"
    elif kind == "cyclical":
        text = f"β→{beta:g} cyclical ({tc.get('cycles', 4)} cycles, R={tc.get('cycle_ratio', 0.5):g})"
    elif kind == "capacity":
        text = f"capacity γ={beta:g}, C→{tc.get('capacity_max', 0):g} nats"
    else:
        text = f"β={beta:g}"
    if tc.get("free_bits"):
        text += f", free bits λ={tc['free_bits']:g}"
    return text


# ---- training histories -----------------------------------------------------------------------------------------
def trajectory(history: dict) -> dict:
    """A run's path on the plane, one point per finished epoch (test split, one z sample):
    {"epoch", "rate", "distortion", "elbo", "active_units", "beta"} lists."""
    h = (history or {}).get("epoch") or {}
    epochs = list(h.get("epoch", []))
    n = min(len(epochs), len(h.get("test_kl", [])), len(h.get("test_recon", [])))
    rate = [float(v) for v in h.get("test_kl", [])[:n]]
    dist = [float(v) for v in h.get("test_recon", [])[:n]]
    return {"epoch": epochs[:n], "rate": rate, "distortion": dist, "elbo": [-(r + d) for r, d in zip(rate, dist)],
            "active_units": list(h.get("active_units", [])[:n]), "beta": list(h.get("beta", [])[:n])}


def kl_heatmap(history: dict) -> np.ndarray:
    """Per-dimension test KL over training: (latent dims, epochs) array in nats; empty (0, 0) before epoch 1."""
    rows = ((history or {}).get("epoch") or {}).get("test_kl_per_dim", [])
    if not rows:
        return np.zeros((0, 0))
    return np.asarray(rows, dtype=float).T


# ---- run specs: a beta sweep and the collapse lab ---------------------------------------------------------------
# Short runs that finish in seconds on a laptop CPU (digits: 12 steps per epoch).
SHORT_MODEL = dict(hidden=(128,), latent_dim=16)
SHORT_TRAIN = dict(epochs=30, batch_size=128, lr=1e-2)
MAX_SWEEP = 12
SWEEP_SCHEDULES = ("constant", "linear", "logistic", "cyclical")


@dataclass(frozen=True)
class RunSpec:
    name: str  # shown on the plane and in the lab
    train_config: TrainConfig
    model_config: ModelConfig
    beta: float
    role: str = ""  # lab: "collapse" for the preset, the remedy key otherwise


def model_config_for(dataset: str, **overrides) -> ModelConfig:
    """A ModelConfig that fits a dataset's shape and usual likelihood (no data is loaded)."""
    info = DATASETS[dataset] if dataset in DATASETS else None
    if info is None:
        raise ValueError(f"dataset={dataset!r} is not known: choose one of {', '.join(DATASETS)}")
    kw = dict(input_dim=math.prod(info.image_shape), image_shape=info.image_shape,
              likelihood=info.default_likelihood)
    kw.update(overrides)
    return ModelConfig(**kw)


MIN_BETA = 1e-6  # the smallest β but 0 a sweep takes


def _beta_tokens(text) -> list[str]:
    return [p for p in re.split(r"[,\s;]+", str(text or "").strip()) if p]


def parse_betas(text) -> tuple[float, ...]:
    """'0.5, 1, 4' -> (0.5, 1.0, 4.0): 1 to MAX_SWEEP distinct finite numbers >= 0, in the order given."""
    parts = _beta_tokens(text)
    msg = (f"β values {str(text)!r} are not allowed: give 1 to {MAX_SWEEP} comma-separated numbers ≥ 0, "
           f"e.g. 0.5, 1, 2, 4")
    if not parts:
        raise ValueError(msg)
    out: list[float] = []
    for p in parts:
        try:
            b = float(p)
        except ValueError:
            raise ValueError(msg) from None
        if not math.isfinite(b) or b < 0 or b > 1000:
            raise ValueError(f"β = {p} is not allowed: each β must be a number from 0 to 1000")
        if b < MIN_BETA and (b > 0 or re.search(r"[1-9]", p.lower().split("e")[0])):  # 1e-400 reads as 0.0
            raise ValueError(f"β = {p} is below the smallest β allowed besides 0 ({MIN_BETA:g}): give 0 for no KL "
                             f"weight, or at least {MIN_BETA:g}")
        b = abs(b) if b == 0 else b  # -0 is 0
        if b not in out:
            out.append(b)
    if len(out) > MAX_SWEEP:
        raise ValueError(msg)
    return tuple(out)


def repeated_betas(text) -> tuple[float, ...]:
    """The β values that text (read as parse_betas reads it) gives more than once: each runs once, the user is told."""
    seen, again = set(), []
    for p in _beta_tokens(text):
        try:
            b = float(p)
        except ValueError:
            continue
        if b in seen and b not in again:
            again.append(b)
        seen.add(b)
    return tuple(again)


def beta_label(beta: float) -> str:
    return f"β={beta:g}"


def sweep_specs(betas, *, dataset: str = "digits", free_bits: float = 0.0, schedule: str = "constant",
                epochs: int = SHORT_TRAIN["epochs"], seed: int = 0, lr: float = SHORT_TRAIN["lr"],
                batch_size: int = SHORT_TRAIN["batch_size"], model: dict | None = None) -> list[RunSpec]:
    """One short run per beta, otherwise identical (same seed, model and data). Configs are validated here, so a
    bad value fails before anything starts. Warm-up schedules ramp over the first two thirds of the run."""
    betas = parse_betas(",".join(str(b) for b in betas)) if not isinstance(betas, str) else parse_betas(betas)
    if schedule not in SWEEP_SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not allowed in a sweep: choose one of "
                         f"{', '.join(SWEEP_SCHEDULES)}")
    mc = model_config_for(dataset, **{**SHORT_MODEL, **(model or {})})
    extra = ""
    if free_bits:
        extra += f", λ={free_bits:g}"
    if schedule != "constant":
        extra += f", {schedule}"
    specs = []
    for b in betas:
        tc = TrainConfig(dataset=dataset, epochs=epochs, batch_size=batch_size, lr=lr, beta=b, seed=seed,
                         free_bits=free_bits, beta_schedule=schedule,
                         warmup_epochs=max(1.0, round(2 * epochs / 3, 2)))
        specs.append(RunSpec(f"sweep {beta_label(b)}{extra}", tc, mc, b, "sweep"))
    return specs


@dataclass(frozen=True)
class Preset:
    key: str
    label: str
    what: str  # one line: why it collapses
    model: dict
    train: dict


@dataclass(frozen=True)
class Remedy:
    key: str
    label: str
    train: dict  # TrainConfig changes; "warmup_frac" is a fraction of the run's epochs
    objective: str  # what it does to the objective, one or two sentences (markdown)
    cite: str
    short: str = ""  # the same in a few words, for a caption


PRESETS = {
    "beta4": Preset(
        "beta4", "β = 4, no warm-up",
        "A β-VAE with β = 4 from the first step: each nat of rate costs four nats of loss, more than it saves in "
        "distortion on digits, so every dimension shuts down (Higgins et al. 2017).",
        dict(SHORT_MODEL), dict(beta=4.0)),
    "autoregressive": Preset(
        "autoregressive", "autoregressive decoder, β = 1",
        "The decoder sees the previous pixels (a masked linear autoregressive term), so it models x without z: "
        "the plain ELBO (β = 1) is best with the rate at zero, and z is ignored (Bowman et al. 2016; "
        "Chen et al. 2017; Gulrajani et al. 2017, PixelVAE).",
        dict(SHORT_MODEL, decoder="autoregressive"), dict(beta=1.0)),
}

REMEDIES = {
    "warmup": Remedy(
        "warmup", "linear warm-up", dict(beta_schedule="linear", warmup_frac=5 / 6),
        "β rises linearly from 0 to its target over the first 5/6 of the run: early on the KL is nearly free, so the "
        "encoder learns to use z before it pays the full price. It changes the path, not the optimum: once β is "
        "back at its target, dimensions can still die.",
        "Bowman et al. 2016", "β: 0 → target over 5/6 of the run"),
    "cyclical": Remedy(
        "cyclical", "cyclical annealing", dict(beta_schedule="cyclical", cycles=3, cycle_ratio=0.8),
        "β is reset to 0 and ramped up again M = 3 times (rising over 80% of each cycle): every restart lets "
        "collapsed dimensions pick up information again, and each cycle starts from a better encoder.",
        "Fu et al. 2019", "β: 0 → target, three times"),
    "free_bits": Remedy(
        "free_bits", "free bits λ = 0.5", dict(free_bits=0.5),
        "The KL term becomes Σ_d max(λ, E_batch KL_d): below λ nats a dimension's KL costs nothing, so there is "
        "no pressure to switch it off. The reported ELBO still uses the true KL.",
        "Kingma et al. 2016", "KL_d below λ nats costs nothing"),
    "capacity": Remedy(
        "capacity", "capacity C → 10 nats", dict(beta_schedule="capacity", capacity_max=10.0, warmup_frac=2 / 3),
        "The loss becomes D + γ|R − C| with γ = the preset's β and C raised from 0 to 10 nats over 2/3 of the run: "
        "the rate is pulled towards C instead of towards 0. 10 nats is more than a good β = 1 model of digits "
        "carries (3.3 nats, the shipped one): it keeps every dimension busy and costs ELBO (see the table); the Train "
        "page suggests C ≈ 4 nats for a model that should also score well.",
        "Burgess et al. 2018", "D + γ|R − C|, C: 0 → 10 nats"),
}

LAB_REMEDIES = ("warmup", "cyclical", "free_bits", "capacity")


def lab_specs(preset: str, remedies=LAB_REMEDIES, *, seed: int = 0, epochs: int = SHORT_TRAIN["epochs"],
              dataset: str = "digits") -> list[RunSpec]:
    """The collapse preset first, then one run per remedy, all on the same seed, model and data."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not known: choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    unknown = [r for r in remedies if r not in REMEDIES]
    if unknown:
        raise ValueError(f"remedy {unknown[0]!r} is not known: choose from {', '.join(REMEDIES)}")
    mc = model_config_for(dataset, **p.model)
    base = dict(dataset=dataset, seed=seed, epochs=epochs, batch_size=SHORT_TRAIN["batch_size"],
                lr=SHORT_TRAIN["lr"], **p.train)
    specs = [RunSpec(f"{p.label}: collapses", TrainConfig(**base), mc, base["beta"], "collapse")]
    for key in dict.fromkeys(remedies):  # unique, in order
        r = REMEDIES[key]
        changes = dict(r.train)
        frac = changes.pop("warmup_frac", None)
        if frac is not None:
            changes["warmup_epochs"] = max(1.0, round(frac * epochs, 2))
        specs.append(RunSpec(f"+ {r.label}", TrainConfig(**{**base, **changes}), mc, base["beta"], key))
    return specs


LAB_SEP = " · "  # a lab run's name: "lab <preset> · <run>"
LAB_SHORT = {"beta4": "β4", "autoregressive": "AR"}


def lab_run_name(preset: str, spec: RunSpec) -> str:
    """The registry name of a lab run: "lab β4 · collapsed", "lab β4 · + free bits λ = 0.5"."""
    return f"lab {LAB_SHORT[preset]}{LAB_SEP}{'collapsed' if spec.role == 'collapse' else spec.name}"


def lab_meta_from_names(names) -> dict | None:
    """The inverse of lab_run_name over a lab's runs: {"preset": key, "roles": [role per run]}, or None when the
    names are not a lab's (a page reopened from its URL finds its lab again by them)."""
    names = list(names)
    if not names:
        return None
    head = names[0].split(LAB_SEP, 1)[0]
    preset = next((k for k, short in LAB_SHORT.items() if head == f"lab {short}"), None)
    if preset is None:
        return None
    by_name = {lab_run_name(preset, s): s.role for s in lab_specs(preset, LAB_REMEDIES)}
    roles = [by_name.get(n) for n in names]
    return None if None in roles else {"preset": preset, "roles": roles}


def run_summary(history: dict) -> dict | None:
    """Final figures of a run from its history: rate, distortion, ELBO and active units at the last epoch, and the
    most active units any epoch had. None before the first epoch ends."""
    t = trajectory(history)
    if not t["epoch"]:
        return None
    au = t["active_units"]
    return {"epoch": t["epoch"][-1], "rate": t["rate"][-1], "distortion": t["distortion"][-1],
            "elbo": t["elbo"][-1], "active_units": au[-1] if au else None, "peak_active_units": max(au) if au else None}


__all__ = ["RDPoint", "rate_distortion", "iso_elbo_lines", "beta_line", "clip_line", "plane_box", "frontier",
           "nice_step", "describe_objective", "trajectory", "kl_heatmap", "RunSpec", "parse_betas", "repeated_betas",
           "sweep_specs", "model_config_for", "Preset", "Remedy", "PRESETS", "REMEDIES", "LAB_REMEDIES", "lab_specs",
           "run_summary", "SHORT_MODEL", "SHORT_TRAIN", "beta_label"]
