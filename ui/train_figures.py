"""Plotly figures of the Train page: the live curves, the per-dimension KL heatmap with the active units, and the
overlay of several runs. Builders only: the numbers come from vae.metrics.

The live figures are plain dicts with hand-placed subplot axes, not make_subplots/graph_objects: the live view redraws
them every second while a job trains in the same process, and building them through graph_objects costs ~5x more
Python time (and so GIL time taken from the training thread). st.plotly_chart validates the dict once.
"""
from __future__ import annotations

import numpy as np
import plotly.colors

from ui.core import PRESENT_AXIS_TITLE_PX, PRESENT_TICK_PX, presenting
from vae.metrics import epoch_curves, kl_heatmap, step_curves

TRAIN_COLOR, TEST_COLOR, EVENT_COLOR, BETA_COLOR = "#1f77b4", "#d62728", "#7f7f7f", "#2ca02c"
# inferno, spelled out, starting at pure black: 0 nats is black ("the heatmap goes dark"). Not plotly's named
# "Inferno": its first colour #000004 is one of the placeholders (#000001-#000040) that Streamlit's frontend swaps for
# theme colours, which paints 0 nats violet.
INFERNO = [[0.0, "#000000"], [0.13, "#1b0c41"], [0.25, "#4a0c6b"], [0.38, "#781c6d"], [0.5, "#a52c60"],
           [0.63, "#cf4446"], [0.75, "#ed6925"], [0.88, "#fb9b06"], [1.0, "#fcffa4"]]
KL_FLOOR = 1e-3  # nats: black on the KL heatmaps, whose colours are on a log scale (see log_kl)
MARKERS_UP_TO = 60  # epochs
LOG_FLOOR = 1e-3  # nats: KL can be exactly 0, which a log axis cannot show
CHART_CONFIG = {"displaylogo": False}


def log_kl(mat, top: float | None = None) -> tuple[np.ndarray, float, float, dict]:
    """The KL heatmaps' colour scale: log10 of KL in nats, black at KL_FLOOR (0.001 nats) and below, the brightest
    colour at `top` nats (default: the largest value, at least 1 nat). KL spans decades: on a linear scale a
    dimension with 0.5 nats looks as dark as a collapsed one next to one with 10, and one diverged epoch with
    thousands of nats blacks out the rest. Returns (z, zmin, zmax, colour-bar ticks labelled in nats); NaN stays
    NaN (no value), +inf is drawn at the top."""
    m = np.asarray(mat, dtype=float)
    finite = m[np.isfinite(m)]
    if top is None:
        top = max(1.0, float(finite.max()) if finite.size else 0.0)
    lo, hi = float(np.log10(KL_FLOOR)), float(np.log10(top))
    with np.errstate(invalid="ignore"):
        z = np.log10(np.clip(m, KL_FLOOR, None))
    z[np.isposinf(m)] = hi
    decades = [float(k) for k in range(int(np.ceil(lo)), int(np.floor(hi)) + 1)]
    if hi - (decades[-1] if decades else lo) > 0.15:
        decades.append(hi)  # the top itself, when it is not a power of ten
    ticks = dict(tickvals=decades, ticktext=[f"{10 ** v:,.0f}" if v >= 3 else f"{10 ** v:.3g}" for v in decades])
    return z, lo, hi, ticks


def _layout(height: int, **kw) -> dict:
    """Common layout; bigger type in presentation mode (as ui.core.style_fig does for graph_objects figures)."""
    big = presenting()
    layout = dict(height=int(height * (1.25 if big else 1)), font=dict(size=20 if big else 13),
                  margin=dict(l=10, r=10, t=60, b=10), legend=dict(font=dict(size=18 if big else 12)))
    layout.update(kw)
    if big:  # the axes' fonts too (as style_fig): Streamlit's Plotly theme sets them, the layout's font does not reach
        for name, axis in layout.items():
            if name.startswith(("xaxis", "yaxis")) and isinstance(axis, dict):
                axis["tickfont"] = {**axis.get("tickfont", {}), "size": PRESENT_TICK_PX}
                if isinstance(axis.get("title"), dict):
                    axis["title"] = {**axis["title"], "font": {**axis["title"].get("font", {}),
                                                               "size": PRESENT_AXIS_TITLE_PX}}
    return layout


def _title(text: str, x: float, y: float) -> dict:
    return dict(text=text, x=x, y=y, xref="paper", yref="paper", xanchor="center", yanchor="bottom",
                showarrow=False, font=dict(size=18 if presenting() else 14))


def _vline(x: float, axis: str) -> dict:
    return dict(type="line", xref=axis, yref=f"{axis.replace('x', 'y')} domain", x0=x, x1=x, y0=0, y1=1,
                line=dict(color=EVENT_COLOR, dash="dash", width=1.5))


def _epoch_mode(n: int) -> str:
    """Markers on per-epoch curves only while there are few: each is an SVG node the browser redraws every poll."""
    return "lines+markers" if n <= MARKERS_UP_TO else "lines"


def _arr(a) -> np.ndarray:
    return np.asarray(a, dtype=float)


def log_ticks(values) -> dict:
    """Tick values and labels for a log axis over these values: 1, 2, 5 times each power of ten, each labelled in
    full (Plotly's own labels the 2 and 5 as a bare "2" and "5": "2, 1, 5, 2, 0.1" read as nonsense). Over less
    than one decade, {} (Plotly's own ticks, which are then plain numbers)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return {}
    lo, hi = float(v.min()), float(v.max())
    if hi / lo < 10:
        return {}
    vals = [m * 10.0 ** k for k in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
            for m in (1, 2, 5)]
    vals = [t for t in vals if lo / 1.5 <= t <= hi * 1.5]
    if len(vals) > 10:  # many decades: the powers of ten alone
        vals = [t for t in vals if np.isclose(np.log10(t), round(np.log10(t)))]
    return dict(tickvals=vals, ticktext=[f"{t:g}" for t in vals])


def _weight_title(train_config: dict | None) -> str:
    """The fourth panel's title: β, or for capacity annealing the γ of γ·|KL − C| (the history's "beta")."""
    tc = train_config or {}
    if tc.get("beta_schedule") == "capacity":
        return f"γ: weight of |KL − C| (C ramps to {tc.get('capacity_max', 0):g} nats)"
    return "β: weight of the KL term"


def curves_figure(history: dict, steps_per_epoch: int, smoothing: float = 0.6, log_y: bool = False,
                  max_points: int = 300, train_config: dict | None = None) -> dict:
    """2x2: reconstruction NLL, KL, ELBO (train per step, smoothed; test per epoch) and beta, against epochs. Mid-run
    changes are dashed vertical lines. log_y puts the NLL and KL panels on a log axis (the ELBO is negative)."""
    sc, ec = step_curves(history, smoothing, max_points), epoch_curves(history)
    x = _arr(sc["step"] / max(1, steps_per_epoch))
    data, log_axes = [], {}
    panels = (("recon", "test_recon", "x", "y"), ("kl", "test_kl", "x2", "y2"), ("elbo", "test_elbo", "x3", "y3"))
    for i, (k, tk, xa, ya) in enumerate(panels):
        y, ty = sc[k], ec[tk]
        if log_y and k != "elbo":
            y, ty = np.maximum(y, LOG_FLOOR), np.maximum(ty, LOG_FLOOR)
            log_axes[ya] = dict(type="log", **log_ticks(np.concatenate([np.ravel(y), np.ravel(ty)])))
        data.append(dict(type="scatter", x=x, y=_arr(y), mode=_epoch_mode(len(x)), name="train (per step, smoothed)",
                         line=dict(color=TRAIN_COLOR, width=1.5), legendgroup="train", showlegend=i == 0,
                         xaxis=xa, yaxis=ya))
        data.append(dict(type="scatter", x=_arr(ec["epoch"]), y=_arr(ty), mode=_epoch_mode(len(ec["epoch"])),
                         name="test (per epoch)", line=dict(color=TEST_COLOR, width=2), marker=dict(size=5),
                         legendgroup="test", showlegend=i == 0, xaxis=xa, yaxis=ya))
    data.append(dict(type="scatter", x=x, y=_arr(sc["beta"]), mode=_epoch_mode(len(x)), name="β", showlegend=False,
                     line=dict(color=BETA_COLOR, width=2), xaxis="x4", yaxis="y4"))
    shapes, marks_x, marks_text = [], [], []
    for e in history.get("events", []):
        ex = e["step"] / max(1, steps_per_epoch)
        shapes += [_vline(ex, a) for a in ("x", "x2", "x3", "x4")]
        marks_x.append(ex)
        marks_text.append(f"step {e['step']}: {e['text']}")
    if marks_x:
        top = float(np.nanmax(sc["beta"])) if len(sc["beta"]) else 1.0
        data.append(dict(type="scatter", x=marks_x, y=[top] * len(marks_x), mode="markers", name="change",
                         marker=dict(symbol="triangle-down", size=12, color=EVENT_COLOR), hovertext=marks_text,
                         hoverinfo="text", showlegend=False, xaxis="x4", yaxis="y4"))
    left, right, top_row, bottom_row = [0, 0.46], [0.54, 1], [0.57, 0.95], [0, 0.40]
    layout = _layout(
        560, hovermode="x", uirevision="curves", shapes=shapes,
        legend=dict(orientation="h", x=0, y=1.09, font=dict(size=18 if presenting() else 12)),
        xaxis=dict(domain=left, anchor="y"), yaxis=dict(domain=top_row, anchor="x", **log_axes.get("y", {})),
        xaxis2=dict(domain=right, anchor="y2", matches="x"),
        yaxis2=dict(domain=top_row, anchor="x2", **log_axes.get("y2", {})),
        xaxis3=dict(domain=left, anchor="y3", matches="x", title=dict(text="epoch")),
        yaxis3=dict(domain=bottom_row, anchor="x3"),
        xaxis4=dict(domain=right, anchor="y4", matches="x", title=dict(text="epoch")),
        yaxis4=dict(domain=bottom_row, anchor="x4", rangemode="tozero"),
        annotations=[_title("reconstruction NLL −E_q[log p_θ(x|z)] (nats)", 0.23, 0.955),
                     _title("KL(q_φ(z|x) ‖ p(z)) (nats)", 0.77, 0.955),
                     _title("ELBO (nats, higher is better)", 0.23, 0.405),
                     _title(_weight_title(train_config), 0.77, 0.405)])
    return dict(data=data, layout=layout)


def collapse_figure(history: dict) -> dict:
    """The collapse view: test KL of every latent dimension per epoch (dark = dead) over the active units."""
    epochs, mat = kl_heatmap(history)
    ec = epoch_curves(history)
    data = []
    d = mat.shape[0] if mat.size else 0
    if d:
        # a log scale with a fixed floor and a top of at least 1 nat: a collapsed run (all KL ~ 0.001) stays dark
        # instead of the scale stretching to its noise, and one huge value does not black out the rest
        z, lo, hi, ticks = log_kl(mat)
        data.append(dict(type="heatmap", z=z, customdata=mat, x=_arr(epochs), y=list(range(1, d + 1)),
                         colorscale=INFERNO, zmin=lo, zmax=hi,
                         colorbar=dict(title=dict(text="nats (log scale)", side="right"), len=0.62, y=0.65,
                                       **ticks),
                         hovertemplate="epoch %{x}<br>dim %{y}<br>KL %{customdata:.3g} nats<extra></extra>",
                         xaxis="x", yaxis="y"))
        data.append(dict(type="scatter", x=_arr(ec["epoch"]), y=_arr(ec["active_units"]),
                         mode=_epoch_mode(len(ec["epoch"])),
                         name="active units", line=dict(color="#9467bd", width=2), showlegend=False,
                         xaxis="x2", yaxis="y2"))
    layout = _layout(
        460, uirevision="collapse",
        xaxis=dict(domain=[0, 1], anchor="y", showticklabels=False),
        yaxis=dict(domain=[0.38, 0.92], anchor="x", title=dict(text="dimension")),
        xaxis2=dict(domain=[0, 1], anchor="y2", matches="x", title=dict(text="epoch")),
        yaxis2=dict(domain=[0, 0.26], anchor="x2", range=[-0.5, d + 0.5]),
        annotations=[_title("KL per latent dimension (test): dark = collapsed", 0.5, 0.925),
                     _title("active units", 0.5, 0.265)])
    return dict(data=data, layout=layout)


def compare_figure(runs: list[tuple[str, dict, bool]], x_max: float | None = None) -> dict:
    """Overlay of runs (label, history, is_current): test ELBO, test KL and active units per epoch. x_max: the
    epoch axes end there (longer histories run off the right edge; double-click shows them whole)."""
    # 20 distinct colours (black is the run on screen's): with "select all", 8 repeated after the eighth run
    palette = [c for c in plotly.colors.qualitative.Dark24 if c.upper() != "#222A2A"]
    data = []
    for i, (label, hist, current) in enumerate(runs):
        ec = epoch_curves(hist)
        color = "#000000" if current else palette[i % len(palette)]
        for c, k in enumerate(("test_elbo", "test_kl", "active_units"), start=1):
            data.append(dict(type="scatter", x=_arr(ec["epoch"]), y=_arr(ec[k]), mode="lines", name=label,
                             legendgroup=label, showlegend=c == 1, line=dict(color=color, width=3 if current else 1.8),
                             xaxis="x" if c == 1 else f"x{c}", yaxis="y" if c == 1 else f"y{c}"))
    doms = ([0, 0.3], [0.35, 0.65], [0.7, 1])
    # the legend under the plots, below the "epoch" titles, with room for its rows (a long one covered the titles)
    rows = -(-len(runs) // 3)
    extra = 24 * max(0, rows - 1) * (1.25 if presenting() else 1)
    layout = _layout(400 + int(extra), uirevision="compare",
                     legend=dict(orientation="h", x=0, y=0, yref="container", yanchor="bottom"),
                     annotations=[_title(t, (a + b) / 2, 1.0) for t, (a, b) in
                                  zip(("test ELBO (nats)", "test KL (nats)", "active units"), doms)])
    layout["margin"] = {**layout["margin"], "b": int(70 + 24 * rows * (1.25 if presenting() else 1))}
    for c, dom in enumerate(doms, start=1):
        sfx = "" if c == 1 else str(c)
        layout[f"xaxis{sfx}"] = dict(domain=dom, anchor=f"y{sfx}", title=dict(text="epoch"),
                                     **({"range": [0, x_max]} if x_max else {}))
        layout[f"yaxis{sfx}"] = dict(domain=[0, 0.92], anchor=f"x{sfx}")
    return dict(data=data, layout=layout)


def points_figure(x: np.ndarray, recon: np.ndarray | None, samples: np.ndarray) -> dict:
    """For 2-D point data (moons): test points, their reconstructions and prior samples in data space."""
    data = [dict(type="scatter", x=_arr(x[:, 0]), y=_arr(x[:, 1]), mode="markers", name="test points x",
                 marker=dict(size=5, color="#7f7f7f", opacity=0.6))]
    if recon is not None:
        data.append(dict(type="scatter", x=_arr(recon[:, 0]), y=_arr(recon[:, 1]), mode="markers",
                         name="reconstructions", marker=dict(size=5, color=TRAIN_COLOR)))
    data.append(dict(type="scatter", x=_arr(samples[:, 0]), y=_arr(samples[:, 1]), mode="markers",
                     name="samples z ~ N(0, I)", marker=dict(size=5, color=TEST_COLOR)))
    return dict(data=data, layout=_layout(420, xaxis=dict(range=[0, 1]), yaxis=dict(range=[0, 1], scaleanchor="x")))
