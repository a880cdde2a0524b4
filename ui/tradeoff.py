"""Shared pieces of the Trade-off and Collapse lab pages: cached (R, D) points of checkpoints and runs, groups of runs
on the job registry (a sweep, a lab), and the Plotly figures. Every number comes from vae.tradeoff (tested there)."""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch

from ui.core import (SHIPPED_DIRS, USER_DIR, browser_id, claim, file_ref, file_stamp, get_dataset, get_registry,
                     owns, presenting, quoted, safe_checkpoint_path, style_fig)
from ui.train_figures import INFERNO, log_kl
from vae.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint
from vae.config import ModelConfig
from vae.jobs import ACTIVE, FAILED
from vae.model import VAE
from vae.tradeoff import (beta_line, describe_objective, frontier, iso_elbo_lines, outliers, plane_box,
                          rate_distortion, trajectory)

SOURCE_STYLE = {  # legend name -> (colour, marker symbol)
    "shipped sweep": ("#1f77b4", "circle"),
    "shipped": ("#7f7f7f", "diamond"),
    "saved": ("#2ca02c", "square"),
    "run": ("#d62728", "star"),
}


# ---- (R, D) points, cached ---------------------------------------------------------------------------------------
def _point_dict(model, train_config: dict | None, dataset: str, split: bool) -> dict:
    tc = train_config or {}
    data, err = get_dataset(dataset, "test", bool(tc.get("binarize", False)))
    if data is None:
        return {"error": err}
    return rate_distortion(model, data.x, decomposition=split).to_dict()


@st.cache_data(max_entries=256, show_spinner="computing rate and distortion ...")
def rd_for_file(path: str, stamp: tuple, split: bool = False) -> dict:
    """(R, D) and the rest of vae.tradeoff.RDPoint for a checkpoint file, keyed by path + file_stamp, with
    the file's dataset and train_config under "meta"; {"error": ...} for a file that cannot be used. split: also
    the I(x;z) / KL(q(z) || p(z)) split (slower: only for the models being inspected)."""
    try:
        ckpt = read_checkpoint(path)
        model = model_from_checkpoint(ckpt, path)
    except CheckpointError as exc:
        return {"error": str(exc)}
    dataset = ckpt.get("dataset") or "digits"
    out = _point_dict(model, ckpt.get("train_config"), dataset, split)
    out["meta"] = {"dataset": dataset, "train_config": ckpt.get("train_config") or {},
                   "decoder": model.config.decoder}
    return out


@st.cache_data(max_entries=256, show_spinner=False)
def rd_for_run(job_id: str, version: int, split: bool = False) -> dict:
    """(R, D) of a registry run's weights at weights_version `version` (an ended run's weights do not change)."""
    job = get_registry().get(job_id)
    w = job.latest_weights() if job is not None else None
    if w is None:
        return {"error": f"run {job_id} has no weights"}
    cfg, state, _ = w
    model = VAE(ModelConfig.from_dict(cfg))
    model.load_state_dict(state)
    snap = job.snapshot()
    return _point_dict(model.eval(), snap.train_config, snap.train_config.get("dataset", "digits"), split)


@st.cache_data(max_entries=16, show_spinner=False)
def rd_for_weights(key: str, _model, dataset: str, binarize: bool) -> dict:
    """The full RDPoint (with the split) of a loaded model, keyed by ui.core's Selection.key (its exact weights)."""
    return _point_dict(_model, {"binarize": binarize}, dataset, True)


def details_rd(p: "PlanePoint", sel) -> dict:
    """A point's figures with the I(x;z) / KL(q(z) || p(z)) split, for the inspected models. sel: its Selection."""
    if p.ref.startswith("file:"):
        path = safe_checkpoint_path(p.ref)
        if path.is_file():
            return rd_for_file(str(path), file_stamp(path), True)
    if p.ref.startswith("run:") and not p.live:
        job = get_registry().get(p.ref[4:])
        if job is not None:
            return rd_for_run(job.id, job.snapshot().weights_version, True)
    tc = sel.info.get("train_config") or {}
    return rd_for_weights(sel.key, sel.model, p.dataset, bool(tc.get("binarize", False)))


@dataclass
class PlanePoint:
    ref: str  # "file:<path>" or "run:<id>": what ui.core.load_selection takes
    label: str
    source: str  # a SOURCE_STYLE key
    dataset: str
    beta: float | None
    objective: str  # "β=4, free bits λ=0.5", ...
    rd: dict  # RDPoint.to_dict(), or the live figures of a running job
    live: bool = False
    state: str = ""
    group: str | None = None
    path: dict = field(default_factory=dict)  # vae.tradeoff.trajectory of a run
    decoder: str = "standard"  # "autoregressive": another model family, kept off the standard VAEs' frontier

    def __post_init__(self):
        if self.decoder != "standard" and self.decoder not in self.objective:
            self.objective += f" · {self.decoder} decoder"


def _file_points(folder: Path, source: str) -> tuple[list[PlanePoint], list[str]]:
    pts, errors = [], []
    for path in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
        rd = rd_for_file(str(path), file_stamp(path))
        if "error" in rd:
            errors.append(rd["error"])
            continue
        meta = rd["meta"]
        tc = meta["train_config"]
        src = "shipped sweep" if source == "shipped" and folder.name == "sweep" else source
        pts.append(PlanePoint(file_ref(path), path.stem, src, meta["dataset"], tc.get("beta"),
                              describe_objective(tc), rd, decoder=meta.get("decoder", "standard")))
    return pts, errors


def collect_points(include_runs: bool = True) -> tuple[list[PlanePoint], list[str]]:
    """Every model that can go on the plane: shipped checkpoints (the sweep first), saved ones, and registry runs
    (ended runs by their weights, running ones by their last finished epoch). Also one-line problems to show."""
    points, errors = [], []
    for folder in SHIPPED_DIRS[::-1]:
        p, e = _file_points(folder, "shipped")
        points += p
        errors += e
    p, e = _file_points(USER_DIR, "saved")
    points += p
    errors += e
    if include_runs:
        for job in get_registry().jobs():
            snap = job.snapshot()
            tc = snap.train_config
            path = trajectory(snap.history)
            base = dict(ref=f"run:{snap.id}", label=snap.name, source="run", dataset=tc.get("dataset", "digits"),
                        beta=tc.get("beta"), objective=describe_objective(tc), state=snap.state, group=snap.group,
                        path=path, decoder=(snap.model_config or {}).get("decoder", "standard"))
            if snap.state in ACTIVE:
                if path["epoch"]:  # a point at its last finished epoch (test split, one z sample)
                    k = len(path["epoch"]) - 1
                    rd = {"rate": path["rate"][k], "distortion": path["distortion"][k], "elbo": path["elbo"][k],
                          "active_units": path["active_units"][k] if path["active_units"] else None,
                          "latent_dim": (snap.model_config or {}).get("latent_dim")}
                    points.append(PlanePoint(rd=rd, live=True, **base))
            elif snap.state != FAILED and snap.weights_version > 0:
                rd = rd_for_run(snap.id, snap.weights_version)
                if "error" not in rd:
                    points.append(PlanePoint(rd=rd, **base))
    return points, errors


# ---- groups of runs on the registry ------------------------------------------------------------------------------
def submit_group(specs, prefix: str) -> str:
    """Submit RunSpecs as one group (a sweep or a lab); returns the group id."""
    group = f"{prefix}-{secrets.token_hex(3)}"
    reg, me = get_registry(), browser_id()
    for s in specs:
        claim(reg.submit(s.train_config, s.model_config, name=s.name, group=group, owner=me).id)
    return group


def group_jobs(group: str | None):
    return get_registry().jobs(group=group) if group else []


def group_in_url(param: str, session_key: str, what: str, accept=lambda jobs: bool(jobs), hint: str = "") -> tuple:
    """(group id, its jobs) of the group this session watches on a page (a lab, a sweep), found again from the URL's
    ?<param>= after a reload or from a shared link, and written back to the URL (a page switch clears it). A stale or
    foreign id (not "<param>-…", or one accept(jobs) refuses) is dropped with a one-line warning naming `what`
    (and what to do instead: hint)."""
    group = st.session_state.get(session_key)
    wanted = st.query_params.get(param)
    if group is None and wanted:
        if wanted.startswith(f"{param}-") and accept(group_jobs(wanted)):
            group = st.session_state[session_key] = wanted
        else:
            del st.query_params[param]
            st.warning(f"The {what} in this link ({quoted(wanted, 40)}) is not on this server{hint}.")
    jobs = group_jobs(group)
    if jobs:
        st.query_params[param] = group
    return group, jobs


def stop_group(group: str | None) -> int:
    """Stop every active job of the group that this browser controls (ui.core.owns: a lab or sweep opened from
    someone else's link is watch-only); returns how many were asked to stop."""
    n = 0
    for j in group_jobs(group):
        if j.snapshot().state in ACTIVE and owns(j):
            j.stop()
            n += 1
    return n


def group_owned(jobs) -> bool:
    """Whether this browser controls the group's runs (it submitted them; one run taken over on the Train page
    does not make the group its own)."""
    jobs = list(jobs)
    return bool(jobs) and all(owns(j) for j in jobs)


def group_progress(snaps) -> tuple[float, int, int]:
    """(overall fraction done, runs ended, runs in all) for snapshots of one group."""
    if not snaps:
        return 0.0, 0, 0
    ended = sum(1 for s in snaps if s.state not in ACTIVE)
    frac = sum(1.0 if s.state not in ACTIVE else s.progress for s in snaps) / len(snaps)
    return frac, ended, len(snaps)


def state_line(s) -> str:
    """'running · epoch 12/30', 'queued (2nd)', 'finished', 'failed: ...' for a snapshot."""
    if s.state == "queued":
        return f"queued (#{s.queue_position})" if s.queue_position else "queued"
    if s.state in ("running", "paused"):
        return f"{s.state} · epoch {s.epoch}/{s.epochs}"
    if s.state == "failed":
        return f"failed: {s.error}"
    return s.state


# ---- figures ------------------------------------------------------------------------------------------------------
def _hover(p: PlanePoint) -> str:
    rd = p.rd
    au = rd.get("active_units")
    d = rd.get("latent_dim")
    lines = [f"<b>{p.label}</b>", p.objective,
             f"ELBO {rd['elbo']:.2f} nats", f"R {rd['rate']:.2f} · D {rd['distortion']:.2f} nats",
             f"active units {au if au is not None else '–'}/{d if d is not None else '–'}"]
    if p.live:
        lines.append(f"{p.state}: last finished epoch")
    return "<br>".join(lines)


def far_flags(points: list[PlanePoint], keep=()) -> list[bool]:
    """The candidates for leaving off the zoomed plane: vae.tradeoff.outliers, but never a shipped model (the sweep
    is what a lecture shows, its β = 0.1 end included, however many similar runs crowd the middle), nor one whose
    ref is in keep (models A and B: their markers and β line stay on the plane)."""
    flags = outliers([(p.rd["rate"], p.rd["distortion"]) for p in points])
    return [f and not p.source.startswith("shipped") and p.ref not in keep for p, f in zip(points, flags)]


def plane_extent(points: list[PlanePoint], show_paths: bool = True, zoom: bool = False,
                 keep=()) -> tuple[tuple, list[bool]]:
    """(box, off): the plane's axes (vae.tradeoff.plane_box) and which points fall off them. zoom: the box fits all
    points but the far_flags candidates (and their training paths); a candidate inside that box anyway (next to a
    shipped model that stretched it) stays on, and is not reported as off."""
    cand = far_flags(points, keep) if zoom else [False] * len(points)
    fit = []
    for p, c in zip(points, cand):
        if not c:
            fit.append((p.rd["rate"], p.rd["distortion"]))
            if show_paths and p.path.get("epoch"):
                fit += list(zip(p.path["rate"], p.path["distortion"]))
    box = plane_box(fit)
    off = [c and not (box[0] <= p.rd["rate"] <= box[1] and box[2] <= p.rd["distortion"] <= box[3])
           for p, c in zip(points, cand)]
    return box, off


def plane_figure(points: list[PlanePoint], highlight: dict[str, str] | None = None, beta_for: PlanePoint | None = None,
                 show_paths: bool = True, height: int = 640, box: tuple | None = None) -> go.Figure:
    """The rate–distortion plane: points by source, iso-ELBO lines (slope -1), the empirical frontier, training
    paths of runs, and for beta_for the line of slope -β through its point. box: the axes (plane_extent's, zoomed
    past the far models where the caller wants that); by default they hold every point and path."""
    highlight = highlight or {}
    xy = [(p.rd["rate"], p.rd["distortion"]) for p in points]  # the models themselves
    if box is None:
        box = plane_extent(points, show_paths)[0]
    fig = go.Figure()
    for elbo, ((r0, d0), (r1, d1)) in iso_elbo_lines(box):
        fig.add_trace(go.Scatter(x=[r0, r1], y=[d0, d1], mode="lines", line=dict(color="#bbb", width=1, dash="dot"),
                                 hoverinfo="skip", showlegend=False))
        near_right = r0 > box[0] + 0.8 * (box[1] - box[0])  # a label starting there was cut at the plane's edge
        fig.add_annotation(x=r0, y=d0, text=f"ELBO {elbo + 0.0:g}", showarrow=False,
                           xanchor="right" if near_right else "left", yanchor="top",
                           font=dict(color="#888", size=16 if presenting() else 12), textangle=0)
    # the frontier of the standard decoders: an autoregressive decoder is another model family (its D for a given R
    # is lower), which would pull the line away from the β-VAEs it explains
    std = [xy[i] for i, p in enumerate(points) if p.decoder == "standard"]
    hull = frontier(std)
    if len(hull) >= 2:
        fig.add_trace(go.Scatter(x=[std[i][0] for i in hull], y=[std[i][1] for i in hull], mode="lines",
                                 line=dict(color="#444", width=2), hoverinfo="skip",
                                 name="frontier (these models)" if len(std) == len(xy) else
                                 "frontier (these models, standard decoder)"))
    if beta_for is not None and beta_for.beta:
        seg = beta_line((beta_for.rd["rate"], beta_for.rd["distortion"]), beta_for.beta, box)
        if seg is not None:
            (r0, d0), (r1, d1) = seg
            fig.add_trace(go.Scatter(x=[r0, r1], y=[d0, d1], mode="lines", hoverinfo="skip",
                                     line=dict(color="#ff7f0e", width=2, dash="dash"),
                                     name=f"slope −β = −{beta_for.beta:g} through {beta_for.label}"))
    if show_paths:
        for p in points:
            t = p.path
            if p.source == "run" and len(t.get("epoch", [])) >= 2:
                fig.add_trace(go.Scatter(
                    x=t["rate"], y=t["distortion"], mode="lines+markers", showlegend=False,
                    line=dict(color=SOURCE_STYLE["run"][0], width=1.5 if p.live else 1),
                    opacity=0.9 if p.live else 0.35, marker=dict(size=4),
                    hovertemplate=f"{p.label}<br>epoch %{{text}}<br>R %{{x:.2f}} · D %{{y:.2f}}<extra></extra>",
                    text=[str(e) for e in t["epoch"]]))
    texts = _labels(points)
    where = text_positions(points, texts, box, height, font_px=16 if presenting() else 12)
    for source, (color, symbol) in SOURCE_STYLE.items():
        group = [p for p in points if p.source == source]
        if not group:
            continue
        fig.add_trace(go.Scatter(
            x=[p.rd["rate"] for p in group], y=[p.rd["distortion"] for p in group], mode="markers+text",
            name=source, text=[texts[p.ref] for p in group], textposition=[where[p.ref] for p in group],
            customdata=[p.ref for p in group], hovertext=[_hover(p) for p in group], hoverinfo="text",
            marker=dict(color=color, symbol=symbol, size=[18 if p.ref in highlight else 12 for p in group],
                        line=dict(color=["#000" if p.ref in highlight else "#fff" for p in group], width=2))))
    for ref, tag in highlight.items():
        p = next((q for q in points if q.ref == ref), None)
        if p is not None:
            # down-left of the ring: across the frontier and the iso-ELBO lines (they fall to the right), and
            # away from the point's own text (above-right); up-left it sat on the frontier
            fig.add_annotation(x=p.rd["rate"], y=p.rd["distortion"], text=f"<b>{tag}</b>", showarrow=True,
                               arrowhead=2, ax=-30, ay=30, font=dict(size=14))
    fig.update_xaxes(title="rate R = E KL(q(z|x) ‖ p(z))  [nats]", range=[box[0], box[1]], zeroline=True)
    fig.update_yaxes(title="distortion D = E[−log p(x|z)]  [nats]", range=[box[2], box[3]])
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0), hovermode="closest",
                      clickmode="event+select", dragmode="pan")
    return style_fig(fig, height)


TEXT_SIDES = ("top right", "bottom right", "top left", "bottom left")


def text_positions(points: list[PlanePoint], texts: dict[str, str], box, height: int, width: int = 700,
                   font_px: int = 12) -> dict[str, str]:
    """ref -> the side of its marker its text goes on: greedily, the side whose text box overlaps the markers and
    the texts placed so far the least (a sweep run lands next to the shipped model of its β, and with every text
    above-right theirs printed over each other: "β=4, 8" over "β=2"). In pixels of a plot about width x (height -
    160) (the legend and axes take the rest); a run's text goes below its star when nothing is in the way."""
    w_px, h_px = width, max(200, height - 160)
    sx, sy = w_px / max(box[1] - box[0], 1e-9), h_px / max(box[3] - box[2], 1e-9)
    xy = {p.ref: ((p.rd["rate"] - box[0]) * sx, (p.rd["distortion"] - box[2]) * sy) for p in points}
    taken = [(x - 8, y - 8, x + 8, y + 8) for x, y in xy.values()]  # the markers

    def overlap(a, b):
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    out = {}
    rank = {"shipped sweep": 0, "shipped": 1, "saved": 2, "run": 3}  # the shipped sweep's texts first
    for p in sorted(points, key=lambda q: rank.get(q.source, 4)):
        text = texts.get(p.ref, "")
        prefer = ("bottom right", "top right", "bottom left", "top left") if p.source == "run" else TEXT_SIDES
        if not text:
            out[p.ref] = prefer[0]
            continue
        (x, y), tw, th = xy[p.ref], 0.6 * font_px * len(text) + 4, font_px + 4
        best = None
        for i, side in enumerate(prefer):
            x0 = x + 7 if side.endswith("right") else x - 7 - tw
            y0 = y + 5 if side.startswith("top") else y - 5 - th
            rect = (x0, y0, x0 + tw, y0 + th)
            cost = sum(overlap(rect, t) for t in taken)
            if best is None or cost < best[0] - 1e-9:
                best = (cost, side, rect)
        out[p.ref] = best[1]
        taken.append(best[2])
    return out


def _labels(points: list[PlanePoint]) -> dict[str, str]:
    """ref -> the text drawn next to its point; points that sit on top of each other, from any source, share one
    text ("β=4, 8"), each β in it once: a run that repeats a shipped β on the same seed lands on the shipped point,
    and two labels there would print over each other."""
    out, seen = {}, {}
    for p in points:
        text = _short(p)
        out[p.ref] = text
        if not text:
            continue
        spot = (round(p.rd["rate"] / 0.1), round(p.rd["distortion"] / 0.1))
        if spot in seen:
            first = seen[spot]
            value = text.removeprefix("β=")
            if value not in out[first].removeprefix("β=").split(", "):
                out[first] += ", " + value
            out[p.ref] = ""
        else:
            seen[spot] = p.ref
    return out


def _short(p: PlanePoint) -> str:
    """The text next to a point: β for the sweeps, nothing for the other models (hover shows them)."""
    if p.source == "shipped sweep" and p.beta is not None:
        return f"β={p.beta:g}"
    if p.source == "run" and p.label.startswith("sweep ") and p.beta is not None:
        return f"β={p.beta:g}"
    return ""


def kl_bars_figure(kl_per_dim, title: str = "", height: int = 260) -> go.Figure:
    """Per-dimension KL (nats), sorted as the model has them; near 0: a collapsed dimension."""
    kl = np.asarray(kl_per_dim, dtype=float)
    fig = go.Figure(go.Bar(x=[f"z{i + 1}" for i in range(len(kl))], y=kl,
                           marker_color=["#1f77b4" if v > 0.05 else "#ccc" for v in kl],
                           hovertemplate="%{x}: %{y:.3f} nats<extra></extra>"))
    top = max(0.5, float(kl.max()) if kl.size else 0.0) * 1.08  # collapsed dims (~1e-5 nats) stay flat
    fig.update_layout(title=title or "KL per latent dimension", yaxis=dict(title="nats", range=[0, top]), bargap=0.15)
    return style_fig(fig, height)


def split_figure(rd: dict, height: int = 230) -> go.Figure:
    """The rate as I_q(n; z) + KL(q(z) ‖ p(z)) (ELBO surgery), one stacked bar."""
    mi, mk = max(0.0, rd.get("mutual_info") or 0.0), rd.get("marginal_kl") or 0.0
    fig = go.Figure([
        go.Bar(y=["rate"], x=[mi], orientation="h", name="I(x;z): information", marker_color="#1f77b4",
               hovertemplate="I(x;z) %{x:.2f} nats<extra></extra>"),
        go.Bar(y=["rate"], x=[max(0.0, mk)], orientation="h", name="KL(q(z)‖p(z)): mismatch",
               marker_color="#ff7f0e", hovertemplate="KL(q(z)‖p(z)) %{x:.2f} nats<extra></extra>")])
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=-0.6),
                      xaxis=dict(title="nats", range=[0, max(1.0, mi + max(0.0, mk)) * 1.05]),
                      title=f"rate {rd['rate']:.2f} nats =<br>I(x;z) {mi:.2f} + KL(q(z)‖p(z)) {mk:.2f}")
    return style_fig(fig, height)


def heatmap_figure(heat: np.ndarray, title: str, zmax: float = 1.0, height: int = 240,
                   show_scale: bool = False, fixed_margins: bool = False) -> go.Figure:
    """Per-dimension KL over training: rows = latent dims, columns = epochs; dark = collapsed (the Train page's
    colours). fixed_margins: the same margins whatever the data, so that a row of these lines up (their colour scale
    then goes in kl_scale_figure: a colour bar beside the last one took its width, and covered its last epochs in
    presentation mode)."""
    d, e = heat.shape if heat.size else (0, 0)
    z, lo, hi, ticks = log_kl(heat, top=zmax)  # the Train page's log scale, with this row's common top
    ticks = _top_marked(ticks, hi, zmax)
    fig = go.Figure(go.Heatmap(z=z, customdata=heat, x=list(range(1, e + 1)), y=list(range(1, d + 1)),
                               colorscale=INFERNO, zmin=lo, zmax=hi, showscale=show_scale,
                               colorbar=dict(title=dict(text="nats", side="top"), thickness=8, **ticks),
                               hovertemplate="epoch %{x}, z%{y}: %{customdata:.3g} nats<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="epoch",
                      yaxis=dict(title="dim", tickvals=[1, d] if d > 1 else [1], ticks=""))
    style_fig(fig, height)
    if not title:
        fig.update_layout(margin=dict(t=6, b=6))
    if fixed_margins:
        # fixed margins all round (autoexpand off: tick labels of another width would otherwise shift one plot)
        big = presenting()  # its larger tick and axis fonts need more room
        fig.update_layout(margin=dict(l=52 if big else 40, r=8, t=14 if not title else 50, b=62 if big else 44,
                                      autoexpand=False),
                          xaxis=dict(title=dict(text="epoch", standoff=2)))
    return fig


def _top_marked(ticks: dict, hi: float, zmax: float) -> dict:
    """The colour scale's top marked "≥ zmax": values above it are drawn there."""
    ticks = {k: list(v) for k, v in ticks.items()}
    if ticks["tickvals"] and ticks["tickvals"][-1] == hi:
        ticks["ticktext"][-1] = f"≥{zmax:g}"
    else:
        ticks["tickvals"].append(hi)
        ticks["ticktext"].append(f"≥{zmax:g}")
    return ticks


def kl_scale_figure(zmax: float = 1.0, height: int = 64) -> go.Figure:
    """The colour scale of a row of heatmap_figure(..., zmax) as a strip of its own: KL per dimension in nats, log
    scale, black (0.001 nats or less: collapsed) to bright (zmax or more)."""
    _, lo, hi, ticks = log_kl(np.array([[zmax]]), top=zmax)
    ticks = _top_marked(ticks, hi, zmax)
    v = np.linspace(lo, hi, 200)
    fig = go.Figure(go.Heatmap(z=[v], x=v, y=[0], colorscale=INFERNO, zmin=lo, zmax=hi, showscale=False,
                               hoverinfo="skip"))
    fig.update_layout(xaxis=dict(title="KL of a dimension (nats, log scale)", **ticks),
                      yaxis=dict(visible=False))
    style_fig(fig, height)
    big = presenting()
    # below the strip: its tick labels and title; at the sides, room for the end labels (centred on the ends)
    fig.update_layout(margin=dict(l=30, r=30, t=2, b=70 if big else 52))
    return fig


def au_curves_figure(curves: list[tuple[str, list, list]], latent_dim: int | None, height: int = 300) -> go.Figure:
    """Active units over training, one line per run: [(name, epochs, active units), ...]."""
    fig = go.Figure()
    for name, epochs, au in curves:
        fig.add_trace(go.Scatter(x=epochs, y=au, mode="lines+markers", name=name, marker=dict(size=4)))
    fig.update_layout(xaxis_title="epoch", yaxis=dict(title="active units", range=[-0.5, (latent_dim or 16) + 0.5]),
                      legend=dict(orientation="h", x=0, y=-0.3, yanchor="top"))  # below: the plot keeps the width
    return style_fig(fig, height)


@st.cache_data(max_entries=64, show_spinner=False)
def run_images(job_id: str, version: int, x: np.ndarray):
    """Reconstructions of x by a run's weights at weights_version `version` (cached per version), or None."""
    job = get_registry().get(job_id)
    w = job.latest_weights() if job is not None else None
    if w is None:
        return None
    cfg, state, _ = w
    model = VAE(ModelConfig.from_dict(cfg))
    model.load_state_dict(state)
    return model.eval().reconstruct(torch.as_tensor(x)).cpu().numpy()
