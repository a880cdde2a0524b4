"""Plotly figures for the ELBO anatomy page. They only draw what vae.anatomy computed; every value is in nats."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ui.core import presenting, style_fig
from vae.anatomy import Anatomy, PosteriorPicture, ellipse

BLUE, ORANGE, GREEN, RED, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#7f7f7f"


def _n(value: float) -> str:
    """Two decimals with a true minus sign (as the −KL label has), not a hyphen."""
    return f"{value:.2f}".replace("-", "−")


def _pm(value: float, se: float | None = None, sep: str = " ") -> str:
    if se is None or not np.isfinite(se):
        return _n(value)
    return f"{_n(value)}{sep}± {se:.2f}"


def headline_decimals(elbo: float, log_px: float, gap: float, most: int = 4) -> int:
    """The fewest decimals, from 2, at which the rounded ELBO + the rounded gap is the rounded log p(x), so that the
    three numbers shown side by side add up on screen (-27.30 + 0.02 read as -27.29 at two decimals)."""
    for d in range(2, most + 1):
        if round(round(elbo, d) + round(gap, d), d) == round(log_px, d):
            return d
    return most


def decomposition_fig(a: Anatomy, height: int = 440):
    """Stacked (waterfall) bars: E_q[log p(x|z)] - KL = ELBO, then ELBO + gap = log p(x); the right panel zooms onto
    the last step, where the gap sits on top of the ELBO."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.1,
                        subplot_titles=("all terms", "zoom: log p(x) = ELBO + gap"))
    style = dict(increasing=dict(marker=dict(color=GREEN)), decreasing=dict(marker=dict(color=ORANGE)),
                 totals=dict(marker=dict(color=BLUE)), connector=dict(line=dict(color=GREY, dash="dot")),
                 textposition="outside", cliponaxis=False, constraintext="none")
    fig.add_trace(go.Waterfall(
        measure=["relative", "relative", "total", "relative", "total"],
        x=["E_q[log p(x|z)]", "−KL(q‖p(z))", "ELBO", "+gap", "log p(x)"],
        y=[a.expected_log_lik, -a.kl, 0.0, a.gap, 0.0],
        text=[_n(a.expected_log_lik), f"−{a.kl:.2f}", _n(a.elbo), f"+{a.gap:.2f}", _n(a.log_px)],
        **style), 1, 1)
    fig.add_trace(go.Waterfall(
        measure=["absolute", "relative", "total"], x=["ELBO", "+gap", "log p(x)"], y=[a.elbo, a.gap, 0.0],
        base=0, text=[_pm(a.elbo, a.elbo_se, "<br>"), "+" + _pm(a.gap, a.gap_se, "<br>"),
                      _pm(a.log_px, a.log_px_se, "<br>")],
        **style), 1, 2)
    levels = [0.0, a.expected_log_lik, a.elbo, a.log_px]  # every bar end (negative for images, any sign for points)
    lo, hi = min(levels), max(levels)
    pad = 0.12 * max(hi - lo, 1e-3)
    fig.update_yaxes(title_text="nats per example", range=[lo - pad, hi + pad], row=1, col=1)
    top, bottom = max(a.elbo, a.log_px), min(a.elbo, a.log_px)
    pad = max(abs(a.gap), 3 * max(a.gap_se, a.elbo_se), 0.3)
    fig.update_yaxes(range=[bottom - 1.2 * pad, top + 0.8 * pad], row=1, col=2)
    fig.update_layout(showlegend=False, title="log p(x) = E_q[log p(x|z)] − KL(q‖p(z)) + gap  (nats)")
    style_fig(fig, height)
    # room between the figure's title and the panels' own titles (they touched, in presentation mode the most)
    return fig.update_layout(margin=dict(t=110 if presenting() else 85), title=dict(y=0.98, yanchor="top"))


def iwae_fig(a: Anatomy, draws=None, grid_log_px: float | None = None, height: int = 420):
    """L_K against K on a log axis: one nested draw with its ±1 SE band and, given draws, the mean of several
    draws, drawn boldest: the mean shows the bound rising with K, where one draw can start above log p(x) and fall,
    which on a projector reads as the bound broken."""
    ks, curve, se = a.ks, a.iwae, np.nan_to_num(a.iwae_se, nan=0.0)
    fig = go.Figure()
    faint = draws is not None
    fig.add_trace(go.Scatter(x=np.concatenate([ks, ks[::-1]]), y=np.concatenate([curve + se, (curve - se)[::-1]]),
                             fill="toself", fillcolor=f"rgba(31,119,180,{0.10 if faint else 0.18})",
                             line=dict(width=0), hoverinfo="skip", name="±1 SE (this draw)"))
    fig.add_trace(go.Scatter(x=ks, y=curve, mode="lines+markers", line=dict(color=BLUE, width=1.5 if faint else 3),
                             marker=dict(size=3 if faint else 5), opacity=0.7 if faint else 1.0,
                             name="L_K, one nested draw" + (" (noisy)" if faint else "")))
    if draws is not None:
        dks, curves = draws
        mean = curves.mean(0)
        dse = curves.std(0, ddof=1) / np.sqrt(curves.shape[0]) if curves.shape[0] > 1 else np.zeros_like(mean)
        for j, c in enumerate(curves):
            fig.add_trace(go.Scatter(x=dks, y=c, mode="lines", line=dict(color=GREY, width=1), opacity=0.5,
                                     name="each draw", legendgroup="draws", showlegend=j == 0, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=dks, y=mean, mode="lines+markers", line=dict(color=ORANGE, width=4),
                                 marker=dict(size=6), error_y=dict(type="data", array=dse, visible=True, thickness=1),
                                 name=f"L_K: mean of {curves.shape[0]} draws ±1 SE"))
    box = dict(annotation_bgcolor="rgba(255, 255, 255, 0.85)")  # readable where a label sits over the curves
    fig.add_hline(y=a.elbo, line=dict(color=GREEN, dash="dot"),
                  annotation_text=f"ELBO (S={a.samples}) {_n(a.elbo)}", annotation_position="bottom right", **box)
    fig.add_hline(y=a.log_px, line=dict(color=BLUE, dash="dash"),
                  annotation_text=f"log p(x), IS K={a.k}: {_n(a.log_px)}", annotation_position="top left", **box)
    if grid_log_px is not None:
        fig.add_hline(y=grid_log_px, line=dict(color=RED, dash="dash"),
                      annotation_text=f"log p(x), grid: {_n(grid_log_px)}", annotation_position="top right", **box)
    lines = [a.elbo, a.log_px, *curve] + ([grid_log_px] if grid_log_px is not None else [])
    if draws is not None:
        lines += list(draws[1].mean(0))
    lo, hi = min(lines), max(lines)
    span = max(hi - lo, 0.2)
    fig.update_yaxes(range=[lo - 0.25 * span, hi + 0.25 * span])
    fig.update_layout(title="L_K rises on average from the ELBO (K = 1) to log p(x)",
                      xaxis=dict(type="log", title="K (importance samples)"), yaxis_title="nats",
                      legend=dict(orientation="h", y=-0.25))
    return style_fig(fig, height)


def posterior_fig(pp: PosteriorPicture, log_scale: bool = False, height: int = 600):
    """The true posterior p(z|x) as a heatmap (density, or log density over 8 nats below the peak), the encoder's
    q(z|x) as its 1σ and 2σ ellipses."""
    if log_scale:
        with np.errstate(divide="ignore"):
            z = np.log(pp.density)
        z = np.maximum(z, z.max() - 8.0)
        title, hover = "log p(z|x)", "log density %{z:.2f}"
    else:
        z, title, hover = pp.density, "p(z|x)", "density %{z:.3g}"
    fig = go.Figure(go.Heatmap(x=pp.z1, y=pp.z2, z=z, colorscale="Viridis", colorbar=dict(title=title),
                               hovertemplate="z1 %{x:.2f}<br>z2 %{y:.2f}<br>" + hover + "<extra></extra>"))
    for k, dash in ((1, "solid"), (2, "dash")):
        e1, e2 = ellipse(pp.mu, pp.sigma, k)
        fig.add_trace(go.Scatter(x=e1, y=e2, mode="lines", line=dict(color="white", width=3, dash=dash),
                                 name=f"q_φ(z|x): {k}σ"))
    fig.add_trace(go.Scatter(x=[pp.mu[0]], y=[pp.mu[1]], mode="markers", name="q's mean μ",
                             marker=dict(color="white", size=11, symbol="x")))
    fig.add_trace(go.Scatter(x=[pp.post_mean[0]], y=[pp.post_mean[1]], mode="markers", name="posterior mean",
                             marker=dict(color=RED, size=11, symbol="circle-open", line=dict(width=3))))
    fig.update_layout(title="p_θ(z|x) (heatmap) and q_φ(z|x) (ellipses)",
                      xaxis=dict(title="z1", range=[pp.z1[0], pp.z1[-1]]),
                      yaxis=dict(title="z2", range=[pp.z2[0], pp.z2[-1]], scaleanchor="x", scaleratio=1),
                      legend=dict(orientation="h", y=-0.2))
    style_fig(fig, height)
    fig.update_layout(legend=dict(bgcolor="rgba(60,60,60,0.9)", font=dict(color="white")))  # white lines show
    return fig


def history_fig(hist: dict, current: dict | None = None, height: int = 400):
    """ELBO per epoch from the history; log p(x) only for the current weights (a single point)."""
    fig = go.Figure()
    if "train_elbo" in hist:
        fig.add_trace(go.Scatter(x=hist["epoch"], y=hist["train_elbo"], mode="lines", name="train ELBO",
                                 line=dict(color=GREY)))
    if "test_elbo" in hist:
        fig.add_trace(go.Scatter(x=hist["epoch"], y=hist["test_elbo"], mode="lines", name="test ELBO",
                                 line=dict(color=GREEN, width=3)))
    if current is not None:
        e = hist["epoch"][-1]
        fig.add_trace(go.Scatter(x=[e], y=[current["log_px"]], mode="markers", name=current["label_log_px"],
                                 marker=dict(color=BLUE, size=14, symbol="diamond"),
                                 error_y=dict(type="data", array=[2 * current["log_px_se"]], visible=True)))
        fig.add_trace(go.Scatter(x=[e], y=[current["elbo"]], mode="markers", name=current["label_elbo"],
                                 marker=dict(color=GREEN, size=12, symbol="circle")))
    fig.update_layout(title="ELBO per epoch (log p(x) only for the current weights)", xaxis_title="epoch",
                      yaxis_title="nats per example", legend=dict(orientation="h", y=-0.25))
    return style_fig(fig, height)
