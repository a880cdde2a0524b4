"""Collapse lab: a preset that collapses on digits, and remedies run beside it on the same seed through the job
registry. Per run: active units and per-dimension KL over training, final rate and distortion, reconstructions."""
import dataclasses

import streamlit as st

from ui.core import check_range, get_dataset, presenting, tile
from ui.tradeoff import (au_curves_figure, group_in_url, group_jobs, group_owned, group_progress, heatmap_figure,
                         kl_scale_figure, run_images, state_line, stop_group, submit_group)
from vae.diagnostics import ACTIVE_THRESHOLD
from vae.jobs import ACTIVE
from vae.tradeoff import (LAB_REMEDIES, LAB_SEP, PRESETS, REMEDIES, SHORT_TRAIN, kl_heatmap, lab_meta_from_names,
                          lab_run_name, lab_specs, run_summary, trajectory)

POLL_S = 1.0
N_IMAGES = 6

st.title("Collapse lab", help="Posterior collapse: q(z|x) ≈ p(z) for every x, so the rate is ≈ 0, the active units "
                              "go to 0 and the decoder ignores z. Reproduce it, then fix it on the same seed.")

# the lab this session watches, found again from ?lab= after a reload or from a shared link
group, lab_jobs = group_in_url("lab", "lab_group", "lab", hint=": press **Run** for a new one",
                               accept=lambda jobs: lab_meta_from_names(j.name for j in jobs) is not None)
meta = lab_meta_from_names(j.name for j in lab_jobs)  # preset and roles, read back from the runs' names
running = any(j.snapshot().state in ACTIVE for j in lab_jobs)

c1, c2 = st.columns([1.6, 1], vertical_alignment="bottom")
preset_key = c1.radio("Collapse preset", list(PRESETS), format_func=lambda k: PRESETS[k].label, key="lab_preset",
                      bind="query-params", horizontal=True)
with c2.container(horizontal=True, vertical_alignment="center", horizontal_alignment="right"):
    mine = group_owned(lab_jobs)  # a lab opened from someone else's link is watch-only (Run starts one's own)
    run_clicked = st.button("Run", type="primary", icon=":material/play_arrow:", key="lab_run",
                            disabled=running and mine, help="Trains the preset and each chosen remedy, two at a time")
    stop_clicked = st.button("Stop", icon=":material/stop:", key="lab_stop", disabled=not (running and mine),
                             help=None if mine or not running else
                             "This lab was started in another browser session: it is watch-only here, and its "
                             "runs end by themselves")
    with st.popover("Settings", icon=":material/settings:"):
        # any number typed reaches the server, which names one out of range when Run is pressed (ui.core.check_range)
        epochs = st.number_input("epochs per run", value=SHORT_TRAIN["epochs"], step=1, key="lab_epochs",
                                 help="5 to 300")
        seed = st.number_input("seed", value=0, step=1, key="lab_seed")
remedies = st.pills("Remedies, run beside it on the same seed", list(LAB_REMEDIES), selection_mode="multi",
                    default=list(LAB_REMEDIES), format_func=lambda k: REMEDIES[k].label, key="lab_remedies",
                    wrap=True) or []
if run_clicked:
    try:
        check_range("epochs per run", epochs, 5, 300)
        check_range("seed", seed, 0, 2**31 - 1)
        specs = lab_specs(preset_key, remedies, seed=int(seed), epochs=int(epochs))
    except ValueError as exc:
        st.error(str(exc))
    else:
        named = [dataclasses.replace(s, name=lab_run_name(preset_key, s)) for s in specs]
        st.session_state["lab_group"] = st.query_params["lab"] = submit_group(named, "lab")
        st.rerun()
if stop_clicked:
    stop_group(group)
    st.rerun()

shown = meta["preset"] if meta else preset_key
st.markdown(f"**{PRESETS[shown].label}.** {PRESETS[shown].what}")


def _short_name(name: str) -> str:
    return name.split(LAB_SEP, 1)[-1]


def results():
    """The runs of the last lab, side by side; polled while any of them trains."""
    jobs = group_jobs(st.session_state.get("lab_group"))
    if not jobs:
        st.info("Press **Run**: the preset and each remedy train for a few seconds each, two at a time.")
        return
    snaps = [j.snapshot() for j in jobs]
    # roles by name, not by place: a run forgotten on the Train page must not shift the others' notes
    roles = (lab_meta_from_names(s.name for s in snaps) or {}).get("roles", [])
    frac, ended, total = group_progress(snaps)
    if ended < total:
        st.progress(frac, text=f"{ended}/{total} runs ended")
    latent_dim = max(((s.model_config or {}).get("latent_dim") or 0) for s in snaps) or None
    data, err = get_dataset(snaps[0].train_config.get("dataset", "digits"), "test")
    x = data.x[:N_IMAGES].numpy() if data is not None else None
    shape = tuple((snaps[0].model_config or {}).get("image_shape", (8, 8)))
    show_images = x is not None and shape != (2,)

    top_l, top_r = st.container(key="stack_lab_top").columns([1, 1.4])  # stacked in a narrow window
    curves = [(_short_name(s.name), t["epoch"], t["active_units"]) for s in snaps for t in [trajectory(s.history)]]
    top_l.plotly_chart(au_curves_figure(curves, latent_dim, height=330), key="lab_au")
    with top_r:
        rows = []
        for s in snaps:
            sm = run_summary(s.history) or {}
            # numbers, so that a click on a header sorts them as numbers; "–" before a run's first epoch
            rows.append({"run": _short_name(s.name), "active units": sm.get("active_units"),
                         "peak": sm.get("peak_active_units"),
                         **{k: sm.get(v) for k, v in (("R", "rate"), ("D", "distortion"), ("ELBO", "elbo"))}})
        two = "%.2f"  # as the panels below write them
        st.dataframe(rows, hide_index=True, placeholder="–", column_config={
            "active units": st.column_config.NumberColumn(
                help=f"of {latent_dim} dimensions, at the last epoch: those whose posterior mean varies over the "
                     f"data (Cov_x E_q[z_d] > {ACTIVE_THRESHOLD:g})"),
            "peak": st.column_config.NumberColumn(help="the most active units the run had at any epoch"),
            "R": st.column_config.NumberColumn(help="rate, nats", format=two),
            "D": st.column_config.NumberColumn(help="distortion, nats", format=two),
            "ELBO": st.column_config.NumberColumn(help="−(R + D), nats", format=two)})
        st.caption("ELBO = −(R + D): each model's true bound, its KL weighted by 1 whatever β trained it. A remedy "
                   "that keeps dimensions alive pays for their KL, so its ELBO can come out below the collapsed "
                   "model's: what the remedies buy is a code that carries information (active units, R), not "
                   "necessarily a better ELBO.")
        if show_images:
            st.image(tile(x, shape, ncols=N_IMAGES, target_px=360), width="stretch",
                     caption="test images x. Below, per run: KL of each latent dimension (rows) over the epochs, "
                             "on a log scale from black (0.001 nats or less: collapsed) to bright (1 nat or more); "
                             "then its reconstructions of these images (in two rows)")
    heats = [kl_heatmap(s.history) for s in snaps]
    if any(h.size for h in heats):  # one scale for every run's heatmap (0.001 to >= 1 nat), once, above them
        strip = kl_scale_figure(1.0, height=100 if presenting() else 76)
        st.columns([3, 2])[0].plotly_chart(strip, key="lab_scale", config={"displayModeBar": False})
    # one row where each run's panel gets ui.core's min width for stack_lab_runs, else wrapped onto more rows
    cols = st.container(key="stack_lab_runs").columns(len(snaps))
    for i, (col, s) in enumerate(zip(cols, snaps)):
        with col:
            sm = run_summary(s.history)
            with st.container(key=f"lab_title_{i}"):  # titles of one or two lines: the heatmaps stay level
                st.markdown(f"**{_short_name(s.name)}**")
            heat = heats[i]
            if heat.size:
                st.plotly_chart(heatmap_figure(heat, "", zmax=1.0, height=170, fixed_margins=True),
                                key=f"lab_heat_{i}")
            if sm is not None:
                st.markdown(f"active units **{sm['active_units']}/{latent_dim}**  \nR {sm['rate']:.2f} · "
                            f"D {sm['distortion']:.2f} nats")
            if s.state != "finished":
                st.caption(state_line(s))
            if show_images and s.weights_version > 0:
                recon = run_images(s.id, s.weights_version, x)
                if recon is not None:
                    # two rows of three: a narrow column (five runs side by side) still shows each digit large
                    st.image(tile(recon, shape, ncols=(N_IMAGES + 1) // 2, target_px=300), width="stretch")
            role = roles[i] if i < len(roles) else ""
            if role in REMEDIES:
                st.caption(f"{REMEDIES[role].short} ({REMEDIES[role].cite})")
            elif role == "collapse":
                st.caption("no remedy: the preset as it is")
            if s.state == "failed":
                st.error(s.error)
    if err:
        st.warning(err)
    still = any(s.state in ACTIVE for s in snaps)
    if st.session_state.get("_lab_live") and not still:  # the last run just ended: re-enable Run, stop polling
        st.session_state["_lab_live"] = False
        st.rerun(scope="app")
    st.session_state["_lab_live"] = still


st.fragment(results, run_every=POLL_S if running else None)()

with st.expander("What each remedy does to the objective, and the papers", expanded=not group):
    st.markdown(
        "The β-VAE objective is $D + \\beta R$ (Higgins et al. 2017, *β-VAE*). Collapse means $R \\to 0$.\n\n"
        + "\n".join(f"- **{r.label}** ({r.cite}): {r.objective}" for r in REMEDIES.values()) +
        "\n\n**Why warm-up and cyclical annealing do not fix β = 4:** they change how training gets there, not the "
        "objective at the end. At β = 4 the optimum on digits has zero rate, so the dimensions die as soon as β is "
        "back up. Free bits and capacity change the objective itself, so they hold.\n\n"
        "**Strong decoders** (Bowman et al. 2016, *Generating sentences from a continuous space*; Chen et al. 2017, "
        "*Variational lossy autoencoder*; Gulrajani et al. 2017, *PixelVAE*): a decoder that sees the previous "
        "pixels models $x$ on its own; using $z$ costs KL and buys little, so the plain ELBO prefers to ignore $z$. "
        "Here the masked autoregressive decoder reaches a better ELBO with $R \\approx 0$ (about −21 nats) than the "
        "standard VAE does with $z$ (about −24), so warm-up and cyclical annealing only delay the collapse.\n\n"
        "References: Higgins et al. 2017 (ICLR); Bowman et al. 2016 (CoNLL); Fu et al. 2019, *Cyclical annealing "
        "schedule* (NAACL); Kingma et al. 2016, *Improved variational inference with inverse autoregressive flow* "
        "(NeurIPS); Burgess et al. 2018, *Understanding disentangling in β-VAE*; Burda et al. 2015 (active units).")
