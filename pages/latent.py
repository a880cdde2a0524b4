"""Latent space: the encoder's posterior means for a whole split, coloured by label; posterior ellipses, the prior and
the aggregate posterior; select points to see their images and reconstructions; which dimensions carry information."""
import numpy as np
import streamlit as st

from ui.core import current, nats2, need_model, selection_data, tile
from ui.latent import (aggregate_figure, class_names, dim_info, dims_figure, encoded_split, follow_live_run,
                       points_figure, projected, scatter_figure, selected_rows, surgery, update_selection)
from vae.latent_ops import decode_points, decode_rows, encode_rows
from vae.projection import TSNE_MAX_POINTS, available_methods

METHOD_LABELS = {"identity": "none (2-D latent)", "strip": "1-D latent: strip plot",
                 "pca": "PCA (first two components)", "dims": "two raw dimensions", "tsne": "t-SNE"}
MAX_SHOWN = 48  # selected examples drawn as images
MAX_SEL_URL = 2000  # characters of ?sel= at most: a larger selection is not put in the URL

sel = current()
st.title("Latent space")
st.markdown("Each example $x$ is encoded by $q_\\phi(z\\mid x)=\\mathcal N(\\mu,\\operatorname{diag}\\sigma^2)$. "
            "The dots are the means $\\mu$, coloured by label; the prior is $p(z)=\\mathcal N(0, I)$.")
if not need_model(sel):
    st.stop()
cfg = sel.config
d = cfg.latent_dim

# ---- controls ----------------------------------------------------------------------------------------------------
methods = available_methods(d)
if st.session_state.get("latent_method", methods[0]) not in methods:  # e.g. "pca" kept from a 16-D model
    st.session_state["latent_method"] = methods[0]  # set, not deleted: the browser's box would keep showing the old
c1, c2, c3, c4 = st.columns([1, 1.6, 1.4, 1.4])
split = c1.selectbox("Split", ["test", "train"], key="latent_split", bind="query-params",
                     help="Which examples to encode")
method = c2.selectbox("Projection", methods, key="latent_method", bind="query-params", format_func=METHOD_LABELS.get,
                      disabled=len(methods) == 1,
                      help="PCA keeps the most variance of the means; two raw dimensions show exactly what the "
                           "encoder does there; t-SNE shows neighbourhoods (distances are not meaningful)")

follow_live_run(sel, "latent", poll=method != "tsne",
                why_not="t-SNE takes seconds, so it is not redone for every new version of the weights: switch "
                        "to another projection to follow the run, or rerun the page to refresh.")
codes, data_err = encoded_split(sel, split)
if codes is None:
    st.warning(data_err)
    st.info("Decoding and prior samples need no data: the **Decode** page still works for this model.")
    st.page_link("pages/decode.py", label="Open the Decode page", icon=":material/tune:")
    st.stop()

info = dim_info(sel, codes)
dims = (0, 1)
if method == "dims":
    top = [int(i) for i in info.order[:2]]
    ca, cb = c3.columns(2)
    dim_opts = list(range(d))
    fmt = lambda i: f"z{i + 1}" + ("" if info.active[i] else " (inactive)")  # noqa: E731
    first = {}  # the two most informative dimensions where nothing is chosen yet
    for k, best in (("latent_dim_x", top[0]), ("latent_dim_y", top[1])):
        if k not in st.session_state:
            first[k] = best
        elif st.session_state[k] not in dim_opts:  # kept from a model with more dimensions: set, not deleted, or
            st.session_state[k] = best             # the browser's box would keep showing the old one
    dims = (ca.selectbox("x axis", dim_opts, index=first.get("latent_dim_x", 0), key="latent_dim_x",
                         bind="query-params", format_func=fmt),
            cb.selectbox("y axis", dim_opts, index=first.get("latent_dim_y", 0), key="latent_dim_y",
                         bind="query-params", format_func=fmt))
n_ell = c4.slider("q(z|x) ellipses (±2σ) drawn", 0, 200, 30, step=10, key="latent_n_ellipses", bind="query-params",
                  disabled=method == "tsne", help="A random sample of examples: each ellipse is 2 standard "
                                                  "deviations of q(z|x), drawn in the same plane as the dots")

if method == "dims" and dims[0] == dims[1]:
    st.warning(f"both axes are z{dims[0] + 1}: choose two different dimensions")
    st.stop()
if method == "tsne":
    n_tsne = min(len(codes.mu), TSNE_MAX_POINTS)
    with st.spinner(f"t-SNE of {n_tsne} points (about {max(2, n_tsne // 200)} s on a 2-core CPU, longer when "
                    "busy; cached after)…"):
        proj = projected(codes, method, dims)
else:
    proj = projected(codes, method, dims)

# ---- the selection, kept in session state across reruns --------------------------------------------------------
data_id = (codes.dataset, codes.split, len(codes.mu))
store = st.session_state.get("latent_selection")
if not store or store.get("data") != data_id:
    # a link's selection (?sel=3,17-20) on a first visit; another split or model starts empty
    asked = st.query_params.get("sel", "") if not store else ""
    rows = decode_rows(asked, len(codes.mu)) if asked else []
    if asked and not rows:  # a link's selection this data has none of: said, as for ?z= on Decode
        st.caption(f"?sel={asked[:30]} selects none of the {len(codes.mu)} points shown (give rows as in "
                   f"?sel=3,17-20, from 0 to {len(codes.mu) - 1}): nothing is selected")
    store = st.session_state["latent_selection"] = {"data": data_id, "rows": rows, "event": []}
update_selection(store, selected_rows(st.session_state.get("latent_scatter")))


# the selection in the URL, so that a reload or a shared link shows it (a huge one is left out); every change reruns
# the page, so keeping it here, once a run, is enough
sel_text = encode_rows(store["rows"])
if sel_text and len(sel_text) <= MAX_SEL_URL:
    if st.query_params.get("sel") != sel_text:
        st.query_params["sel"] = sel_text
elif "sel" in st.query_params:
    del st.query_params["sel"]

# ---- the scatter, and what the selection shows -----------------------------------------------------------------
is_points = tuple(cfg.image_shape) == (2,)
left, right = st.container(key="stack_latent").columns([1.25, 1])  # stacked where narrow
with left:
    fig = scatter_figure(codes, proj, n_ellipses=n_ell, selected=store["rows"], height=600)
    event = st.plotly_chart(fig, key="latent_scatter", on_select="rerun", selection_mode=("points", "box", "lasso"),
                            config={"scrollZoom": True})
    notes = []
    if proj.method == "pca":
        evr = proj.explained_variance_ratio
        notes.append(f"PCA of {d}-D means: the two components explain {100 * evr.sum():.0f}% of their variance "
                     f"({100 * evr[0]:.0f}% + {100 * evr[1]:.0f}%).")
    if proj.note:
        notes.append(proj.note + ".")
    notes.append(f"{len(proj.index)} {codes.split} examples. Lasso or box-select points (or click one) to "
                 + ("ring them in the data space" if is_points else "see their images")
                 + "; double-click empties the chart's selection.")
    st.caption(" ".join(notes))
if update_selection(store, selected_rows(event)):  # a selection this run's chart made: redraw with rings
    st.rerun()

with right:
    rows = store["rows"]
    data, _ = selection_data(sel, split)
    if is_points:
        recon = decode_points(sel.model, codes.mu)
        hl = data.x.numpy()[rows] if rows else None
        st.plotly_chart(points_figure(data.x.numpy(), codes.y, codes.dataset, recon=recon, highlight=hl,
                                      title="data space: x and its reconstruction E[x|z=μ]", height=600),
                        key="latent_data_space")
        st.caption("The 2-D toy data beside its latent space: select points on the left to ring them here.")
    elif not rows:
        st.info("Select points on the scatter (lasso, box or click) to see their images and reconstructions here.")
    else:
        names = class_names(codes.dataset)
        shown = rows[:MAX_SHOWN]
        labels, counts = np.unique(codes.y[rows], return_counts=True)
        st.markdown(f"**{len(rows)} selected** " + ("" if len(rows) <= MAX_SHOWN else f"(first {MAX_SHOWN} shown) ")
                    + "· labels: " + ", ".join(f"{names[lab]}×{c}" for lab, c in zip(labels, counts)))
        x = data.x.numpy()[shown]
        recon = decode_points(sel.model, codes.mu[shown])
        a, b = st.columns(2)
        a.image(tile(x, cfg.image_shape, ncols=6, target_px=420), caption="originals x", width="stretch",
                output_format="PNG")
        b.image(tile(recon, cfg.image_shape, ncols=6, target_px=420), output_format="PNG",
                caption="reconstructions E[x | z=μ(x)]", width="stretch")
    if rows and st.button("Clear selection", key="latent_clear"):
        store["rows"] = []
        st.rerun()

# ---- the aggregate posterior and the prior; the dimensions ---------------------------------------------------
agg, dims_col = st.container(key="stack_latent_agg").columns([1, 1])
with agg:
    st.subheader("Aggregate posterior vs prior")
    if proj.linear:
        st.plotly_chart(aggregate_figure(codes, proj, height=440), key="latent_aggregate")
        s = surgery(codes)
        fit = ("A good fit matches the prior's curve." if proj.method == "strip" else
               "A good fit fills the prior's circles without holes.")
        st.caption(f"q(z) = (1/N) Σₙ q(z|xₙ), in the same plane. {fit} "
                   f"ELBO surgery on {s['n']} examples: mean KL {nats2(s['mean_kl'])} nats = "
                   f"I(n; z) {nats2(s['mutual_info'])} + KL(q(z) ‖ p(z)) {nats2(s['marginal_kl'])} nats.")
    else:
        st.info("t-SNE is not a linear map, so the prior cannot be drawn in its plane: choose PCA or two raw "
                "dimensions to compare the aggregate posterior with the prior.")
with dims_col:
    st.subheader("Per dimension")
    st.plotly_chart(dims_figure(info, height=300), key="latent_dims")
    inactive = [f"z{i + 1}" for i in range(d) if not info.active[i]]
    st.caption(f"{int(info.active.sum())} of {d} dimensions active, {info.source}. "
               + (f"Inactive (grey): {', '.join(inactive)}: the encoder's mean E_q[z_d] hardly moves with the "
                  "input, so the decoder gets little about x from there (collapsed where q(z_d|x) ≈ N(0, 1) too: "
                  "its KL near 0)." if inactive else "No inactive dimensions."))
