"""ELBO anatomy: the derivation of the VAE loss, step by step, with each quantity's value for the model on screen
and one test image (or the average over the first N). For a 2-D latent, the true posterior on a grid."""
import math

import numpy as np
import streamlit as st

from ui.anatomy_figures import decomposition_fig, headline_decimals, history_fig, iwae_fig, posterior_fig
from ui.core import current, need_model, presenting, selection_data, tile
from vae import anatomy as an
from vae.latent_ops import intra_op_threads

HIST_MAX, HIST_K, HIST_S = 1000, 500, 100  # log p(x) of the current weights for the history chart
N_DRAWS = 10  # independent nested draws averaged for the IWAE curve
ONE, SET = "one image", "first N images"


# ---- cached computations (keyed by the weights' cache key + which images + the estimator settings) -------------
# Each runs on one intra-op thread: on a busy CPU (a training run in this server, other processes) two threads
# spin-waiting for each other were 3-10x slower than one (benchmarks/elbo_anatomy.py).
@st.cache_data(max_entries=64, show_spinner=False)
def anatomy_cached(key, _model, _x, data_key, images, k, s, seed):
    with intra_op_threads(1):
        return an.anatomy(_model, _x, k=k, samples=s, seed=seed)


@st.cache_data(max_entries=32, show_spinner=False)
def draws_cached(key, _model, _x, data_key, images, k, draws, seed):
    with intra_op_threads(1):
        return an.iwae_curve_draws(_model, _x, k, draws=draws, seed=seed)


@st.cache_data(max_entries=64, show_spinner=False)
def picture_cached(key, _model, _x, data_key, index):
    with intra_op_threads(1):
        return an.posterior_picture(_model, _x)


@st.cache_data(max_entries=32, show_spinner=False)
def grid_cached(key, _model, _x, data_key, images):
    with intra_op_threads(1):
        lp, ring = an.grid_log_px_batch(_model, _x)
    return lp.numpy(), ring.numpy()


def metric(label: str, value: float, se: float | None = None):
    """A value in nats; its standard error underneath, in grey."""
    if se is not None and math.isfinite(se):
        st.metric(label, f"{value:.2f}", delta=f"± {se:.2f}", delta_color="off", delta_arrow="off",
                  delta_description="1 SE")
    else:
        st.metric(label, f"{value:.2f}")


def fmt(value, se=None, decimals: int = 2) -> str:
    if se is None or not math.isfinite(se):
        return f"{value:.{decimals}f}"
    return f"{value:.{decimals}f} ± {se:.{decimals}f}"


sel = current()
st.title("ELBO anatomy")
st.markdown("The VAE loss, derived line by line, with every quantity measured for the model in the sidebar. "
            "$q_\\phi(z\\mid x)$ is the **encoder**, $p_\\theta(x\\mid z)$ the **decoder**, $p(z)=\\mathcal N(0,I)$ "
            "the prior. All values are in **nats per example**.")
if not need_model(sel):
    st.stop()
model, cfg = sel.model, sel.config
data, err = selection_data(sel, "test")
if data is None:
    st.error(f"Test data unavailable: {err}")
    st.stop()
data_key = (data.name, "test", bool((sel.info.get("train_config") or {}).get("binarize", False)))
n_test = len(data)

# ---- controls ----------------------------------------------------------------------------------------------------
c1, c2, c3 = st.columns([1.3, 1, 1])
# the option text is what a shared link carries (?elbo_mode=first+N+images)
mode = "one" if c1.radio("Examples", [ONE, SET], horizontal=True, key="elbo_mode", bind="query-params",
                         help="One test image, or the average over the first N test images") == ONE else "set"
if mode == "one":
    raw_index = c2.number_input("Test image index", value=0, step=1, key="elbo_idx", bind="query-params",
                                help=f"0 to {n_test - 1}; the gallery below shows the first ones")
else:
    raw_count = c2.number_input("N: first N test images", value=32, step=1, key="elbo_n", bind="query-params",
                                help=f"1 to {min(n_test, an.MAX_SET)}")
raw_k = c3.number_input("K: importance samples for log p(x)", value=5000, step=500, key="elbo_k",
                        bind="query-params", help=f"{an.K_MIN} to {an.K_MAX}; the IWAE curve runs from K = 1 to K")
with st.expander("Estimator settings"):
    e1, e2, e3 = st.columns(3)
    raw_s = e1.number_input("S: samples for E_q[log p(x|z)]", value=1000, step=100, key="elbo_s",
                            bind="query-params", help=f"{an.S_MIN} to {an.S_MAX} Monte Carlo samples per image")
    raw_seed = e2.number_input("Seed", value=0, step=1, key="elbo_seed", bind="query-params")
    want_draws = e3.checkbox("IWAE curve: also the mean of independent draws", value=True,
                             key="elbo_draws", bind="query-params",
                             help=f"{N_DRAWS} draws for one image; for N images {N_DRAWS}/N, at least 2: each draw's "
                                  "curve already averages the N images, and the draws take most of the time")

checked, problems = {}, []  # every box checked: one line that names each bad one (it named the first only)
for name, check in (("k", lambda: an.check_k(raw_k)), ("s", lambda: an.check_samples(raw_s)),
                    ("seed", lambda: an.as_int("seed", raw_seed)),
                    ("items", lambda: an.check_index(raw_index, n_test) if mode == "one"
                     else an.check_count(raw_count, n_test))):
    try:
        checked[name] = check()
    except ValueError as exc:
        problems.append(str(exc))
if problems:
    st.error("; also ".join(problems))
    st.stop()
k, s, seed = checked["k"], checked["s"], checked["seed"]
if mode == "one":
    index = checked["items"]
    idx = [index]
    noun = "test example" if cfg.image_shape == (2,) else "test image"
    images, what = ("one", index), f"{noun} #{index}"
else:
    count = checked["items"]
    idx = list(range(count))
    images, what = ("first", count), f"the first {count} test images (average)"
x = data.x[idx]
n_draws = max(2, -(-N_DRAWS // len(idx))) if want_draws else 0  # ceil(N_DRAWS / N)

with st.expander("Gallery: the first 24 test images (type an index above)", expanded=False):
    if cfg.image_shape != (2,):
        st.image([tile(data.x[i:i + 1].numpy(), cfg.image_shape, ncols=1, target_px=96) for i in range(24)],
                 caption=[f"#{i} ({data.info.classes[int(data.y[i])]})" for i in range(24)])
    else:
        st.write("This model works on 2-D points, not images.")

# ---- the heavy estimates -----------------------------------------------------------------------------------------
two_d = cfg.latent_dim == 2
with st.spinner(f"Importance sampling: {len(idx)} image(s) × K = {k}, and S = {s} samples for the ELBO ...",
                show_time=True):
    a = anatomy_cached(sel.key, model, x, data_key, images, k, s, seed)
    draws = draws_cached(sel.key, model, x, data_key, images, k, n_draws, seed) if n_draws else None
pp, grid_lp, grid_ring, lp_all = None, None, None, None
if two_d:
    with st.spinner(f"Integrating p(x|z) p(z) on a {an.GRID_N}² grid over [−{an.GRID_LIM:g}, {an.GRID_LIM:g}]² "
                    f"for {len(idx)} image(s) ...", show_time=True):
        if mode == "one":  # the posterior picture integrates the reference grid too
            pp = picture_cached(sel.key, model, x[0], data_key, index)
            lp_all, grid_ring = np.array([pp.log_px_grid]), pp.boundary_mass
        else:
            lp_all, ring_all = grid_cached(sel.key, model, x, data_key, images)
            grid_ring = float(ring_all.max())
        grid_lp = float(lp_all.mean())

# ---- the example and the decomposition ---------------------------------------------------------------------------
st.subheader(f"Model {sel.label}, {what}")
# on a projector (presentation mode) the bars get the full width, below the images; in a narrow window too (stacked)
left, right = (st.container(key="stack_anatomy").columns([1, 1.6]) if not presenting()
               else (st.container(), st.container()))
with left:
    if cfg.image_shape != (2,):
        shown = x[:32].numpy()
        recon = model.reconstruct(x[:32].to(model.device)).cpu().numpy()
        ncols = 1 if len(shown) == 1 else 8
        a1, a2 = st.columns([1, 1, 1.4])[:2] if presenting() else st.columns(2)
        a1.image(tile(shown, cfg.image_shape, ncols=ncols, target_px=240), caption="x", width="stretch")
        a2.image(tile(recon, cfg.image_shape, ncols=ncols, target_px=240),
                 caption="decoded encoder mean E[x | z = μ_φ(x)]", width="stretch")
    else:
        st.write(f"x = ({', '.join(f'{v:.3f}' for v in x[0].tolist())})" if len(idx) == 1 else f"{len(idx)} points")
    d = headline_decimals(a.elbo, a.log_px, a.gap)  # the three add up as shown: ELBO + gap = log p(x)
    st.markdown(f"**ELBO** {fmt(a.elbo, a.elbo_se, d)} · **log p(x)** {fmt(a.log_px, a.log_px_se, d)} · "
                f"**gap** {fmt(a.gap, a.gap_se, d)} nats")
with right:
    st.plotly_chart(decomposition_fig(a), width="stretch", key="elbo_bar")

# ---- the derivation, with numbers --------------------------------------------------------------------------------
st.subheader("The derivation, with this model's numbers")
se_note = ("± values: one Monte Carlo standard error" + (" of the mean over the set" if len(idx) > 1 else ""))
steps = [  # short lines: each formula fits beside its numbers at 1400 px, and on its own above them when narrower
    (r"\begin{aligned}\log p_\theta(x) &= \log \int p_\theta(x, z)\,dz \\"
     r" &= \log \int q_\phi(z\mid x)\,\frac{p_\theta(x, z)}{q_\phi(z\mid x)}\,dz \\"
     r" &= \log \mathbb{E}_{q_\phi(z\mid x)}\!\left[\frac{p_\theta(x, z)}{q_\phi(z\mid x)}\right]\end{aligned}",
     [(f"log p_θ(x), importance sampling, K = {k} (nats)", a.log_px, a.log_px_se)]
     + ([(f"log p_θ(x), grid integral {an.GRID_N}² (nats)", grid_lp, None)] if grid_lp is not None else [])),
    (r"\begin{aligned}&\text{Jensen } (\log \text{ is concave}):\quad \log \mathbb{E}_q[w] \;\ge\; "
     r"\mathbb{E}_q[\log w] \\ &\Rightarrow\; \log p_\theta(x) \;\ge\; \mathbb{E}_{q_\phi(z\mid x)}\!\left["
     r"\log p_\theta(x, z) - \log q_\phi(z\mid x)\right] \\ &\phantom{\Rightarrow\;} \;=\; \text{ELBO}"
     r"\end{aligned}",
     [("ELBO (nats)", a.elbo, a.elbo_se)]),
    (r"\begin{aligned}\text{ELBO} &= \underbrace{\mathbb{E}_{q_\phi(z\mid x)}\!\left[\log p_\theta(x\mid z)\right]}"
     r"_{\text{reconstruction}} \\ &\quad - \underbrace{\mathrm{KL}\!\left(q_\phi(z\mid x)\,\|\,p(z)\right)}"
     r"_{\text{KL to the prior}} \\ \mathrm{KL}\!\left(q_\phi(z\mid x)\,\|\,p(z)\right) &= "
     r"\tfrac12 \textstyle\sum_j \left(\mu_j^2+\sigma_j^2-1-\log\sigma_j^2\right)\end{aligned}",
     [(f"E_q[log p_θ(x|z)], S = {s} samples (nats)", a.expected_log_lik, a.expected_log_lik_se),
      ("KL(q_φ(z|x) ‖ p(z)), closed form (nats)", a.kl, None)]),
    (r"\begin{aligned}\log p_\theta(x) - \text{ELBO} &= \mathrm{KL}\!\left(q_\phi(z\mid x)\,\|\,p_\theta(z\mid x)"
     r"\right) \\ &\ge 0 \qquad(\text{the gap})\end{aligned}",
     [("gap = log p(x) − ELBO, IS (nats)", a.gap, a.gap_se)]
     + ([("gap = log p(x) − ELBO, grid (nats)", grid_lp - a.elbo, a.elbo_se)] if grid_lp is not None else [])
     + ([("KL(q ‖ p(z|x)), quadrature (nats)", pp.kl_q_post, None)] if pp is not None else [])),
    (r"\begin{aligned}\text{loss} = -\text{ELBO} &= -\mathbb{E}_{q_\phi(z\mid x)}\!\left[\log p_\theta(x\mid z)"
     r"\right] \\ &\quad + \mathrm{KL}\!\left(q_\phi(z\mid x)\,\|\,p(z)\right)\end{aligned}",
     [("loss = −ELBO at β = 1 (nats)", a.loss, a.elbo_se)]),
]
for i, (tex, values) in enumerate(steps, 1):
    # side by side where the formula has room (ui.core's CSS for stack_elbo_*), else the formula above its numbers
    lcol, rcol = st.container(key=f"stack_elbo_{i}").columns([2.4, 1], vertical_alignment="center")
    with lcol:
        st.markdown(f"**Step {i}**")
        st.latex(tex)
    with rcol:
        for label, value, se in values:
            metric(label, value, se)
st.caption(f"q_φ(z|x) = N(μ_φ(x), diag σ²_φ(x)) is the encoder; p_θ(x|z) ({cfg.likelihood}) is the decoder; "
           f"p(z) = N(0, I). {se_note}. The ELBO and log p(x) use independent draws, so the gap's error adds both.")
if a.gap < -3 * a.gap_se:
    st.warning(f"The measured gap {fmt(a.gap, a.gap_se)} is negative beyond 3 standard errors: raise K and S.")

# ---- IWAE curve --------------------------------------------------------------------------------------------------
st.subheader("Tighter bounds: the importance-weighted bound L_K")
st.latex(r"\begin{aligned}\mathcal L_K &= \mathbb{E}\left[\log \frac1K \sum_{k=1}^K \frac{p_\theta(x, z_k)}"
         r"{q_\phi(z_k\mid x)}\right], \quad z_k \sim q_\phi(z\mid x) \\ \text{ELBO} = \mathcal L_1 &\le "
         r"\mathcal L_K \le \mathcal L_{K+1} \le \log p_\theta(x)\end{aligned}")
st.plotly_chart(iwae_fig(a, draws, grid_lp), width="stretch", key="elbo_iwae")
st.caption(("The orange line is L_K averaged over independent draws (grey). In expectation" if draws is not None
            else "In expectation over draws (tick the mean above to see it)") +
           f" L_K never decreases with K (Burda et al. 2015); a mean of a few draws still wiggles within its "
           f"error bars. The blue line is one nested draw: L_K from the first K of the same {k} weights, so "
           f"its last point is the IS estimate of log p(x); the band is its ±1 delta-method standard error. One "
           f"draw can wiggle, and even start above log p(x) and fall. The dashed log p(x) is itself an estimate "
           f"with its own error: a curve that ends a little above it, within the bands, is Monte Carlo noise, not a "
           f"bound broken.")

# ---- 2-D: the true posterior -------------------------------------------------------------------------------------
st.subheader("The gap as a picture: the true posterior against the encoder")
if not two_d:
    calls = f"{an.GRID_N}^{cfg.latent_dim} ≈ 10^{cfg.latent_dim * math.log10(an.GRID_N):.0f}"
    st.info(f"No grid for this model: its latent has {cfg.latent_dim} dimensions, and a grid with {an.GRID_N} "
            f"points per axis would need {calls} decoder calls per image. Here log p(x) comes from importance "
            "sampling alone. Pick the shipped digits-z2 model to see p(z|x) on a grid.")
else:
    g1, g2 = st.columns([1.4, 1])
    with g2:
        is_se = a.log_px_se
        diff = a.log_px - grid_lp
        m1, m2 = st.columns(2)
        with m1:
            metric(f"log p(x), IS, K = {k}", a.log_px, is_se)
        with m2:
            metric(f"log p(x), grid {an.GRID_N}²", grid_lp)
        ok = an.grid_agrees(a.log_px, is_se, grid_lp)
        st.metric("IS − grid (nats)", f"{diff:+.3f}", delta=f"{diff / is_se:+.1f} SE" if is_se > 0 else None,
                  delta_color="off", delta_arrow="off")
        if len(idx) > 1:
            per_ok = [an.grid_agrees(v, e, g) for v, e, g in
                      zip(a.per_example["log_px"], a.per_example["log_px_se"], lp_all)]
            worst = int(np.argmax(np.abs(a.per_example["log_px"] - lp_all)))
            st.markdown(f"{sum(per_ok)} of {len(per_ok)} images agree within tolerance; the largest difference is "
                        f"image #{idx[worst]}: {a.per_example['log_px'][worst] - lp_all[worst]:+.2f} nats.")
        (st.success if ok else st.warning)(
            ("Agree" if ok else "Do not agree") + f" within the tolerance |IS − grid| ≤ {an.AGREE_SIGMAS:g} SE + "
            f"{an.AGREE_FLOOR:g} nats.")
        st.caption(
            "For reference, benchmarks/elbo_anatomy.py measured on the shipped digits-z2 model (K = 5000, all 359 "
            "test images): "
            "median |IS − grid| 0.015 nats, under 0.16 nats for 95% of images, 350–351 of 359 within the "
            "tolerance, test-set means 0.02–0.03 nats apart. Every miss is IS too low: q misses part of the "
            "posterior, the weights are heavy-tailed, and the standard error, computed from the drawn weights, "
            "cannot see what they never reached. The grid sum is exact to about 0.001 nats (481² points change it "
            "by < 3e-4).")
        if grid_ring > 1e-4:
            st.warning(f"{grid_ring:.1%} of a posterior lies on the grid's edge: the grid may cut off mass.")
    with g1:
        if pp is None:
            st.info(f"The posterior heatmap is drawn for one image: choose '{ONE}' above.")
        else:
            log_scale = st.toggle("log colour scale (shows the tails q misses)", key="elbo_log", bind="query-params")
            st.plotly_chart(posterior_fig(pp, log_scale), width="stretch", key="elbo_post")
            st.caption(
                f"p_θ(z|x) ∝ p_θ(x|z) p(z), normalised on a {an.ZOOM_N}² grid zoomed onto it (it holds "
                f"{pp.zoom_mass:.4%} of the mass on the {an.GRID_N}² reference grid; log p(x) there: "
                f"{pp.log_px_zoom:.3f}). The white ellipses are q_φ(z|x) at 1σ and 2σ. Where they miss the heatmap, "
                f"the ELBO loses nats: KL(q ‖ p(z|x)) = {pp.kl_q_post:.2f} nats on this grid, the gap.")

# ---- history -----------------------------------------------------------------------------------------------------
st.subheader("During training")
hist = an.elbo_history(sel.info.get("history"))
if hist is None:
    st.info("This model has no per-epoch history (no epoch has finished, or the checkpoint was saved without one).")
else:
    n_hist = min(n_test, HIST_MAX)
    label = f"the {'whole test split' if n_hist == n_test else f'first {n_hist} test images'}"
    want = st.toggle(f"Add log p(x) for the current weights ({label}, K = {HIST_K})", key="elbo_hist_lp",
                     help="Importance sampling over many images takes a few seconds; cached afterwards")
    cur = None
    if want:
        with st.spinner(f"log p(x) for {n_hist} images × K = {HIST_K} ...", show_time=True):
            h = anatomy_cached(sel.key, model, data.x[:n_hist], data_key, ("first", n_hist), HIST_K, HIST_S, 0)
        cur = {"log_px": h.log_px, "log_px_se": h.log_px_se, "elbo": h.elbo,
               "label_log_px": f"log p(x) now (±2 SE): {h.log_px:.2f}", "label_elbo": f"ELBO now: {h.elbo:.2f}"}
    st.plotly_chart(history_fig(hist, cur), width="stretch", key="elbo_hist")
    st.caption("The history records the ELBO of every epoch (test: the whole test split, one z sample per image); "
               f"'ELBO now' averages S = {HIST_S} samples per image over {label}. log p(x) per epoch would need the "
               "weights of every epoch, which are not stored; so log p(x), and with it the gap, is shown "
               "only for the current weights." + (f" Gap now: {cur['log_px'] - cur['elbo']:.2f} nats." if cur else ""))
