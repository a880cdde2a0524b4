"""Train: configure a VAE, run it in the background and watch it learn (or collapse), live."""
import streamlit as st

from ui import train_views as tv
from ui.core import expander
from vae.jobs import ACTIVE, INTERRUPTED

st.title("Train a VAE, live")
st.caption("Loss = reconstruction NLL + β·KL(q_φ(z|x) ‖ p(z)), in nats per example: −ELBO at β = 1. The run "
           "goes on in the background: switch pages and come back to it, or reload or close the tab and find it "
           "again in the run list or through the URL.")

tv.restore_run()
requested = st.query_params.get("run")
job = tv.current_job()
if requested and job is None:
    st.warning(f"run {requested!r} is not on this server (it may have been forgotten): pick one or start a new one")
    tv.set_run(None)
# The run's state, read once: the job's thread can end the run while this script runs, and a page drawn half with
# the old state and half with the new one would stay so (the live view polls, and reruns the page when the run
# ends, only if it saw the run active).
state = job.state if job is not None else None

tv.controls(job, state)
tv.show_messages()
# open while there is no run, or a run Reset prepared (Start then uses these options); closed once a run is on
# screen (until the user opens it)
with expander("Configuration: presets and every trainer option", "exp_config", icon=":material/settings:",
              open_for=(job.id if job else None, job is None or tv._is_fresh(job))):
    tv.config_panel(locked=state in ACTIVE)
if state in (*ACTIVE, INTERRUPTED) and job.trainer is not None:
    with expander("Change while running: β, schedule, free bits, lr", "exp_live", icon=":material/tune:"):
        tv.live_settings(job)
c1, c2 = st.columns(2)
if job is not None:
    ended = state not in ACTIVE  # open when the run ends (or one that has ended is picked)
    with expander("Save and download", "exp_save", icon=":material/save:", where=c1,
                  open_for=((job.id, ended), ended)):
        tv.save_panel(job)
with expander("All runs on this server", "exp_runs", icon=":material/list:", where=c2):
    tv.runs_table()
    if job is not None and state not in ACTIVE:
        st.button("Forget this run", key="btn_forget", icon=":material/delete:", on_click=tv._on_forget,
                  help="Remove it from the list (and its autosave); saved checkpoints stay")

if job is None:
    st.info("Pick a preset and press **Start**. “fast demo” trains in seconds; “reproduce KL collapse” shows every "
            "latent dimension dying; the two “fix it” presets bring them back.")
    busy = [j for j in tv.registry().jobs() if j.state in ACTIVE]
    if busy:  # a new tab, or another session's runs: say they exist, and how to watch one
        st.caption(f"{len(busy)} run(s) already on this server ({', '.join(j.name for j in busy[:3])}"
                   f"{', …' if len(busy) > 3 else ''}): pick one in **Run** above to watch it.")
else:
    tv.live_view(job, state)
