"""VAE Explorer: `streamlit run app.py`. Builds the navigation and the shared sidebar, then runs the chosen page."""
from pathlib import Path

import streamlit as st

from ui.core import get_registry, sidebar, warm_imports

ROOT = Path(__file__).resolve().parent

st.set_page_config(page_title="VAE Explorer", page_icon=":material/blur_on:", layout="wide")

# (file, title, icon, url path). A page appears once its file exists.
PAGES = [
    ("pages/home.py", "Home", ":material/home:", "home"),
    ("pages/train.py", "Train", ":material/model_training:", "train"),
    ("pages/latent.py", "Latent space", ":material/scatter_plot:", "latent"),
    ("pages/decode.py", "Decode", ":material/tune:", "decode"),
    ("pages/tradeoff.py", "Trade-off", ":material/balance:", "tradeoff"),
    ("pages/collapse.py", "Collapse lab", ":material/science:", "collapse"),
    ("pages/elbo.py", "ELBO anatomy", ":material/functions:", "elbo"),
]

try:  # the run registry reads $VAE_MAX_JOBS and friends: a bad value is one line here, not a traceback on each page
    get_registry()
except ValueError as exc:
    st.error(f"VAE Explorer cannot start its run registry: {exc}. Fix it, then start `streamlit run app.py` again.",
             icon=":material/error:")
    st.stop()

pg = st.navigation([st.Page(f, title=t, icon=i, url_path=u, default=(u == "home"))
                    for f, t, i, u in PAGES if (ROOT / f).exists()])
st.session_state["_selection"] = sidebar()
pg.run()
warm_imports()  # after the page: the first render never waits for it
