"""Decode: drive the decoder p_theta(x|z) with one slider per latent dimension (only the image's fragment reruns),
traverse dimensions, interpolate between two encodings, sample the prior with a temperature, and measure which
dimensions the decoder actually uses."""
import numpy as np
import streamlit as st

from ui.core import clamped, current, need_model, presenting, quoted, selection_data, tile, to_images, upscale
from ui.latent import (class_names, dim_info, encoded_split, follow_live_run, points_figure, sensitivity,
                       sensitivity_figure, traversal_points_figure)
from vae.latent_ops import (MAX_SLIDERS, SLIDER_LIMIT, compose_latent, decode_one, decode_point, decode_points,
                            encode_point, interpolate, interpolate_at, prior_samples, slider_layout, start_point,
                            traversal_grid, traversal_values)

START_LABELS = {"zero": "zero (the prior's mean)", "prior": "a random prior sample", "image": "a test image's code"}
IMAGE_PX = 448  # the decoded image's size on screen: integer nearest-neighbour upscaling, crisp pixels

sel = current()
st.title("Decode")
st.markdown("Drive the **decoder** $p_\\theta(x\\mid z)$ yourself: each slider is one coordinate of $z$, in prior "
            "standard deviations, and the image is $\\mathbb E[x\\mid z]$. Sliders are ordered by the KL each "
            "dimension carries, most informative first.")
if not need_model(sel):
    st.stop()
cfg = sel.config
d = cfg.latent_dim
shape = tuple(cfg.image_shape)
is_points = shape == (2,)
model = sel.model
follow_live_run(sel, "decode")

codes, data_err = encoded_split(sel, "test")
data = selection_data(sel, "test")[0] if codes is not None else None
info = dim_info(sel, codes)
if codes is None:
    st.warning(f"{data_err} Without the data, the sliders, traversals, prior samples and decoder sensitivity "
               "still work; starting from a test image and interpolating need it.")

# ---- where the sliders start --------------------------------------------------------------------------------------
s1, s2, s3 = st.columns([2.2, 1, 1.2])
start = s1.radio("Start from", list(START_LABELS), format_func=START_LABELS.get, horizontal=True, key="dec_start",
                 bind="query-params")
# the number boxes take any value; one out of range is brought in with a note (ui.core.clamped), where a bounded
# box would silently keep its old value
seed = clamped("Prior sample seed", int(s2.number_input("Prior sample seed", value=0, step=1, key="dec_seed",
                                                        bind="query-params", disabled=start != "prior")),
               0, 1_000_000, s2)
n_test = len(codes.mu) if codes is not None else 1
img_idx = clamped("Test image #", int(s3.number_input("Test image #", value=0, step=1, key="dec_image",
                                                    bind="query-params", disabled=start != "image" or codes is None)),
                  0, max(0, n_test - 1), s3)
if start == "image" and codes is None:
    st.warning("Starting from a test image needs the dataset (see above): starting from zero instead.")
    start = "zero"
if start == "image" and not is_points:
    s3.image(upscale(to_images(data.x[img_idx:img_idx + 1], shape)[0], 96), output_format="PNG",
             caption=f"test image #{img_idx} (label {int(codes.y[img_idx])})")
base = start_point(start, d, seed, codes.mu[img_idx] if start == "image" else None)
signature = (sel.ref, d, start, seed, img_idx)
reset = s1.button("Reset the sliders to this start", key="dec_reset")
if st.session_state.get("dec_signature") != signature or reset:
    # the sliders go to the start; on a page's first run, to the point in the URL (?z=, a reload or a shared link)
    # when it has one for this model's d dimensions
    linked = not reset and "dec_signature" not in st.session_state and st.query_params.get("z")
    asked = decode_point(st.query_params.get("z"), d, clip=False) if linked else None
    shared = None if asked is None else np.clip(asked, -SLIDER_LIMIT, SLIDER_LIMIT)
    if linked and asked is None:
        st.caption(f"?z={quoted(st.query_params['z'], 40)} is not a point of this model's {d} latent dimensions "
                   "(numbers, comma-separated): the sliders start from the start point instead")
    elif asked is not None and np.any(np.abs(asked) > SLIDER_LIMIT):
        st.caption(f"?z= has coordinates beyond the sliders' ±{SLIDER_LIMIT:g}: they start at the ends instead")
    st.session_state["dec_signature"] = signature
    for k in range(d):
        st.session_state[f"dec_z_{k}"] = float((base if shared is None else shared)[k])

n_sliders = MAX_SLIDERS
if d > MAX_SLIDERS:
    n_sliders = clamped("Sliders shown", int(st.number_input(
        f"Sliders shown (of {d}; the others are held at the start)", value=MAX_SLIDERS, step=1, key="dec_n_sliders",
        bind="query-params")), 1, d)
layout = slider_layout(info.kl, info.active, n_sliders, kl_known=info.known)
inactive_keys = [f".st-key-dec_z_{k}" for k in layout.shown if not layout.active[k]]
if inactive_keys:  # grey out the inactive dimensions' sliders (they still move: feel that nothing changes)
    st.html(f"<style>{', '.join(inactive_keys)} {{ filter: grayscale(1); opacity: 0.55; }}</style>")


@st.fragment
def decoder_panel():
    """The sliders and the decoded image: moving a slider reruns only this fragment."""
    left, right = st.columns([1, 1.1])
    with left:
        ncols = 2 if len(layout.shown) > 6 else 1
        cols = st.columns(ncols)
        for i, dim in enumerate(layout.shown):
            key = f"dec_z_{dim}"
            if key not in st.session_state:  # e.g. a slider that was hidden and is shown again
                st.session_state[key] = float(base[dim])
            label = layout.label(dim)
            cols[i % ncols].slider(label if layout.active[dim] else f":gray[{label}]", -SLIDER_LIMIT, SLIDER_LIMIT,
                                   step=0.05, format="%.2f", key=key,
                                   help=f"z{dim + 1}, in prior standard deviations. "
                                        + (f"KL {info.kl[dim]:.3f} nats ({info.source})." if info.known else
                                           info.source[0].upper() + info.source[1:] + "."))
        if len(layout.held):
            st.caption(f"{len(layout.held)} less informative dimensions held at the start: "
                       + ", ".join(f"z{k + 1}" for k in sorted(layout.held)))
    values = [st.session_state[f"dec_z_{dim}"] for dim in layout.shown]
    z = compose_latent(base, layout.shown, values)
    point = encode_point(z, base)  # in the URL once moved from the start: a reload or a link shows this image
    if point != st.query_params.get("z", ""):
        if point:
            st.query_params["z"] = point
        else:
            del st.query_params["z"]
    x = decode_one(model, z)
    with right:
        if is_points:
            st.plotly_chart(points_figure(data.x.numpy() if data is not None else None,
                                          codes.y if codes is not None else None, sel.dataset, decoded=x,
                                          title="E[x|z] in data space", height=IMAGE_PX),
                            key="dec_point_fig")
        else:
            st.image(upscale(to_images(x[None], shape)[0], IMAGE_PX), caption="E[x | z], decoded by p_θ",
                     output_format="PNG")
        st.caption("z = (" + ", ".join(f"{v:.2f}" for v in z[:16]) + (", …)" if d > 16 else ")"))


decoder_panel()
n_inactive = int((~info.active).sum())
if not info.known:
    st.caption(info.source[0].upper() + info.source[1:] + ": the decoder sensitivity below shows which dimensions "
               "matter.")
elif n_inactive:
    st.caption(f"{n_inactive} of {d} dimensions inactive ({info.source}): their sliders are grey; moving them "
               "barely changes the image, because the decoder learned to ignore them.")
else:
    st.caption(f"All {d} dimensions are active ({info.source}).")

# ---- traversal grid -----------------------------------------------------------------------------------------------
st.subheader("Latent traversal")
t1, t2 = st.columns(2)
n_rows = int(t1.slider("Dimensions (rows, most informative first)", 1, d, min(d, 8), key="dec_trav_rows",
                       bind="query-params")) \
    if d > 1 else 1
n_cols = int(t2.slider("Values over ±3σ (columns)", 3, 15, 9, step=2, key="dec_trav_cols", bind="query-params"))
rows = info.order[:n_rows]
values = traversal_values(n_cols)
grid = traversal_grid(model, base, rows, values)  # (rows, cols, D)
st.caption(f"{n_rows} dimensions × {n_cols} values: row r moves one dimension from −3 to +3 around the start "
           "point; every other dimension stays where it starts.")
if is_points:
    st.plotly_chart(traversal_points_figure(grid, rows, values, data.x.numpy() if data is not None else None),
                    key="dec_traversal_fig")
else:
    row_px = min(900, 60 * n_cols)
    for r, dim in enumerate(rows):
        lc, ic = st.columns([1, 8], vertical_alignment="center")
        tag = "" if info.active[dim] else " · inactive"
        lc.markdown(f"**z{dim + 1}**  \n{info.kl[dim]:.2f} nats{tag}" if info.known else f"**z{dim + 1}**")
        ic.image(tile(grid[r], shape, ncols=n_cols, target_px=row_px), output_format="PNG",
                 width="stretch" if presenting() else "content")  # the row as wide as the page on a projector

# ---- interpolation ------------------------------------------------------------------------------------------------
thing = "point" if is_points else "image"  # the moons' examples are 2-D points, not images
st.subheader(f"Interpolation between two test {thing}s")
if codes is None:
    st.warning(f"Interpolating between test {thing}s needs the dataset. {data_err}")
else:
    def first_with(label, fallback):
        hits = np.flatnonzero(codes.y == label)
        return int(hits[0]) if len(hits) else fallback

    i1, i2, i3, i4 = st.columns([1, 1, 1.2, 1.4])
    a = clamped(f"From test {thing} #", int(i1.number_input(f"From test {thing} #", value=first_with(4, 0), step=1,
                                                            key="dec_interp_a", bind="query-params")),
                0, n_test - 1, i1)
    b = clamped(f"to test {thing} #", int(i2.number_input(f"to test {thing} #",
                                                          value=first_with(9, min(1, n_test - 1)), step=1,
                                                          key="dec_interp_b", bind="query-params")),
                0, n_test - 1, i2)
    method = i3.radio("Path", ["linear", "spherical"], horizontal=True, key="dec_interp_method", bind="query-params",
                      help="linear: a straight line between the codes (its norm dips between them); spherical "
                           "(slerp): along the great circle, which keeps the norm of z when both codes have the same "
                           "norm: in high dimensions most of the prior's mass lies "
                           "near a sphere")
    steps = int(i4.slider("Steps", 3, 16, 10, key="dec_interp_steps", bind="query-params"))
    path = interpolate(codes.mu[a], codes.mu[b], steps, method)
    decoded = decode_points(model, path)
    norms = np.linalg.norm(path, axis=1)
    if is_points:
        st.plotly_chart(points_figure(data.x.numpy(), codes.y, sel.dataset, decoded=decoded,
                                      title="the interpolation, decoded into data space", height=420),
                        key="dec_interp_fig")
    else:
        names = class_names(sel.dataset)

        def named(i):  # "#9 (a 4)": which digit or garment the number is
            y, article = int(codes.y[i]), "a " if sel.dataset in ("digits", "mnist") else ""
            return f"#{i} ({article}{names[y]})" if y < len(names) else f"#{i}"

        ends = np.stack([data.x[a].numpy(), data.x[b].numpy()])
        c1, c2 = st.columns([1, 6], vertical_alignment="center")
        c1.image(tile(ends, shape, ncols=1, target_px=140 if presenting() else 90),
                 caption=f"{named(a)} and {named(b)}", output_format="PNG")
        c2.image(tile(decoded, shape, ncols=steps, target_px=min(1000, 70 * steps)), output_format="PNG",
                 width="stretch" if presenting() else "content",
                 caption=f"{method} path from μ(x{named(a)}) to μ(x{named(b)}), decoded")

        @st.fragment
        def morph():
            """One slider from one image's code to the other's: only this part reruns as it moves."""
            t = float(st.slider(f"Morph t: 0 = {named(a)}, 1 = {named(b)}", 0.0, 1.0, 0.5, step=0.05,
                                key="dec_morph_t", bind="query-params",
                                help="z = the point at t on the path above; the middle image is p_θ's decoding of it"))
            img = decode_points(model, interpolate_at(codes.mu[a], codes.mu[b], t, method)[None])
            px = 360 if presenting() else 240
            m1, m2, m3 = st.columns(3)
            m1.image(upscale(to_images(data.x[a:a + 1], shape)[0], px), caption=f"x{named(a)}", output_format="PNG")
            m2.image(upscale(to_images(img, shape)[0], px), caption=f"decoded at t = {t:.2f}", output_format="PNG")
            m3.image(upscale(to_images(data.x[b:b + 1], shape)[0], px), caption=f"x{named(b)}", output_format="PNG")

    st.caption(f"‖z‖ along the path: {norms[0]:.2f} → min {norms.min():.2f} → {norms[-1]:.2f}.")
    if not is_points:
        morph()

# ---- prior samples ------------------------------------------------------------------------------------------------
st.subheader("Samples from the prior")
p1, p2 = st.columns([2, 1])
temp = float(p1.slider("Temperature T: z ~ N(0, T² I)", 0.0, 2.0, 1.0, step=0.1, key="dec_temp", bind="query-params",
                       help="T = 1 is the model's prior; T < 1 draws more typical, cleaner samples; T > 1 wilder"))
sample_seed = clamped("Seed", int(p2.number_input("Seed", value=0, step=1, key="dec_sample_seed", bind="query-params")),
                      0, 1_000_000, p2)
if is_points:
    samples = prior_samples(model, 600, temp, sample_seed)
    st.plotly_chart(points_figure(data.x.numpy() if data is not None else None,
                                  codes.y if codes is not None else None, sel.dataset, samples=samples,
                                  title=f"600 prior samples at T = {temp:.1f}, decoded", height=420),
                    key="dec_samples_fig")
else:
    samples = prior_samples(model, 32, temp, sample_seed)
    st.image(tile(samples, shape, ncols=16, target_px=960), output_format="PNG",
             caption=f"32 samples at T = {temp:.1f}: z ~ N(0, T²I), decoded to E[x|z]")

# ---- decoder sensitivity ------------------------------------------------------------------------------------------
st.subheader("Which dimensions does the decoder use?")
sources = ["prior", "posterior"] if codes is not None else ["prior"]
source = st.radio("At", sources, horizontal=True, key="dec_sens_source", bind="query-params",
                  format_func={"prior": "256 prior samples z ~ N(0, I)",
                               "posterior": "the posterior means of 256 test images"}.get)
sens_key = (sel.key if source == "prior" else codes.key) + f"|sens|{source}"
sens = sensitivity(sens_key, model, source, 256, codes.mu if codes is not None else None)
st.plotly_chart(sensitivity_figure(sens, info), key="dec_sens_fig")
st.caption("Mean ‖∂E[x|z]/∂z_d‖₂ over the points (forward-mode autograd): how much the decoded image moves per unit "
           "of z_d. Near zero: the decoder ignores that dimension, whatever the slider does.")
