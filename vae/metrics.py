"""Training curves for display and export: smoothing, down-sampling, the per-dimension KL heatmap, collapse detection
and CSV. Pure Python/NumPy over a Trainer history (vae.trainer.new_history): no Streamlit, no torch.

Sign conventions (nats per example): `recon` is the reconstruction NLL, -E_q[log p_theta(x|z)] >= 0 for a Bernoulli
decoder; `kl` is KL(q_phi(z|x) || p(z)) >= 0; `elbo` = -(recon + kl), the bound on log p_theta(x).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

import numpy as np

COLLAPSE_KL_NATS = 0.1  # total test KL below this ...
COLLAPSE_PATIENCE = 5  # ... (or no active unit) for this many consecutive epochs: collapse


# ---- curves -----------------------------------------------------------------------------------------------------
def smooth_ema(values, weight: float) -> np.ndarray:
    """Debiased exponential moving average (as TensorBoard draws it): weight 0 returns the values, 0.99 is very
    smooth. Non-finite values do not enter the average (the average so far stands in their place)."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing={weight!r} is not allowed: give a number in [0, 1)")
    v = np.asarray(values, dtype=float)
    if weight == 0 or v.size == 0:
        return v.copy()
    if np.isfinite(v).all():  # the common case, vectorised: acc_t = w acc_{t-1} + (1 - w) x_t, / (1 - w^(t+1))
        from scipy.signal import lfilter

        acc = lfilter([1 - weight], [1, -weight], v)
        return acc / (1 - weight ** np.arange(1, v.size + 1))
    out = np.empty_like(v)
    acc, norm = 0.0, 0.0
    for i, x in enumerate(v):
        if math.isfinite(x):
            acc = weight * acc + (1 - weight) * x
            norm = weight * norm + (1 - weight)
        out[i] = acc / norm if norm > 0 else x
    return out


def downsample_indices(n: int, max_points: int) -> np.ndarray:
    """At most max_points indices spread evenly over range(n), always keeping the first and the last."""
    if max_points < 2:
        raise ValueError(f"max_points={max_points} is not allowed: give at least 2")
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(int))


def step_curves(history: dict, smoothing: float = 0.0, max_points: int = 1500) -> dict[str, np.ndarray]:
    """Per-step training curves, smoothed over all steps and then thinned to at most max_points for drawing.
    Keys: step, epoch (fractional), recon, kl, elbo, loss, beta, lr."""
    h = history.get("step", {})
    n = len(h.get("step", []))
    idx = downsample_indices(n, max_points)
    out = {}
    for k in ("step", "epoch", "beta", "lr"):
        out[k] = np.asarray(h.get(k, []), dtype=float)[idx] if n else np.zeros(0)
    for k in ("recon", "kl", "elbo", "loss"):
        out[k] = smooth_ema(h.get(k, []), smoothing)[idx] if n else np.zeros(0)
    return out


def epoch_curves(history: dict) -> dict[str, np.ndarray]:
    """Per-epoch curves: epoch, step (at the epoch's end), test_recon, test_kl, test_elbo, train_recon, train_kl,
    train_elbo, active_units, beta."""
    h = history.get("epoch", {})
    keys = ("epoch", "step", "test_recon", "test_kl", "test_elbo", "train_recon", "train_kl", "train_elbo",
            "active_units", "beta")
    return {k: np.asarray(h.get(k, []), dtype=float) for k in keys}


def kl_heatmap(history: dict) -> tuple[np.ndarray, np.ndarray]:
    """(epochs (E,), matrix (d, E)): the test KL of each latent dimension at the end of each epoch, in nats."""
    h = history.get("epoch", {})
    rows = h.get("test_kl_per_dim", [])
    epochs = np.asarray(h.get("epoch", []), dtype=float)
    if not rows:
        return epochs, np.zeros((0, 0))
    return epochs, np.asarray(rows, dtype=float).T


def events(history: dict) -> list[dict]:
    """Mid-run changes ({step, epoch, text}) to mark on the curves."""
    return list(history.get("events", []))


# ---- collapse -----------------------------------------------------------------------------------------------------
@dataclass
class CollapseStatus:
    collapsed: bool
    since_epoch: int | None = None  # first epoch of the current collapsed stretch
    epochs: int = 0  # length of that stretch so far
    active_units: int | None = None  # at the last epoch
    total_kl: float | None = None  # test KL at the last epoch, nats
    dead_dims: int = 0  # dimensions whose test KL is below 0.01 nats at the last epoch
    latent_dim: int = 0
    reason: str = ""
    remedies: list[str] = field(default_factory=list)


def detect_collapse(history: dict, kl_threshold: float = COLLAPSE_KL_NATS, patience: int = COLLAPSE_PATIENCE,
                    train_config: dict | None = None, model_config: dict | None = None) -> CollapseStatus:
    """Posterior collapse: for the last `patience` epochs (at least), either no active unit or a total test KL below
    kl_threshold nats. Early in training a healthy model can pass through such a stretch and recover, so a short
    one is not reported."""
    if patience < 1:
        raise ValueError(f"patience={patience} is not allowed: give at least 1 epoch")
    h = history.get("epoch", {})
    kls, aus, epochs = h.get("test_kl", []), h.get("active_units", []), h.get("epoch", [])
    per_dim = h.get("test_kl_per_dim", [])
    if not kls:
        return CollapseStatus(False, reason="no finished epoch yet")
    bad = [(au == 0) or (kl < kl_threshold) for au, kl in zip(aus, kls)]
    run = 0
    for b in reversed(bad):
        if not b:
            break
        run += 1
    last_dims = per_dim[-1] if per_dim else []
    status = CollapseStatus(False, epochs=run, active_units=int(aus[-1]), total_kl=float(kls[-1]),
                            dead_dims=int(sum(1 for v in last_dims if v < 0.01)), latent_dim=len(last_dims))
    if run >= patience:
        status.collapsed = True
        status.since_epoch = int(epochs[-run])
        what = []
        if aus[-1] == 0:
            what.append("no active unit")
        if kls[-1] < kl_threshold:
            what.append(f"total KL below {kl_threshold:g} nats")
        status.reason = (f"Since epoch {status.since_epoch}: {' and '.join(what)} for {run} epochs (total KL now "
                         f"{kls[-1]:.3f} nats); q_φ(z|x) ≈ p(z) for every x, so the decoder ignores z")
        status.remedies = collapse_remedies(train_config or {}, model_config or {})
    else:
        status.reason = "not collapsed" if run == 0 else f"low KL for {run} epoch(s): watching"
    return status


def collapse_remedies(train_config: dict, model_config: dict) -> list[str]:
    """What to try, given the run's settings (REFERENCES.md, 'Remedies')."""
    tc, mc = train_config, model_config
    out = []
    beta = tc.get("beta", 1.0)
    if mc.get("decoder") == "autoregressive":
        out.append("use the standard decoder: the autoregressive one sees the previous pixels and can model x "
                   "without z")
    if tc.get("free_bits", 0.0) == 0:
        out.append("free bits: a per-dimension KL floor, λ = 0.5 nats (Kingma et al. 2016)")
    if tc.get("beta_schedule", "constant") == "constant":
        out.append("KL warm-up: β from 0 to 1 over ~10 epochs (Bowman et al. 2016), or cyclical annealing "
                   "(Fu et al. 2019)")
    if beta > 1 and tc.get("beta_schedule") != "capacity":
        out.append(f"a lower β (now {beta:g}): each nat of KL costs β nats of loss but only 1 nat of ELBO, so "
                   "β > 1 pays the model to drop information the decoder could use")
    if tc.get("beta_schedule") != "capacity":
        c = CAPACITY_HINT.get(tc.get("dataset"), 25)
        out.append(f"capacity annealing: loss = recon + γ·|KL − C|, C rising to about the KL a good model of this "
                   f"data carries, ~{c:g} nats here (Burgess et al. 2018; a larger C forces more KL than the data "
                   f"needs and lowers the ELBO)")
    return out


# C_max to suggest: about the KL of a well-trained beta = 1 model of each data set. The shipped ones carry 3.3 nats
# (digits, d = 16; 3.1 with d = 2) and 1.4 nats (moons); for 28x28 images the reference setting, 25 nats (Burgess
# et al. 2018; REFERENCES.md).
CAPACITY_HINT = {"digits": 4, "moons": 1.5, "mnist": 25, "fashion-mnist": 25}


# ---- instability ---------------------------------------------------------------------------------------------------
SPIKE_BLOCK = 50  # steps: each block of steps is compared with the block before it
SPIKE_RATIO, SPIKE_MIN_NATS = 10.0, 100.0  # a jump to this many times the previous block's median, and this far up
TRIVIAL_MARGIN = 1.1  # "worse than the trivial model" means worse by more than 10 %


def trivial_loss(model_config: dict, train_config: dict) -> float | None:
    """The training objective (nats per example) of the model that ignores z, for a Bernoulli decoder: q(z|x) = p(z)
    (KL 0 in every dimension) and p(x_i = 1 | z) = 1/2 for every pixel, whose reconstruction NLL is D ln 2 for any x
    in [0, 1]. Its loss is D ln 2 plus what the KL term charges at KL = 0: β·d·λ with free bits, γ·C with capacity
    annealing (at the largest β and C the schedule reaches). None for other likelihoods."""
    if model_config.get("likelihood") != "bernoulli" or not model_config.get("input_dim"):
        return None
    beta = float(train_config.get("beta", 1.0))
    loss = model_config["input_dim"] * math.log(2.0)
    if train_config.get("beta_schedule") == "capacity":
        return loss + beta * float(train_config.get("capacity_max", 0.0))
    return loss + beta * model_config.get("latent_dim", 0) * float(train_config.get("free_bits", 0.0))


KL_ABSURD_NATS = 1e4  # a test KL above this (nats per example) is a diverged encoder, for any data set here


def detect_instability(history: dict, model_config: dict | None = None,
                       train_config: dict | None = None) -> str | None:
    """A one-line warning when a run went unstable without a NaN (which the trainer's guard catches), else None:
      - a jump: after the first epoch, a step's -ELBO (recon + KL; the β-weighted loss is large early by design
        when β is) more than SPIKE_MIN_NATS and more than SPIKE_RATIO - 1 times |median| above the median of the
        SPIKE_BLOCK steps before its block. Compared with the steps just before, so a run that jumps and stays up
        is caught at the jump, and scale-free enough for a Gaussian decoder, whose -ELBO can be near 0 or negative;
      - a test ELBO that is not finite, or a test KL above KL_ABSURD_NATS (any likelihood, from the first epoch);
      - for a Bernoulli decoder, after 3 epochs: the test reconstruction NLL above D ln 2 (a decoder can always give
        every pixel probability 1/2, whatever β), or the training objective above that of the model that ignores z
        (trivial_loss), each by more than 10 %."""
    tc, mc = train_config or {}, model_config or {}
    lr = tc.get("lr")
    tip = f"try a lower learning rate (now {lr:g}) or gradient clipping" if lr else \
        "try a lower learning rate or gradient clipping"
    sh = history.get("step", {})
    neg = -np.asarray(sh.get("elbo", []), dtype=float)
    ep = np.asarray(sh.get("epoch", []), dtype=float)
    if neg.size and ep.size == neg.size:
        later = np.nonzero(ep > 1.0)[0]
        v = neg[later]
        bad = np.nonzero(~np.isfinite(v))[0]
        if bad.size:
            return f"Unstable training: −ELBO is {v[bad[0]]} at step {int(sh['step'][later[bad[0]]])}; {tip}."
        n = v.size // SPIKE_BLOCK * SPIKE_BLOCK
        if n >= 2 * SPIKE_BLOCK:
            off = v.size - n  # blocks aligned to the newest step: the latest steps are always in one
            blocks = v[off:].reshape(-1, SPIKE_BLOCK)
            med, peak = np.median(blocks[:-1], axis=1), blocks[1:].max(axis=1)
            limit = np.maximum(SPIKE_MIN_NATS, (SPIKE_RATIO - 1.0) * np.abs(med))
            jumps = np.nonzero(peak - med > limit)[0]
            if jumps.size:
                b = int(jumps[0])
                i = later[off + (b + 1) * SPIKE_BLOCK + int(np.argmax(blocks[b + 1]))]
                return (f"Unstable training: −ELBO jumped to {neg[i]:.3g} nats at step {int(sh['step'][i])}, "
                        f"from a median of {med[b]:.3g} over the {SPIKE_BLOCK} steps before; {tip}.")
    e = history.get("epoch", {})
    if e.get("test_elbo"):  # any likelihood
        elbo, kl = e["test_elbo"][-1], (e.get("test_kl") or [0.0])[-1]
        if not math.isfinite(elbo):
            return f"Training has gone wrong: the test ELBO is {elbo}; {tip}."
        if kl > KL_ABSURD_NATS:
            return (f"Training has gone wrong: the test KL is {kl:.3g} nats, where a working model's is tens to a "
                    f"few hundred; {tip}.")
    if mc.get("likelihood") == "bernoulli" and mc.get("input_dim") and len(e.get("test_elbo", [])) >= 3:
        coin = mc["input_dim"] * math.log(2.0)
        recon = (e.get("test_recon") or [None])[-1]
        if recon is not None and recon > TRIVIAL_MARGIN * coin:
            return (f"Training has gone wrong: the test reconstruction NLL {recon:.1f} nats is above {coin:.1f}, "
                    f"that of a decoder giving every pixel probability 1/2; {tip}.")
        trivial, loss = trivial_loss(mc, tc), (e.get("train_loss") or [None])[-1]
        if trivial is not None and loss is not None and loss > TRIVIAL_MARGIN * trivial:
            return (f"Training has gone wrong: the training objective {loss:.3g} nats is above {trivial:.3g}, that "
                    f"of a model that ignores z and gives every pixel probability 1/2; {tip}.")
    return None


# ---- formatting and export ---------------------------------------------------------------------------------------
def format_duration(seconds: float | None) -> str:
    """'-' for None, else '42 s', '3 min 05 s' or '1 h 02 min'."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def history_csv(history: dict) -> str:
    """The whole history as CSV text: one row per training step (step, epoch, loss, recon, kl, elbo, beta, lr); on
    the row of the step that ended an epoch, that epoch's test figures and the per-dimension test KL; mid-run
    changes in an `event` column. All in nats per example."""
    hs, he = history.get("step", {}), history.get("epoch", {})
    step_keys = ("step", "epoch", "loss", "recon", "kl", "elbo", "beta", "lr")
    epoch_keys = ("train_elbo", "test_elbo", "test_recon", "test_kl", "active_units", "samples_per_s")
    per_dim = he.get("test_kl_per_dim", [])
    d = max((len(r) for r in per_dim), default=0)
    header = [*step_keys, *(f"epoch_{k}" for k in epoch_keys), *(f"test_kl_dim{i + 1}" for i in range(d)), "event"]
    at_step = {int(s): i for i, s in enumerate(he.get("step", []))}
    ev: dict[int, list[str]] = {}
    for e in history.get("events", []):
        ev.setdefault(int(e["step"]), []).append(str(e["text"]))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for s in sorted(k for k in ev if k < 1):  # changes made before the first step
        w.writerow([s] + [""] * (len(header) - 2) + ["; ".join(ev.pop(s))])
    n = len(hs.get("step", []))
    for i in range(n):
        s = int(hs["step"][i])
        row = [_num(hs[k][i]) for k in step_keys]
        j = at_step.get(s)
        if j is None:
            row += [""] * (len(epoch_keys) + d)
        else:
            row += [_num(he[k][j]) if k in he and j < len(he[k]) else "" for k in epoch_keys]
            dims = per_dim[j] if j < len(per_dim) else []
            row += [_num(v) for v in dims] + [""] * (d - len(dims))
        # an event recorded at step s was applied before step s + 1 ran: put it on the row of step s
        row.append("; ".join(ev.pop(s, [])))
        w.writerow(row)
    for s, texts in sorted(ev.items()):  # steps without a row (none in a well-formed history)
        w.writerow([s] + [""] * (len(header) - 2) + ["; ".join(texts)])
    return buf.getvalue()


def _num(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return v


__all__ = ["smooth_ema", "downsample_indices", "step_curves", "epoch_curves", "kl_heatmap", "events",
           "CollapseStatus", "detect_collapse", "collapse_remedies", "detect_instability", "trivial_loss",
           "format_duration", "history_csv", "COLLAPSE_KL_NATS", "COLLAPSE_PATIENCE"]
