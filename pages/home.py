"""Home: what a VAE is, the derivation with the right roles, and the selected model's reconstructions and samples."""
import streamlit as st

from ui.core import current, need_model, recon_and_samples, selection_data, tile

sel = current()
st.title("VAE Explorer")
st.markdown(
    "A **variational autoencoder** learns an **encoder** $q_\\phi(z\\mid x)$, a Gaussian over a small code $z$ for "
    "each input, and a **decoder** $p_\\theta(x\\mid z)$ that turns a code back into data. The prior "
    "$p(z)=\\mathcal N(0, I)$ lets us sample new data: draw $z$, decode it.")

left, right = st.container(key="stack_home").columns([1.1, 1])  # stacked where too narrow for both: ui.core BASE_CSS
with left:
    st.subheader("Why it trains: the ELBO")
    st.latex(r"""\begin{aligned}
\log p_\theta(x) &= \text{ELBO}
  + \underbrace{\mathrm{KL}\!\left(q_\phi(z\mid x)\,\|\,p_\theta(z\mid x)\right)}_{\text{gap}\;\ge\;0}
  \;\ge\; \text{ELBO} \\[4pt]
\text{ELBO} &= \mathbb{E}_{q_\phi(z\mid x)}\!\left[\log p_\theta(x\mid z)\right]
  - \mathrm{KL}\!\left(q_\phi(z\mid x)\,\|\,p(z)\right) \\[4pt]
\text{loss} &= \underbrace{-\mathbb{E}_{q_\phi}[\log p_\theta(x\mid z)]}_{\text{reconstruction}}
  + \beta\,\underbrace{\mathrm{KL}\!\left(q_\phi\,\|\,p(z)\right)}_{\text{rate}} \\
  &\qquad (\beta = 1:\ \text{loss} = -\text{ELBO})
\end{aligned}""")
    st.markdown(
        "- **Reconstruction**: how well the decoder $p_\\theta$ explains $x$ from a code drawn from the encoder.\n"
        "- **KL to the prior (rate)**: what the code costs in nats; on average over the data it bounds the "
        "information the code carries about $x$ from above. At $\\beta=1$ the loss is exactly "
        "$-\\text{ELBO}$; a $\\beta$-VAE weighs this term by $\\beta$.\n"
        "- Every figure in this app is in **nats per example**: summed over pixels and latent dimensions, averaged "
        "over the batch.")

with right:
    if need_model(sel):
        m = sel.info.get("metrics") or {}
        st.subheader(f"Model: {sel.label}")
        c = sel.config
        cols = st.columns(3)
        cols[0].metric("latent dims", c.latent_dim)
        if m.get("test_elbo") is not None:
            cols[1].metric("test ELBO (nats)", f"{m['test_elbo']:.2f}",
                           help="Saved with the checkpoint: the average over the test split with one z drawn per "
                                "image. The Trade-off page estimates it on the same split with 4 draws, so the two "
                                "can differ by a few tenths of a nat; ELBO anatomy averages the images you pick.")
            cols[2].metric("active units", f"{m.get('active_units', '–')}/{c.latent_dim}")
        data, err = selection_data(sel, "test")
        if c.image_shape == (2,):
            st.info("This model works on 2-D points: see the Latent space page for its data space.")
        else:
            x = data.x[:16].numpy() if data is not None else None
            recon, samples = recon_and_samples(sel.key, sel.model, x, 16)
            if data is None:
                st.warning(err)
            else:
                a, b = st.columns(2)
                a.image(tile(x, c.image_shape, ncols=4, target_px=320), caption="test images x", width="stretch")
                b.image(tile(recon, c.image_shape, ncols=4, target_px=320),
                        caption="reconstructions: decode the encoder's mean", width="stretch")
            st.image(tile(samples, c.image_shape, ncols=8, target_px=640),
                     caption="samples: z ~ N(0, I), decoded by p_θ", width="stretch")

st.subheader("Where next")
st.markdown(
    "- **Train**: watch reconstruction fall and the KL rise, live; reproduce KL collapse and fix it.\n"
    "- **Latent space**: the codes of the test set, coloured by digit.\n"
    "- **Decode**: drive the decoder with one slider per latent dimension.\n"
    "- **Trade-off**: models on the rate–distortion plane, and a β sweep.\n"
    "- **Collapse lab**: a collapsing run and its remedies (free bits, warm-up, cyclical, capacity), side by side.\n"
    "- **ELBO anatomy**: log p(x), the ELBO and the gap, for one image.")
