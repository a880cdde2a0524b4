"""Train: configure a VAE, run it in the background and watch it learn (or collapse), live."""
import streamlit as st

from ui import train_views as tv
from ui.core import expander, owns, quoted
from vae.jobs import ACTIVE, INTERRUPTED

st.title("Train a VAE, live")
st.caption("Loss = reconstruction NLL + β·KL(q_φ(z|x) ‖ p(z)), in nats per example: −ELBO at β = 1.")

tv.init_options()
tv.restore_run()
requested = st.query_params.get("run")
job = tv.current_job()
if requested and job is None:
    st.warning(f"run {quoted(requested, 40)} is not on this server (it may have been forgotten): pick one or start a "
               "new one")
    tv.set_run(None)
# The run's state, read once: the job's thread can end the run while this script runs, and a page drawn half with
# the old state and half with the new one would stay so (the live view polls, and reruns the page when the run
# ends, only if it saw the run active).
state = job.state if job is not None else None

tv.controls(job, state)
tv.show_messages()
# Configuration first while there is no run or Step has just prepared one (Start then uses these options); once a
# run is on screen, its live view comes right under the controls (on a 1280x800 projector the charts were below the
# fold) and the panels for the next run, saving and the run list go under it. What to act on now stays on top: the
# settings of a running job, the Save panel of one that has ended.
# (a prepared run once stepped is being watched: its live view goes on top as for any run)
fresh = job is None or (tv._is_fresh(job) and job.snapshot(steps=False).step == 0)
ended = job is not None and state not in ACTIVE


def config_box():
    with expander("Configuration: presets and every trainer option", "exp_config", icon=":material/settings:",
                  open_for=(job.id if job else None, fresh)):
        tv.config_panel(locked=state in ACTIVE)


def save_box(where=st):
    with expander("Save and download", "exp_save", icon=":material/save:", where=where,
                  open_for=((job.id, ended), ended)):  # open when the run ends (or one that has ended is picked)
        tv.save_panel(job)


def runs_box(where=st):
    with expander("All runs on this server", "exp_runs", icon=":material/list:", where=where):
        tv.runs_table()
        if job is not None and state not in ACTIVE:
            mine = owns(job)
            st.button("Forget this run", key="btn_forget", icon=":material/delete:", on_click=tv._on_forget,
                      disabled=not mine,
                      help="Remove it from the list (and its autosave); saved checkpoints stay" if mine else
                      "Only the browser that started the run can forget it (or one that took it over)")


if fresh:
    config_box()
if state in (*ACTIVE, INTERRUPTED):  # from the first page drawn after Start, before the job's trainer exists
    with expander("Change while running: β, schedule, free bits, lr, clipping", "exp_live", icon=":material/tune:"):
        tv.live_settings(job)
if job is None:
    runs_box()
    st.info("Pick a preset and press **Start**. “fast demo” trains in about 20 s at a lecture pace; “reproduce "
            "KL collapse” shows every latent dimension dying; the two “fix it” presets bring them back.")
    busy = [j for j in tv.registry().jobs() if j.state in ACTIVE]
    if busy:  # a new tab, or another session's runs: say they exist, and how to watch one
        st.caption(f"{len(busy)} run(s) already on this server ({', '.join(j.name for j in busy[:3])}"
                   f"{', …' if len(busy) > 3 else ''}): pick one in **Run** above to watch it.")
else:
    if ended:
        save_box()
    tv.live_view(job, state)
    if not fresh:
        config_box()
    if ended:
        runs_box()
    else:
        c1, c2 = st.columns(2)
        save_box(c1)
        runs_box(c2)
