"""Shared pieces of the Latent space and Decode pages: the cached encoding of a split, per-dimension statistics with
a data-free fallback, a live-run follower, and the Plotly figure builders. Computation lives in vae.projection and
vae.latent_ops; this module only caches it and draws it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from ui.core import Selection, selection_data, style_fig
from vae.data import DATASETS
from vae.diagnostics import ACTIVE_THRESHOLD, kl_decomposition
from vae.latent_ops import decoder_sensitivity, dims_by_kl, encode_split, inactive_by_kl, prior_latents
from vae.projection import (DimStats, Projection, aggregate_density, aggregate_density_1d, dimension_stats,
                            encoding_key, plot_limits, posterior_ellipses, prior_in_plane, project,
                            projection_key, gaussian_ellipse, standard_normal_pdf)

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
INACTIVE_GREY = "#b0b0b0"


def color(label: int) -> str:
    return PALETTE[int(label) % len(PALETTE)]


def class_names(dataset: str) -> tuple:
    info = DATASETS.get(dataset)
    return info.classes if info is not None else tuple(str(i) for i in range(10))


# ---- the encoded split (cached per exact weights + dataset + split) ---------------------------------------------
@dataclass
class Codes:
    key: str  # vae.projection.encoding_key: weights, dataset, split, binarisation
    mu: np.ndarray  # (N, d) posterior means
    logvar: np.ndarray  # (N, d)
    y: np.ndarray  # (N,) labels
    dataset: str
    split: str


@st.cache_data(max_entries=16, show_spinner=False)
def _encode(enc_key: str, _model, _x):
    """Encode a split once; the key alone identifies it (the model and the data are not hashed)."""
    return encode_split(_model, _x)


def encoded_split(sel: Selection, split: str = "test"):
    """(Codes, None) or (None, one-line message saying how to provide the data)."""
    data, err = selection_data(sel, split)
    if data is None:
        return None, err
    if data.dim != sel.config.input_dim:
        return None, (f"dataset '{data.name}' has {data.dim} values per example but the model expects "
                      f"{sel.config.input_dim}: pick a model trained on {data.name}")
    binarize = bool((sel.info.get("train_config") or {}).get("binarize", False))
    key = encoding_key(sel.key, sel.dataset, split, binarize)
    mu, logvar = _encode(key, sel.model, data.x)
    return Codes(key, mu, logvar, data.y.numpy(), sel.dataset, split), None


@st.cache_data(max_entries=32, show_spinner=False)
def _project(proj_key: str, _mu, method: str, dims: tuple, seed: int) -> Projection:
    return project(_mu, method, dims=dims, seed=seed)


def projected(codes: Codes, method: str, dims: tuple = (0, 1), seed: int = 0) -> Projection:
    """The projection of an encoded split, cached by vae.projection.projection_key."""
    return _project(projection_key(codes.key, method, dims, seed), codes.mu, method, tuple(dims), seed)


@st.cache_data(max_entries=16, show_spinner=False)
def _surgery(enc_key: str, _mu, _logvar, max_points: int = 1000):
    """ELBO surgery on (a seeded subsample of) the encoded split: mean KL = I_q(n; z) + KL(q(z) || p(z))."""
    import torch

    from vae.projection import sample_indices

    idx = sample_indices(len(_mu), min(len(_mu), max_points), seed=0)
    g = torch.Generator().manual_seed(0)
    out = kl_decomposition(torch.as_tensor(_mu[idx]), torch.as_tensor(_logvar[idx]), n_samples=500, generator=g)
    out["n"] = len(idx)
    return out


def surgery(codes: Codes) -> dict:
    return _surgery(codes.key, codes.mu, codes.logvar)


# ---- per-dimension statistics, with a fallback when the data is missing -----------------------------------------
@dataclass
class DimInfo:
    kl: np.ndarray  # (d,) nats
    active: np.ndarray  # (d,) bool
    order: np.ndarray  # (d,) most informative first
    source: str  # where the numbers come from, for a caption
    stats: DimStats | None = None  # the full statistics when measured on data
    known: bool = True  # False: neither data nor a recorded KL (index order, activity unknown)


def dim_info(sel: Selection, codes: Codes | None) -> DimInfo:
    """KL per dimension and active flags: measured on the encoded split when there is one, else the KL recorded
    in the checkpoint (active = KL above 0.01 nats), else unknown (index order, all shown as active)."""
    d = sel.config.latent_dim
    if codes is not None:
        s = dimension_stats(codes.mu, codes.logvar)
        return DimInfo(s.kl, s.active, s.order, f"measured on the {codes.split} split"
                                                 f"; active: Var_x μ_d > {ACTIVE_THRESHOLD}", s)
    recorded = (sel.info.get("metrics") or {}).get("test_kl_per_dim")
    if not recorded:
        hist = ((sel.info.get("history") or {}).get("epoch") or {}).get("test_kl_per_dim") or []
        recorded = hist[-1] if hist else None
    if recorded is not None and len(recorded) == d:
        kl = np.asarray(recorded, dtype=np.float64)
        return DimInfo(kl, ~inactive_by_kl(kl), dims_by_kl(kl),
                       f"recorded in the checkpoint, no data to measure; active: KL > {ACTIVE_THRESHOLD} nats")
    return DimInfo(np.zeros(d), np.ones(d, bool), np.arange(d),
                   "no data and no recorded KL: dimensions in index order, activity unknown", known=False)


@st.cache_data(max_entries=32, show_spinner=False)
def sensitivity(model_key: str, _model, source: str, n: int, _mu=None) -> np.ndarray:
    """Mean ||dE[x|z]/dz_d|| over n prior samples (source='prior') or posterior means (source='posterior')."""
    d = _model.config.latent_dim
    z = prior_latents(n, d, 1.0, seed=0) if source == "prior" else np.asarray(_mu)[:n]
    return decoder_sensitivity(_model, z)


# ---- a live run: rerun when its weights move on --------------------------------------------------------------------
def follow_live_run(sel: Selection, page: str, poll: bool = True, why_not: str = ""):
    """For a live training run, rerun the page every few seconds while its weights change, so nothing is stale.
    poll=False shows the run's state without refreshing (why_not says why)."""
    job = sel.job
    if job is None:
        return
    snap = job.snapshot()
    seen = snap.weights_version
    c1, c2 = st.columns([1, 3])
    follow = c1.toggle("Follow the live run", value=snap.active, key=f"{page}_follow",
                       help="Re-encode and redraw with the run's latest weights every few seconds")
    c2.caption(f"Live run **{snap.name}** ({snap.state}), epoch {snap.epoch}/{snap.epochs}, weights version {seen}.")
    if not follow or not snap.active:
        return
    if not poll:
        st.caption(why_not)
        return

    @st.fragment(run_every=3.0)
    def _poll():
        if job.snapshot().weights_version != seen:
            st.rerun(scope="app")

    _poll()


# ---- figures -----------------------------------------------------------------------------------------------------
def _lines(paths) -> tuple:
    """Many polylines (K, n, 2) as one trace's x, y with None gaps."""
    xs, ys = [], []
    for p in paths:
        xs.extend(p[:, 0].tolist() + [None])
        ys.extend(p[:, 1].tolist() + [None])
    return xs, ys


def prior_traces(proj: Projection, xlim: tuple) -> list:
    """N(0, I) in the plane: its 1, 2, 3 sigma contours (or, for a strip, lines at 0, +-1, +-2, +-3 sigma)."""
    if proj.method == "strip":
        return [go.Scatter(x=[v, v], y=[-0.5, 0.5], mode="lines", hoverinfo="skip", showlegend=(v == 0),
                           name="prior N(0,1): 0, ±1, ±2, ±3σ", legendgroup="prior",
                           line=dict(color="rgba(0,0,0,0.35)", dash="dot", width=1)) for v in range(-3, 4)]
    mean, cov = prior_in_plane(proj)
    paths = [gaussian_ellipse(mean, cov, k, 97) for k in (1, 2, 3)]
    xs, ys = _lines(paths)
    return [go.Scatter(x=xs, y=ys, mode="lines", name="prior N(0, I): 1, 2, 3σ", hoverinfo="skip",
                       line=dict(color="rgba(0,0,0,0.45)", dash="dash", width=1.5))]


def scatter_figure(codes: Codes, proj: Projection, n_ellipses: int = 0, selected=(), height: int = 560,
                   show_prior: bool = True) -> go.Figure:
    """Posterior means coloured by label (WebGL), optional +-2 sigma ellipses and the prior; selected points ringed.
    Each marker carries its row in the split as customdata, so a selection maps back to examples."""
    names = class_names(codes.dataset)
    y = codes.y[proj.index]
    fig = go.Figure()
    big = len(proj.index) > 3000
    for lab in np.unique(y):
        m = y == lab
        rows = proj.index[m]
        fig.add_trace(go.Scattergl(
            x=proj.coords[m, 0], y=proj.coords[m, 1], mode="markers", customdata=rows,
            name=names[lab] if lab < len(names) else str(lab), legendgroup=str(lab),
            marker=dict(size=4 if big else 7, color=color(lab), opacity=0.75, line=dict(width=0)),
            hovertemplate="example #%{customdata}<br>(%{x:.2f}, %{y:.2f})<extra>%{fullData.name}</extra>"))
    if n_ellipses and proj.linear:
        from vae.projection import sample_indices

        idx = sample_indices(len(codes.mu), n_ellipses, seed=1)
        ell = posterior_ellipses(codes.mu, codes.logvar, proj, idx)
        for lab in np.unique(codes.y[idx]):
            xs, ys = _lines(ell[codes.y[idx] == lab])
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", legendgroup=str(lab),
                                     showlegend=False, line=dict(color=color(lab), width=1), opacity=0.6))
    xlim, ylim = plot_limits(proj.coords, include_prior=show_prior and proj.linear)
    if show_prior and proj.linear:
        for t in prior_traces(proj, xlim):
            fig.add_trace(t)
    sel = np.asarray(list(selected), dtype=int)
    if len(sel):
        pos = {r: i for i, r in enumerate(proj.index)}
        keep = np.array([pos[r] for r in sel if r in pos], dtype=int)
        if len(keep):
            fig.add_trace(go.Scattergl(x=proj.coords[keep, 0], y=proj.coords[keep, 1], mode="markers",
                                       customdata=proj.index[keep], name=f"selected ({len(keep)})",
                                       hovertemplate="example #%{customdata}<extra>selected</extra>",
                                       marker=dict(size=11, color="rgba(0,0,0,0)",
                                                   line=dict(width=1.6, color="black"))))
    fig.update_layout(xaxis_title=proj.axis_labels[0], yaxis_title=proj.axis_labels[1], dragmode="lasso",
                      uirevision=codes.key.split("|", 1)[-1] + proj.method)
    if proj.method == "strip":
        fig.update_yaxes(range=[-0.6, 0.6], showticklabels=False)
        fig.update_xaxes(range=list(xlim))
    elif proj.linear:  # equal axes, so ellipses keep their shape; the plot area shrinks rather than the ranges grow
        # (toward the top: in a narrow column the square sat mid-height, a blank band above it and its x axis
        # below a projector's fold)
        fig.update_xaxes(range=list(xlim), constrain="domain")
        fig.update_yaxes(range=list(ylim), scaleanchor="x", scaleratio=1, constrain="domain", constraintoward="top")
    style_fig(fig, height)
    # the legend below the plot: the modebar (box / lasso select) lives above it
    return fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.14, x=0, itemsizing="constant"))


def aggregate_figure(codes: Codes, proj: Projection, height: int = 420) -> go.Figure:
    """The aggregate posterior q(z) in the plane (heatmap) against the prior's 1, 2, 3 sigma contours; a 1-D latent
    gets the two densities as curves."""
    fig = go.Figure()
    if proj.method == "strip":
        grid = np.linspace(-4.5, 4.5, 361)
        fig.add_trace(go.Scatter(x=grid, y=aggregate_density_1d(codes.mu[:, 0], codes.logvar[:, 0], grid),
                                 name="aggregate posterior q(z)", line=dict(width=3)))
        fig.add_trace(go.Scatter(x=grid, y=standard_normal_pdf(grid), name="prior N(0, 1)",
                                 line=dict(color="black", dash="dash")))
        fig.update_layout(xaxis_title="z1", yaxis_title="density")
        return style_fig(fig, height)
    xlim, ylim = plot_limits(proj.coords)
    xs, ys = np.linspace(*xlim, 72), np.linspace(*ylim, 72)
    dens = _aggregate_grid(projection_key(codes.key, proj.method, proj.extra.get("dims", (0, 1))) + f"|{xlim}{ylim}",
                           codes.mu, codes.logvar, proj, xs, ys)
    fig.add_trace(go.Heatmap(x=xs, y=ys, z=dens, colorscale="Blues", name="q(z)",
                             colorbar=dict(title="q(z)"),
                             hovertemplate="(%{x:.2f}, %{y:.2f})<br>q(z) = %{z:.3g}<extra></extra>"))
    # the prior's 1, 2, 3 sigma ellipses, as on the scatter beside it (contours of its density at evenly spaced
    # levels were other radii, and the caption asks to judge q(z) against these)
    for tr in prior_traces(proj, xlim):
        fig.add_trace(tr.update(line=dict(color="black", dash="dash", width=1.4)))
    fig.update_layout(xaxis_title=proj.axis_labels[0], yaxis_title=proj.axis_labels[1])
    fig.update_xaxes(range=list(xlim), constrain="domain")
    fig.update_yaxes(range=list(ylim), scaleanchor="x", scaleratio=1, constrain="domain")
    style_fig(fig, height)
    return fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.14, x=0))


@st.cache_data(max_entries=32, show_spinner=False)
def _aggregate_grid(grid_key: str, _mu, _logvar, _proj, _xs, _ys) -> np.ndarray:
    return aggregate_density(_mu, _logvar, _proj, _xs, _ys, max_components=1000)


def dims_figure(info: DimInfo, height: int = 360, with_variance: bool = True) -> go.Figure:
    """KL per dimension (and the variance of the means), inactive dimensions greyed."""
    from plotly.subplots import make_subplots

    d = len(info.kl)
    names = [f"z{i + 1}" for i in range(d)]
    colors = ["#1f77b4" if a else INACTIVE_GREY for a in info.active]
    text = ["" if a else "inactive" for a in info.active]
    rows = 2 if (with_variance and info.stats is not None) else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("KL(q(z_d|x) ‖ N(0,1)), nats",
                                        "Var_x μ_d, variance of the means (log)")[:rows])
    # "inactive" upright above its bar, at full size (Plotly shrank it to the bar's width: 6 px on 16 bars)
    fig.add_trace(go.Bar(x=names, y=info.kl, marker_color=colors, text=text, textposition="outside",
                         textangle=-90, constraintext="none", cliponaxis=False,
                         name="KL (nats)", hovertemplate="%{x}: %{y:.3f} nats<extra></extra>"), 1, 1)
    # from 0 to at least 0.5 nats: a collapsed model's KLs of 1e-6 nats drawn as tall bars looked alive
    top = float(np.nanmax(info.kl)) if len(info.kl) else 0.0
    fig.update_yaxes(range=[0, max(0.5, 1.25 * top if np.isfinite(top) else 0.5)], row=1, col=1)
    if rows == 2:
        var = np.maximum(info.stats.mean_variance, 1e-8)
        fig.add_trace(go.Bar(x=names, y=var, marker_color=colors, name="Var_x μ_d",
                             hovertemplate="%{x}: %{y:.3g}<extra></extra>"), 2, 1)
        fig.add_hline(y=info.stats.threshold, line_dash="dash", line_color="crimson", row=2, col=1,
                      annotation_text=f"active threshold {info.stats.threshold}", annotation_position="top left")
        fig.update_yaxes(type="log", dtick=1, row=2, col=1)  # ticks at powers of ten only
    # no SI prefixes on the ticks: "150μ" read as the mean μ here, not micro-nats
    fig.update_yaxes(exponentformat="power", row=1, col=1)
    if rows == 2:
        fig.update_yaxes(exponentformat="power", row=2, col=1)
    fig.update_layout(showlegend=False, bargap=0.25)
    return style_fig(fig, height * rows // (2 if rows == 2 else 1) + (120 if rows == 2 else 0))


def sensitivity_figure(sens: np.ndarray, info: DimInfo, height: int = 320) -> go.Figure:
    """The decoder's sensitivity to each dimension, in the sliders' order (most informative first)."""
    order = [int(i) for i in info.order] if len(info.order) == len(sens) else list(range(len(sens)))
    names = [f"z{i + 1}" for i in order]
    colors = ["#2ca02c" if info.active[i] else INACTIVE_GREY for i in order]
    fig = go.Figure(go.Bar(x=names, y=[float(sens[i]) for i in order], marker_color=colors,
                           hovertemplate="%{x}: %{y:.4f}<extra></extra>"))
    fig.update_layout(yaxis_title="mean ‖∂E[x|z]/∂z_d‖₂",
                      xaxis_title="latent dimension, as the sliders order them (grey: inactive)")
    return style_fig(fig, height)


def points_figure(data_x=None, data_y=None, dataset: str = "moons", recon=None, highlight=None, decoded=None,
                  samples=None, height: int = 480, title: str = "data space") -> go.Figure:
    """2-D data (e.g. moons): points coloured by label, reconstructions, highlighted examples, decoded points."""
    names = class_names(dataset)
    fig = go.Figure()
    if data_x is not None:
        for lab in np.unique(data_y):
            m = data_y == lab
            fig.add_trace(go.Scattergl(x=data_x[m, 0], y=data_x[m, 1], mode="markers", name=f"x: {names[lab]}",
                                       marker=dict(size=5, color=color(lab), opacity=0.55)))
    if recon is not None:
        fig.add_trace(go.Scattergl(x=recon[:, 0], y=recon[:, 1], mode="markers", name="reconstructions E[x|z=μ]",
                                   marker=dict(size=4, color="rgba(60,60,60,0.5)", symbol="x")))
    if samples is not None:
        fig.add_trace(go.Scattergl(x=samples[:, 0], y=samples[:, 1], mode="markers", name="decoded prior samples",
                                   marker=dict(size=4, color="rgba(120,60,160,0.5)")))
    if highlight is not None and len(highlight):
        fig.add_trace(go.Scattergl(x=highlight[:, 0], y=highlight[:, 1], mode="markers", name="selected",
                                   marker=dict(size=11, color="rgba(0,0,0,0)", line=dict(width=1.8,
                                                                                          color="black"))))
    if decoded is not None:
        decoded = np.atleast_2d(decoded)
        fig.add_trace(go.Scatter(x=decoded[:, 0], y=decoded[:, 1], mode="markers+lines" if len(decoded) > 1
                                 else "markers", name="E[x|z]", marker=dict(size=14, color="crimson",
                                                                            symbol="star")))
    fig.update_layout(title=title, xaxis_title="x1", yaxis_title="x2")
    fig.update_xaxes(constrain="domain")
    fig.update_yaxes(scaleanchor="x", scaleratio=1, constrain="domain")
    style_fig(fig, height)
    return fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.12, x=0))


def traversal_points_figure(grid, dims, values, data_x=None, height: int = 440) -> go.Figure:
    """A traversal of a model on 2-D points: each dimension's decoded path through data space, one curve per row."""
    fig = go.Figure()
    if data_x is not None:
        fig.add_trace(go.Scattergl(x=data_x[:, 0], y=data_x[:, 1], mode="markers", name="test data",
                                   marker=dict(size=4, color="rgba(150,150,150,0.4)")))
    for r, dim in enumerate(dims):
        fig.add_trace(go.Scatter(x=grid[r, :, 0], y=grid[r, :, 1], mode="lines+markers", name=f"z{dim + 1}",
                                 marker=dict(size=7, color=color(r)), line=dict(color=color(r), width=2),
                                 customdata=values, hovertemplate="z%{fullData.name}=%{customdata:.2f}"))
    fig.update_layout(xaxis_title="x1", yaxis_title="x2")
    fig.update_yaxes(scaleanchor="x", scaleratio=1)
    return style_fig(fig, height)


def selected_rows(event) -> list[int]:
    """Example rows picked in the scatter (click, box or lasso), from the markers' customdata; lines are ignored."""
    try:
        points = event.selection.points
    except AttributeError:
        try:
            points = event["selection"]["points"]
        except (KeyError, TypeError):
            return []
    rows = []
    for p in points or []:
        cd = p.get("customdata") if isinstance(p, dict) else None
        if isinstance(cd, (list, tuple)):
            cd = cd[0] if cd else None
        if cd is None:
            continue
        try:
            rows.append(int(cd))
        except (TypeError, ValueError):
            continue
    return sorted(set(rows))


def update_selection(store: dict, event_rows: list) -> bool:
    """Keep the selection in store['rows'] across reruns. A chart event that differs from the last one seen
    replaces it when it picks points; an empty event (a redrawn chart) keeps it, so only 'Clear' empties it.
    Returns True when the rows changed."""
    if event_rows == store.get("event"):
        return False
    store["event"] = list(event_rows)
    if event_rows and event_rows != store.get("rows"):
        store["rows"] = list(event_rows)
        return True
    return False
