"""Trade-off: every model as a point on the rate–distortion plane (Alemi et al. 2018), a β sweep run through the job
registry, live training paths, and per-model details (reconstructions, samples, per-dimension KL, active units, the
split of the rate into I(x;z) and KL(q(z) ‖ p(z))), side by side for two models."""
import streamlit as st

from ui.core import DEFAULT_MODEL, check_range, current, get_dataset, load_selection, recon_and_samples, tile
from ui.tradeoff import (collect_points, details_rd, group_in_url, group_jobs, group_owned, group_progress,
                         kl_bars_figure, plane_extent, plane_figure, split_figure, state_line, stop_group,
                         submit_group)
from vae.jobs import ACTIVE
from vae.tradeoff import SHORT_TRAIN, SWEEP_SCHEDULES, repeated_betas, sweep_specs

DEFAULT_A = "file:checkpoints/sweep/digits-beta-1.pt"
NONE = "(none)"
POLL_S = 1.5

st.title("Trade-off: rate against distortion")

points, problems = collect_points()
# Model A follows the sidebar's model when that is on the plane: on a first visit (unless the URL names an A, or the
# sidebar shows the app's default model: A is then the sweep's β = 1), and whenever the sidebar's pick changes
side = current().ref
side_point = next((p for p in points if p.ref == side), None)
first_visit = "_rd_side" not in st.session_state
side_changed = not first_visit and st.session_state["_rd_side"] != side
st.session_state["_rd_side"] = side
if side_point is not None and (side_changed or (first_visit and side != DEFAULT_MODEL and "rd_a" not in st.query_params
                                                 and "rd_a" not in st.session_state)):
    st.session_state["rd_data"] = side_point.dataset
    st.session_state["_pending_rd_a"] = side
datasets = sorted({p.dataset for p in points}, key=lambda d: (d != "digits", d)) or ["digits"]
if st.session_state.get("rd_data") not in datasets:
    st.session_state["rd_data"] = datasets[0]
dataset = st.session_state["rd_data"]
on_plane = [p for p in points if p.dataset == dataset]
by_ref = {p.ref: p for p in on_plane}


def _labels() -> dict[str, str]:
    """ref -> the pickers' text, one of a kind: the URL keeps that text (bind="query-params"), so a saved checkpoint
    named as a shipped one ("digits-z2") must not read the same, or the shipped one could not be picked."""
    out, seen = {}, {}
    for ref, p in by_ref.items():
        text = f"{p.label} ({p.objective})"
        if sum(q.label == p.label and q.objective == p.objective for q in by_ref.values()) > 1:
            text = f"{p.source}: {text}"
        seen[text] = seen.get(text, 0) + 1
        out[ref] = text if seen[text] == 1 else f"{text} #{seen[text]}"
    return out


LABELS = _labels()


def _label(ref: str) -> str:
    return LABELS.get(ref, ref)


# Which models are "A" (and "B" to compare): chosen below, or by clicking a point on the plane.
for key, default in (("rd_a", DEFAULT_A if DEFAULT_A in by_ref else next(iter(by_ref), NONE)), ("rd_b", NONE)):
    pending = st.session_state.pop(f"_pending_{key}", None)
    if pending is not None:
        st.session_state[key] = pending
    wanted = st.session_state.get(key) or st.query_params.get(key)
    st.session_state[key] = wanted if (wanted in by_ref or wanted == NONE) else default

sweep_group, sweep_jobs = group_in_url("sweep", "rd_sweep", "β sweep")  # found again from ?sweep= after a reload
live = any(p.live for p in on_plane) or any(j.snapshot().state in ACTIVE for j in sweep_jobs)

left, right = st.container(key="stack_rd").columns([2.3, 1], gap="large")  # stacked where narrow (ui.core BASE_CSS)


def plane_section():
    """The plane and the sweep's progress; polled while anything trains, so points appear as runs finish."""
    pts, _ = collect_points()
    pts = [p for p in pts if p.dataset == dataset]
    a, b = by_ref.get(st.session_state.get("rd_a")), by_ref.get(st.session_state.get("rd_b"))
    highlight = {p.ref: tag for p, tag in ((a, "A"), (b, "B")) if p is not None}
    a_now = next((p for p in pts if a is not None and p.ref == a.ref), None)
    paths = st.session_state.get("rd_paths", False)
    box, off = plane_extent(pts, paths, zoom=True, keep=highlight)
    far = [p for p, f in zip(pts, off) if f]
    zoom = bool(far) and st.session_state.get("rd_zoom", True)
    fig = plane_figure(pts, highlight, beta_for=a_now, show_paths=paths, box=box if zoom else None)
    event = st.plotly_chart(fig, on_select="rerun", selection_mode="points", key="rd_plane",
                            config={"scrollZoom": False})
    if far:  # here, not below the fragment: a model can become far while a sweep runs
        st.toggle("Zoom past outliers", value=True, key="rd_zoom",
                  help="Fit the axes to the bulk of the models; the far ones are listed under the plane")
    if far and zoom:
        st.caption(f"Off the axes, far from the other models ({len(far)}): "
                   + "; ".join(f"{p.label} (R {p.rd['rate']:.1f}, D {p.rd['distortion']:.1f} nats)" for p in far[:4])
                   + (" …" if len(far) > 4 else "") + ". Switch “Zoom past outliers” off to see them.")
    clicked = [pt.get("customdata") for pt in (event.selection.points if event else []) if pt.get("customdata")]
    if clicked and clicked[0] != st.session_state.get("_rd_last_click"):
        st.session_state["_rd_last_click"] = clicked[0]
        if clicked[0] in [p.ref for p in pts]:
            st.session_state["_pending_rd_a"] = clicked[0]
            st.rerun(scope="app")
    sweep_jobs = group_jobs(sweep_group)
    snaps = [j.snapshot() for j in sweep_jobs]
    if snaps:
        frac, ended, total = group_progress(snaps)
        c1, c2 = st.columns([4, 1])
        c1.progress(frac, text=f"β sweep: {ended}/{total} runs ended")
        active = [s for s in snaps if s.state in ACTIVE]
        mine = group_owned(sweep_jobs)  # a sweep opened from someone else's link is watch-only
        if active and c2.button("Cancel sweep", key="rd_cancel", icon=":material/stop:", width="stretch",
                                disabled=not mine, help=None if mine else "This sweep was started in another "
                                "browser session: it is watch-only here, and its runs end by themselves"):
            stop_group(sweep_group)
            st.rerun(scope="app")
        st.caption(" · ".join(f"{s.name}: {state_line(s)}" for s in snaps))
        errors = [f"{s.name}: {s.error}" for s in snaps if s.state == "failed"]
        if errors:
            st.error(errors[0])
    still_live = any(p.live for p in pts) or any(s.state in ACTIVE for s in snaps)
    if st.session_state.get("_rd_live") and not still_live:  # the last run just ended: redraw everything once
        st.session_state["_rd_live"] = False
        st.rerun(scope="app")
    st.session_state["_rd_live"] = still_live


with left:
    if not on_plane:
        st.info("No models on this data set yet: run a β sweep (right) or train one on the Train page.")
    st.fragment(plane_section, run_every=POLL_S if live else None)()
    st.toggle("Show training paths of runs (R, D per epoch)", value=False, key="rd_paths",
              help="Each run's (R, D) at every epoch, as a line: how training moves a model across the plane")
    st.caption("Click a legend entry to hide or show its models (double-click one: only those).")

with right:
    if len(datasets) > 1:
        st.selectbox("Data set of the plane", datasets, key="rd_data",
                     help="Rates and distortions are only comparable on the same data")
    st.markdown(
        "**Reading the plane.** Each model is a point: its **rate** $R$ (x axis), the mean KL to the prior, an upper "
        "bound on the nats its code carries about x, against its **distortion** $D$ (y axis), the nats the "
        "decoder $p_\\theta$ still needs to describe x. "
        "Since $-\\text{ELBO} = D + R$, the dotted lines of slope $-1$ join models with **equal ELBO**: along one, "
        "rate is traded for distortion at no cost in ELBO.\n\n"
        "A **β-VAE** minimises $D + \\beta R$, so among the models it can reach it picks the point where the "
        "frontier's slope is $-\\beta$: the dashed line through model A touches the frontier there. High β slides "
        "left (low rate, blurry reconstructions), low β right (high rate, sharp ones). With $H$ the data entropy, "
        "$H - D \\le I(x;z) \\le R$ (Alemi et al. 2018).")
    st.caption("Test split; D averages 4 draws of z per image. A running job is drawn at its last finished epoch, "
               "its path as a line. Click a point to make it model A.")
    with st.form("rd_sweep_form", border=True, enter_to_submit=False):  # a sweep is costly: only its button starts it
        st.markdown("**Run a β sweep** (one short run per β, same seed, through the job queue)")
        betas_text = st.text_input("β values", "0.1, 0.5, 1, 2, 4, 8", key="rd_betas",
                                   help="Comma-separated, up to 12 values ≥ 0")
        c1, c2 = st.columns(2)
        # any number typed reaches the server, which names one out of range on Start (ui.core.check_range)
        free_bits = c1.number_input("free bits λ (nats)", value=0.0, step=0.1, key="rd_lambda",
                                    help="0 = off, up to 5; a floor on each dimension's batch KL (Kingma et al. 2016)")
        schedule = c2.selectbox("β schedule", SWEEP_SCHEDULES, key="rd_schedule",
                                help="Warm-up schedules ramp β over the first 2/3 of the run")
        c3, c4 = st.columns(2)
        epochs = c3.number_input("epochs", value=SHORT_TRAIN["epochs"], step=1, key="rd_epochs", help="1 to 500")
        seed = c4.number_input("seed", value=0, step=1, key="rd_seed")
        start = st.form_submit_button("Start sweep", icon=":material/play_arrow:", type="primary", width="stretch")
    if start:
        if group_owned(sweep_jobs) and any(j.snapshot().state in ACTIVE for j in sweep_jobs):
            st.warning("A sweep is still running: wait for it or cancel it first.")  # (one watched: its own goes on)
        else:
            try:
                check_range("free bits λ (nats)", free_bits, 0.0, 5.0)
                check_range("epochs", epochs, 1, 500)
                check_range("seed", seed, 0, 2**31 - 1)
                specs = sweep_specs(betas_text, dataset=dataset, free_bits=float(free_bits), schedule=schedule,
                                    epochs=int(epochs), seed=int(seed))
            except ValueError as exc:
                st.error(str(exc))
            else:
                st.session_state["rd_sweep"] = st.query_params["sweep"] = submit_group(specs, "sweep")
                again = repeated_betas(betas_text)
                if again:
                    st.session_state["_rd_note"] = (f"β = {', '.join(f'{b:g}' for b in again)} given more than once: "
                                                    f"each β runs once ({len(specs)} runs)")
                st.rerun()
    if st.session_state.get("_rd_note"):
        st.info(st.session_state.pop("_rd_note"))

for msg in problems[:3]:
    st.warning(msg)

# ---- per-model details -------------------------------------------------------------------------------------------
st.subheader("Inspect and compare")
refs = list(by_ref)
c1, c2 = st.columns(2)
c1.selectbox("Model A", refs or [NONE], format_func=_label, key="rd_a", bind="query-params",
             help="The model the dashed β line goes through. It starts at the shipped sweep's β = 1 model, or at the "
                  "sidebar's model when you picked one that is on the plane, and follows the sidebar; a click on a "
                  "point makes that model A")
c2.selectbox("Compare with model B", [NONE, *refs], format_func=lambda r: NONE if r == NONE else _label(r),
             key="rd_b", bind="query-params")
chosen = [r for r in (st.session_state.get("rd_a"), st.session_state.get("rd_b")) if r in by_ref]
device = current().device
if not chosen:
    st.info("Pick a model above, or click a point on the plane.")
cols = st.columns(len(chosen)) if chosen else []
for col, ref, tag in zip(cols, chosen, ("A", "B")):
    p = by_ref[ref]
    rd = p.rd
    with col:
        st.markdown(f"#### {tag}: {p.label}")
        sel = load_selection(ref, device)
        if sel.model is None:
            st.caption(p.objective)
            st.warning(sel.error)
            continue
        full = details_rd(p, sel)
        if "error" in full:
            st.warning(full["error"])
        elif p.live:  # a running job: everything from its current weights
            rd = full
        else:
            rd = {**rd, **{k: full[k] for k in ("mutual_info", "marginal_kl", "mutual_info_max", "kl_per_dim")}}
        st.caption(p.objective + (f" · {p.state}: its current weights" if p.live else ""))
        d = rd.get("latent_dim")
        m = [*st.columns(2), *st.columns(2)]  # two by two: four in a row do not fit half the page
        m[0].metric("rate R", f"{rd['rate']:.2f}", help="nats")
        m[1].metric("distortion D", f"{rd['distortion']:.2f}", help="nats")
        m[2].metric("ELBO", f"{rd['elbo']:.2f}", help="nats")
        m[3].metric("active units", f"{rd.get('active_units', '–')}/{d if d is not None else '–'}")
        shape = sel.model.config.image_shape
        tc = sel.info.get("train_config") or {}
        data, err = get_dataset(p.dataset, "test", bool(tc.get("binarize", False)))
        img_col, fig_col = st.columns([1, 1.3])
        with img_col:
            if data is None:
                st.warning(err)
            elif shape == (2,):
                st.info("A model of 2-D points: see the Latent space page for its data space.")
            else:
                x = data.x[:8].numpy()
                recon, samples = recon_and_samples(sel.key, sel.model, x, 8)
                st.image(tile(x, shape, ncols=4, target_px=360), caption="test images x", width="stretch")
                st.image(tile(recon, shape, ncols=4, target_px=360),
                         caption="reconstructions (decoded posterior mean)", width="stretch")
                st.image(tile(samples, shape, ncols=4, target_px=360), caption="prior samples z ~ N(0, I)",
                         width="stretch")
        with fig_col:
            if rd.get("kl_per_dim"):
                st.plotly_chart(kl_bars_figure(rd["kl_per_dim"], "KL per latent dimension (nats)"),
                                key=f"rd_bars_{tag}")
            if rd.get("mutual_info") is not None:
                st.plotly_chart(split_figure(rd), key=f"rd_split_{tag}")
                st.caption(f"ELBO surgery (Hoffman & Johnson 2016): I(x;z) ≤ log N = {rd['mutual_info_max']:.2f} "
                           "nats. A rate that is mostly KL(q(z)‖p(z)) is mismatch with the prior, not information.")

with st.expander("All points as a table"):
    st.dataframe([{"model": p.label, "source": p.source, "objective": p.objective,
                   "rate R": round(p.rd["rate"], 3), "distortion D": round(p.rd["distortion"], 3),
                   "ELBO": round(p.rd["elbo"], 3), "active units": p.rd.get("active_units"),
                   "state": p.state or "saved"} for p in on_plane], hide_index=True)
    st.caption("Test split, nats per example. R is exact (the closed-form KL); D, and so ELBO = −(R + D), averages "
               "4 draws of z per image (a running job's points: its last epoch, one draw). Home shows the "
               "checkpoint's own one-draw figure, which can differ by a few tenths of a nat.")
