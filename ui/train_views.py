"""The Train page's pieces: the configuration (presets and every trainer option), the run controls, the settings that
change mid-run, the live view (a fragment that polls the job's snapshot) and saving/downloading.

State: the run on screen is the URL's ?run=<id> (st.query_params), so a reload or a shared link reattaches to it;
coming back to the page without one (the sidebar's link) puts back the run this session watched last (restore_run).
Every run lives in the process-wide registry (ui.core.get_registry); a button only ever acts on the run on screen.
Buttons use callbacks (they run before the page), so what the page then draws already shows their effect.
"""
from __future__ import annotations

import functools
import io
import os
import re
import time

import numpy as np
import streamlit as st
import torch

from ui import core
from ui.core import (_load_file_model, _load_run_model, check_range, file_ref, get_dataset, presenting,
                     recon_and_samples, save_user_checkpoint, select_model, tile, validate_name)
from ui.train_figures import CHART_CONFIG, collapse_figure, compare_figure, curves_figure, points_figure
from vae.config import ARCHS, DECODERS, LIKELIHOODS, SCHEDULES, TrainConfig, parse_hidden
from vae.data import DATASETS
from vae.device import available_devices
from vae.jobs import ACTIVE, FAILED, INTERRUPTED, PAUSED, QUEUED, RUNNING, Job
from vae.metrics import CAPACITY_HINT, detect_collapse, detect_instability, format_duration, history_csv
from vae.presets import PRESETS, model_config_for

POLL_S = float(os.environ.get("VAE_POLL_S", "1.0"))  # how often the live status redraws while a run is active
CHART_POLL_S = float(os.environ.get("VAE_CHART_POLL_S", "3.0"))  # ... and the live charts and image grids
# while the view polls, charts are static images of SVG (no hover/zoom layers): a browser redraw then costs far less
# CPU, which on a small machine is CPU the training thread gets back. Interactive again once the run has ended.
LIVE_CHART_CONFIG = {**CHART_CONFIG, "staticPlot": True}
IMAGE_EVERY_S = CHART_POLL_S  # while running, the image grids follow each epoch, but change at most this often
SMOOTHING = (0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.99)  # the curves' exponential moving average
SPEEDS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)  # slow motion: seconds of delay after every step
N_IMAGES = 16
STATE_BADGE = {"queued": ("gray", ":material/schedule:"), "running": ("green", ":material/play_arrow:"),
               "paused": ("orange", ":material/pause:"), "finished": ("blue", ":material/check:"),
               "stopped": ("gray", ":material/stop:"), "failed": ("red", ":material/error:"),
               "interrupted": ("violet", ":material/restart_alt:")}

# ---- configuration -----------------------------------------------------------------------------------------------
# widget key -> (TrainConfig / ModelConfig field, default when a preset does not set it)
TRAIN_FIELDS = {"cfg_dataset": "dataset", "cfg_epochs": "epochs", "cfg_batch_size": "batch_size", "cfg_lr": "lr",
                "cfg_beta": "beta", "cfg_beta_schedule": "beta_schedule", "cfg_warmup_epochs": "warmup_epochs",
                "cfg_cycles": "cycles", "cfg_cycle_ratio": "cycle_ratio", "cfg_capacity_max": "capacity_max",
                "cfg_free_bits": "free_bits", "cfg_seed": "seed", "cfg_grad_clip": "grad_clip",
                "cfg_binarize": "binarize"}
MODEL_FIELDS = {"cfg_arch": "arch", "cfg_latent_dim": "latent_dim", "cfg_likelihood": "likelihood",
                "cfg_decoder": "decoder", "cfg_sigma": "sigma"}
OPTION_LABELS = {"cfg_hidden": "Hidden sizes", "cfg_dataset": "Dataset", "cfg_arch": "Architecture",
                 "cfg_likelihood": "Likelihood", "cfg_decoder": "Decoder", "cfg_beta_schedule": "β schedule",
                 "cfg_binarize": "Binarize", "cfg_device": "Device", "cfg_name": "Run name",
                 "train_delay": "Slow motion"}
# widget key -> (label, lowest, highest) of the number options. The widgets take any number and these are checked on
# the server: a browser refuses a value outside a widget's own min/max with only a small red mark and keeps sending
# the old value, so Start would run on numbers the user no longer sees. Here a bad value gets a one-line message
# under the options, and Start refuses it.
LIMITS = {"cfg_max_examples": ("Examples", 0, 1_000_000), "cfg_latent_dim": ("Latent dim d", 1, 1024),
          "cfg_sigma": ("σ (fixed)", 0.001, 10.0), "cfg_beta": ("β", 0.0, 1000.0),
          "cfg_warmup_epochs": ("Warm-up / C ramp (epochs)", 0.1, 10_000.0), "cfg_cycles": ("Cycles M", 1, 1000),
          "cfg_cycle_ratio": ("Rising fraction R", 0.01, 1.0), "cfg_capacity_max": ("C_max (nats)", 0.0, 10_000.0),
          "cfg_free_bits": ("Free bits λ", 0.0, 100.0), "cfg_lr": ("Learning rate", 1e-6, 1.0),
          "cfg_batch_size": ("Batch size", 1, 100_000), "cfg_epochs": ("Epochs", 1, 100_000),
          "cfg_seed": ("Seed", 0, 2**31 - 1), "cfg_grad_clip": ("Grad clip", 0.0, 1e6)}


def check_limits(values: dict, labels: dict | None = None) -> None:
    """ValueError (one line: the option, the value, the range) for the first number outside LIMITS; values maps
    widget keys (or labels) to what the widgets hold; labels: a key's label as the page shows it now."""
    by_label = {label: (label, lo, hi) for label, lo, hi in LIMITS.values()}
    errors, names = [], []
    for key, value in values.items():
        label, lo, hi = LIMITS.get(key) or by_label[key]
        label = (labels or {}).get(key, label)
        try:
            check_range(label, value, lo, hi)
        except ValueError as exc:
            errors.append(str(exc))
            names.append(label)
    if errors:  # the first in full, the others by name: one line that still lists every box to fix
        raise ValueError(errors[0] + (f" (also out of range: {', '.join(names[1:])})" if len(errors) > 1 else ""))


def _defaults() -> dict:
    t = TrainConfig()
    d = {k: getattr(t, f) for k, f in TRAIN_FIELDS.items()}
    d["cfg_capacity_max"] = float(CAPACITY_HINT["digits"])  # the page's data set: 25 nats (the CLI's) is far too many
    d.update(cfg_arch="mlp", cfg_hidden="256,128", cfg_latent_dim=16, cfg_likelihood="auto",
             cfg_decoder="standard", cfg_sigma=0.1, cfg_device="auto", cfg_max_examples=0, cfg_name="")
    return d


def preset_values(name: str) -> dict:
    """widget key -> value for a preset (unset options at their defaults), its pace included."""
    p = PRESETS[name]
    values = _defaults()
    for k, f in TRAIN_FIELDS.items():
        if f in p["train"]:
            values[k] = p["train"][f]
    for k, f in MODEL_FIELDS.items():
        if f in p["model"]:
            values[k] = p["model"][f]
    values["cfg_hidden"] = ",".join(str(h) for h in p["model"].get("hidden", (256, 128)))
    values = {k: float(v) if isinstance(v, float) else v for k, v in values.items()}
    # its pace: at full speed a preset run ends before the charts' first redraw, too fast to watch in a lecture.
    # The config panel is locked while a run is active, so this never changes a running job's slider.
    values["train_delay"] = p.get("delay_s", 0.0)
    return values


def apply_preset(name: str):
    """Fill the configuration widgets (and the slow-motion slider) with a preset."""
    values = preset_values(name)
    for k, v in values.items():
        st.session_state[k] = v
    st.session_state["_cfg_dataset_was"] = values["cfg_dataset"]


def preset_edits(name: str) -> list[str]:
    """The options (as the page labels them) that no longer hold the preset's values."""
    s, labels = st.session_state, {**{k: v[0] for k, v in LIMITS.items()}, **OPTION_LABELS}
    hidden = set(LIMITS) - shown_numbers(s)[0]  # an option not on screen has no effect on the run
    return [labels.get(k, k) for k, v in preset_values(name).items() if k not in hidden and k in s and s[k] != v]


def _on_reapply():
    name = st.session_state.get("train_preset")
    if name in PRESETS:
        apply_preset(name)


def run_values(train_config: dict, model_config: dict) -> dict:
    """widget key -> value holding a run's own options (what Start would run again)."""
    values = _defaults()
    for k, f in TRAIN_FIELDS.items():
        if f in train_config:
            values[k] = train_config[f]
    for k, f in MODEL_FIELDS.items():
        if f in model_config:
            values[k] = model_config[f]
    values["cfg_hidden"] = ",".join(str(h) for h in model_config.get("hidden", (256, 128)))
    values["cfg_max_examples"] = int(train_config.get("max_examples") or 0)
    values["cfg_device"] = train_config.get("device", "auto")
    return {k: float(v) if isinstance(v, float) else v for k, v in values.items()}


def init_options():
    """On a first visit, the options of the "fast demo" preset (and its pace); on a first visit by a link to a run
    (a reload, a shared link), that run's own options, so that the panel shows what is on screen. Called before the
    controls: a preset sets the slow-motion slider, which cannot change once drawn."""
    if "cfg_dataset" in st.session_state:
        return
    job = registry().get(str(st.query_params.get("run") or ""))
    if job is not None and job.model_config is not None:  # (its settings only: no history copied, none attached)
        values = run_values(job.train_config.to_dict(), job.model_config.to_dict())
        if values["cfg_device"] in ("auto", *available_devices()):
            for k, v in values.items():
                st.session_state[k] = v
            st.session_state["_cfg_dataset_was"] = values["cfg_dataset"]
            return
    apply_preset("fast demo")
    st.session_state["train_preset"] = "fast demo"


def _on_dataset():
    """C_max and the likelihood follow the data set while they hold the previous one's suggestion (a value the
    user picked stays): a preset's Bernoulli likelihood kept for the moons' points collapsed every run at β = 1."""
    s = st.session_state
    new, old = s.get("cfg_dataset"), s.get("_cfg_dataset_was", "digits")
    if s.get("cfg_capacity_max") == float(CAPACITY_HINT.get(old, 25)):
        s["cfg_capacity_max"] = float(CAPACITY_HINT.get(new, 25))
    if old in DATASETS and new in DATASETS and s.get("cfg_likelihood") == DATASETS[old].default_likelihood:
        s["cfg_likelihood"] = DATASETS[new].default_likelihood
    s["_cfg_dataset_was"] = new


def _on_preset():
    name = st.session_state.get("train_preset")
    if name in PRESETS:  # cleared (its x, or Escape): the options stay as they are
        apply_preset(name)


def shown_numbers(s) -> tuple[set, dict]:
    """The number options the page shows for the schedule and likelihood picked, and their labels where they
    depend on them: config_panel draws these, configs_from_state checks these."""
    sched, lik = s.get("cfg_beta_schedule", "constant"), s.get("cfg_likelihood", "auto")
    hidden = set()
    if lik != "gaussian":
        hidden.add("cfg_sigma")
    if sched not in ("linear", "logistic", "capacity"):
        hidden.add("cfg_warmup_epochs")
    if sched != "cyclical":
        hidden |= {"cfg_cycles", "cfg_cycle_ratio"}
    if sched != "capacity":
        hidden.add("cfg_capacity_max")
    labels = ({"cfg_beta": "γ (capacity weight)", "cfg_warmup_epochs": "C ramp (epochs)"} if sched == "capacity"
              else {"cfg_beta": "β (target)", "cfg_warmup_epochs": "Warm-up (epochs)"})
    return set(LIMITS) - hidden, labels


def configs_from_state():
    """(TrainConfig, ModelConfig, run name) from the widgets. ValueError (one line, naming the field) if bad. An
    option not on screen for the schedule or likelihood picked (no effect on the run) that holds a value out of
    range is taken at its default: a message about a box the user cannot see would only puzzle."""
    s = st.session_state
    d = _defaults()
    shown, labels = shown_numbers(s)

    def get(k):
        if k == "cfg_binarize" and "cfg_sigma" in shown:  # the σ box stands in its place: a Gaussian decoder's
            return False                                   # data is never binarised by a toggle the user cannot see
        v = s.get(k, d[k])
        if k in LIMITS and k not in shown and (v is None or not LIMITS[k][1] <= v <= LIMITS[k][2]):
            return d[k]
        return v

    try:
        check_limits({k: get(k) for k in LIMITS if k in shown}, labels)
    except ValueError as exc:  # the text boxes too: the one line names every box to fix
        others = [label for key, label, check in (("cfg_hidden", "Hidden sizes", parse_hidden),
                                                 ("cfg_name", "Run name", lambda v: v.strip() and validate_name(v)))
                  if not _passes(check, get(key) or "")]
        raise ValueError(str(exc) + (f" (also not allowed: {', '.join(others)})" if others else "")) from None
    max_ex = int(get("cfg_max_examples") or 0)
    try:
        tc = TrainConfig(**{f: get(k) for k, f in TRAIN_FIELDS.items()}, device=get("cfg_device"),
                         max_examples=max_ex or None)
        mc = model_config_for(tc.dataset, likelihood=get("cfg_likelihood"), arch=get("cfg_arch"),
                              hidden=parse_hidden(get("cfg_hidden")), latent_dim=get("cfg_latent_dim"),
                              decoder=get("cfg_decoder"), sigma=get("cfg_sigma"))
    except ValueError as exc:
        raise ValueError(_as_labelled(str(exc), labels)) from None
    name = (get("cfg_name") or "").strip()
    if name:
        name = validate_name(name)  # a run name may become a checkpoint name
    else:
        name = auto_name(tc, mc)
    return tc, mc, name


def _passes(check, value) -> bool:
    try:
        check(value)
    except ValueError:
        return False
    return True


def _as_labelled(text: str, labels: dict) -> str:
    """A config error ("hidden=0 is not allowed: ...") with the option named as the page shows it ("Hidden sizes =
    0 is not allowed: ...")."""
    m = re.match(r"(\w+)=", text)
    if not m:
        return text
    field = m.group(1)
    key = next((k for k, f in {**TRAIN_FIELDS, **MODEL_FIELDS, "cfg_hidden": "hidden"}.items() if f == field), None)
    label = labels.get(key) or (LIMITS[key][0] if key in LIMITS else OPTION_LABELS.get(key))
    return f"{label} = {text[m.end():]}" if label else text


def auto_name(tc: TrainConfig, mc) -> str:
    parts = [tc.dataset, f"z{mc.latent_dim}", f"b{tc.beta:g}"]
    if tc.beta_schedule != "constant":
        parts.append(tc.beta_schedule)
    if tc.free_bits:
        parts.append(f"fb{tc.free_bits:g}")
    if mc.decoder != "standard":
        parts.append("ar")
    return "-".join(parts)


def config_panel(locked: bool):
    """Every trainer option, in three groups. locked: a run is active (the options then shape the next run)."""
    keep = dict(persist_state="session")  # hidden options keep their values
    c1, c2 = st.columns([1, 2], vertical_alignment="bottom")
    c1.selectbox("Preset", list(PRESETS), key="train_preset", on_change=_on_preset, index=None,
                 placeholder="choose a preset…", help="Fills in the options below; edit them freely afterwards",
                 **keep)
    name = st.session_state.get("train_preset")
    if name in PRESETS:
        edits = [] if locked else preset_edits(name)
        if edits:  # the description would no longer be true of these options
            d1, d2 = c2.columns([3, 1], vertical_alignment="center")
            more = " …" if len(edits) > 4 else ""
            d1.caption(f"Edited since “{name}” was applied: {', '.join(edits[:4])}{more}.")
            d2.button("Apply it again", key="btn_reapply", on_click=_on_reapply, icon=":material/undo:")
        else:
            c2.caption(PRESETS[name]["description"])
    if locked:
        st.caption("These options shape the *next* run (Start, or Step after Reset); use **Change while running** "
                   "for the current one.")
    data_col, beta_col, opt_col = st.columns(3, gap="medium")
    with data_col:
        st.markdown("**Data and model**")
        c1, c2 = st.columns(2)
        c1.selectbox("Dataset", list(DATASETS), key="cfg_dataset", on_change=_on_dataset,
                     help="digits works offline; MNIST-style sets "
                     "need their files (or a network)", **keep)
        c2.number_input("Examples (0 = all)", step=100, key="cfg_max_examples",
                        help="Train on only the first N training examples (0: all of them): quicker runs", **keep)
        c1, c2 = st.columns(2)
        c1.selectbox("Architecture", ARCHS, key="cfg_arch", help="conv needs 28x28 or 8x8 images", **keep)
        c2.text_input("Hidden sizes", key="cfg_hidden", help="comma-separated, e.g. 256,128 (conv: the dense "
                      "layer)", **keep)
        c1, c2 = st.columns(2)
        c1.number_input("Latent dim d", step=1, key="cfg_latent_dim", **keep)
        c2.selectbox("Likelihood p_θ(x|z)", ("auto", *LIKELIHOODS), key="cfg_likelihood",
                     help="auto: the dataset's usual one (Bernoulli for images)", **keep)
        c1, c2 = st.columns(2)
        c1.selectbox("Decoder", DECODERS, key="cfg_decoder", help="autoregressive sees the previous pixels: "
                     "strong enough to ignore z (a classic cause of collapse)", **keep)
        shown, labels = shown_numbers(st.session_state)  # what configs_from_state checks: the same boxes
        if "cfg_sigma" in shown:
            c2.number_input("σ (fixed)", step=0.01, key="cfg_sigma", format="%.3f", **keep)
        else:
            c2.toggle("Binarize", key="cfg_binarize", help="Binarize the data: static Bernoulli binarisation (seeded)",
                      **keep)
    with beta_col:
        st.markdown("**KL term: γ·|KL − C|**" if "cfg_capacity_max" in shown else "**KL weight β**")
        c1, c2 = st.columns(2)
        c1.selectbox("β schedule", SCHEDULES, key="cfg_beta_schedule",
                     help="constant; linear/logistic warm-up (Bowman et al. 2016); cyclical (Fu et al. 2019); "
                          "capacity annealing (Burgess et al. 2018)", **keep)
        c2.number_input(labels["cfg_beta"], step=0.5, key="cfg_beta", format="%.2f", **keep)
        c1, c2 = st.columns(2)
        if "cfg_warmup_epochs" in shown:
            c1.number_input(labels["cfg_warmup_epochs"], step=1.0,
                            key="cfg_warmup_epochs", format="%.1f", **keep)
        if "cfg_cycles" in shown:
            c1.number_input("Cycles M", step=1, key="cfg_cycles", **keep)
            c2.number_input("Rising fraction R", step=0.05, key="cfg_cycle_ratio", format="%.2f",
                            **keep)
        if "cfg_capacity_max" in shown:
            c2.number_input("C_max (nats)", step=1.0, key="cfg_capacity_max", format="%.1f",
                            help="About the KL a good β = 1 model of the data carries: ~4 nats on digits, ~25 on "
                                 "28×28 images (Burgess et al. 2018). A larger C forces more KL than the data needs "
                                 "and lowers the ELBO", **keep)
        st.number_input("Free bits λ (nats per dimension)", step=0.1, key="cfg_free_bits",
                        format="%.2f", help="KL term = Σ_d max(λ, batch-mean KL_d) (Kingma et al. 2016); 0 = off",
                        **keep)
    with opt_col:
        st.markdown("**Optimisation**")
        c1, c2 = st.columns(2)
        c1.number_input("Learning rate", step=5e-4, key="cfg_lr", format="%g", help="Adam", **keep)
        c2.number_input("Batch size", step=16, key="cfg_batch_size", **keep)
        c1, c2 = st.columns(2)
        c1.number_input("Epochs", step=5, key="cfg_epochs", **keep)
        c2.number_input("Seed", step=1, key="cfg_seed", **keep)
        c1, c2 = st.columns(2)
        c1.selectbox("Device", ["auto", *available_devices()], key="cfg_device",
                     help="auto: cuda, then mps, then cpu; only devices this machine has", **keep)
        c2.number_input("Grad clip (0 = off)", step=1.0, key="cfg_grad_clip", format="%.1f", **keep)
        st.text_input("Run name (optional)", key="cfg_name",
                      help="letters, digits, . _ - ; empty: a name from the settings", **keep)
    try:
        configs_from_state()
    except ValueError as exc:
        if st.session_state.pop("_refused_now", None) != str(exc):  # Start's own message says it already
            st.error(f"{exc}. Start refuses these options until it is fixed.", icon=":material/error:")


# ---- the run on screen -------------------------------------------------------------------------------------------
def registry():
    return core.get_registry()


def current_job() -> Job | None:
    return registry().get(st.query_params.get("run"))


def set_run(job_id: str | None):
    st.session_state["_train_run"] = job_id or None
    if job_id:
        st.query_params["run"] = job_id
    elif "run" in st.query_params:
        del st.query_params["run"]


def restore_run():
    """The run on screen follows ?run= in the URL; the sidebar's link to this page has none, so coming back from
    another page puts back the run this session last watched (if the server still has it)."""
    requested = st.query_params.get("run")
    if requested:
        st.session_state["_train_run"] = requested
    elif st.session_state.get("_train_run"):
        if registry().get(st.session_state["_train_run"]) is not None:
            st.query_params["run"] = st.session_state["_train_run"]
        else:
            st.session_state["_train_run"] = None


def _msg(kind: str, text: str):
    st.session_state["_train_msg"] = (kind, text)


def show_messages():
    kind, text = st.session_state.pop("_train_msg", (None, None))
    if text:
        getattr(st, kind)(text)


def _is_fresh(job: Job | None) -> bool:
    """A run Step made in this session with no run on screen (after Reset) that has not been resumed yet: Start goes
    on with it while the options are the same."""
    # queued (paused) when the cap was full at Step: still the prepared run, not one to start a second run beside
    return (job is not None and st.session_state.get("_prepared_run") == job.id
            and held_paused(job.state, job))


def held_paused(state: str, job: Job) -> bool:
    """Paused, or queued to start paused (Step or Pause while the cap was full)."""
    return state == PAUSED or (state == QUEUED and job.pause_requested)


def _submit(start_paused: bool) -> Job | None:
    try:
        tc, mc, name = configs_from_state()
    except ValueError as exc:
        _msg("error", f"Not started: {exc}")
        st.session_state["_refused_now"] = str(exc)  # the options panel does not say it a second time
        return None
    _, err = get_dataset(tc.dataset, "test", tc.binarize)
    if err:
        _msg("error", f"Not started: {err}")
        return None
    if not (st.session_state.get("cfg_name") or "").strip():  # an automatic name: one no run on the server has
        taken, base, i = {j.name for j in registry().jobs()}, name, 2
        while name in taken:
            name, i = f"{base}-run{i}", i + 1
    job = registry().submit(tc, mc, name=name, start_paused=start_paused, owner=core.browser_id())
    job.set_delay(st.session_state.get("train_delay", 0.0))
    core.claim(job.id)
    set_run(job.id)
    return job


WATCH_ONLY = ("“{name}” was started in another browser session: you are watching it, and its controls are its "
              "owner's. **Take over** to control it from here.")


def _mine(job: Job) -> bool:
    """A control's callback acts on the run only where this browser controls it (the buttons are disabled
    elsewhere; a page drawn before another session took over can still send a click)."""
    if core.owns(job):
        return True
    _msg("warning", WATCH_ONLY.format(name=job.name))
    return False


def _on_take_over():
    job = current_job()
    if job is not None:
        core.claim(job.id)
        _msg("info", f"You control “{job.name}” from here now; whoever started it still can too.")


def _discard_fresh(job: Job):
    """Stop a run Step prepared; forget it too if it never took a step (it would only clutter the list)."""
    st.session_state.pop("_prepared_run", None)
    never_ran = job.trainer is None or job.trainer.step_count == 0
    job.stop()
    if never_ran and job.join(5):
        try:
            registry().remove(job.id)
        except ValueError:
            pass


def _on_start():
    job = current_job()
    if _is_fresh(job):
        try:
            tc, mc, _ = configs_from_state()
        except ValueError as exc:
            _msg("error", f"Not started: {exc}")
            st.session_state["_refused_now"] = str(exc)
            return
        if job.train_config.to_dict() == tc.to_dict() and job.model_config.to_dict() == mc.to_dict():
            st.session_state.pop("_prepared_run", None)
            job.resume()  # Step prepared exactly this run: go on with it
            return
        _discard_fresh(job)
    elif job is not None and job.state in ACTIVE:  # a second run beside it: say where the first one went
        paused, mine = held_paused(job.state, job), core.owns(job)
        if _submit(start_paused=False) is not None:
            _msg("info", f"A new run started. “{job.name}” goes on {'paused ' if paused else ''}in the background: "
                         "pick it under **Run** to watch it again" + (" (or to stop it)." if mine else "."))
        return
    _submit(start_paused=False)


def _on_pause_resume(want_pause: bool):
    """Does what the button said when it was clicked: another tab may have paused or resumed the run since this one
    was drawn, and a click on "Pause" must never resume it (nor "Resume" pause it)."""
    job = current_job()
    if job is None or not _mine(job):
        return
    paused_now = job.state == INTERRUPTED or held_paused(job.state, job)
    if want_pause and not paused_now:
        job.pause()
    elif not want_pause and paused_now:
        job.resume()


STEP_WAIT_S = 1.0  # Step waits this long at most for its batch, so that the page drawn next shows it


def _on_step():
    """One batch, then paused. Waits (briefly) until the step is done: the page then draws it at once, where the
    charts would otherwise show it only at their next poll, seconds later, or not at all after a Reset."""
    job = current_job()
    if job is None:  # after Reset (or on a fresh page): a new run with the options, paused after its first batch
        job = _submit(start_paused=True)
        if job is None:
            return
        st.session_state["_prepared_run"] = job.id  # Start goes on with it while the options stay the same
    elif not _mine(job):
        return
    if job.state in ACTIVE or job.state == INTERRUPTED:
        before = job.snapshot(steps=False).step
        job.step_once()
        deadline = time.monotonic() + STEP_WAIT_S
        while job.snapshot(steps=False).step <= before and time.monotonic() < deadline:
            time.sleep(0.02)


def _on_stop():
    """Stops the run on screen, where this browser controls it (never another session's run, a student's on the
    lecturer's shared link: that one needs Take over first)."""
    job = current_job()
    if job is not None and _mine(job):
        job.stop()


def _on_reset():
    """Back to epoch 0: stop the run on screen (it stays in the list; one another session started goes on) and show
    the options for a fresh run; Start runs it, Step takes its first batch. No run is made until then: a prepared
    run held one of the server's places while it waited (two students' Resets blocked every other run)."""
    job = current_job()
    if _is_fresh(job):
        _discard_fresh(job)
    elif job is not None and job.state in ACTIVE:
        if core.owns(job):
            job.stop()
        else:  # someone else's run goes on: only this session's view leaves it
            _msg("info", f"“{job.name}” was started in another browser session and goes on: pick it under **Run** "
                         "to watch it again.")
    set_run(None)
    if not st.session_state.get("_train_msg"):
        _msg("info", "Back to epoch 0: **Start** runs a fresh run with these options, **Step** takes its first "
                     "batch and pauses.")


def _on_delay():
    job = current_job()
    if job is not None and _mine(job):
        job.set_delay(st.session_state["train_delay"])


def _on_pick_run():
    picked = st.session_state.get("run_pick") or None
    if picked and registry().get(picked) is None:
        # a browser can send back an option's label rather than its value (a selectbox whose labels changed
        # under it): the id is its last part; anything else is no run, and the URL keeps the run it had
        picked = picked.rsplit(" · ", 1)[-1].strip()
        if registry().get(picked) is None:
            return
    set_run(picked)


def _on_forget():
    job = current_job()
    if job is None or not _mine(job):
        return
    try:
        registry().remove(job.id)
    except ValueError as exc:
        _msg("warning", str(exc))
        return
    set_run(None)


def run_picker(job: Job | None, where=st):
    """The runs on this server (newest first); picking one reattaches to it (and puts it in the URL)."""
    jobs = list(reversed(registry().jobs()))
    ids = [""] + [j.id for j in jobs]
    # labels that do not change while a run goes on (its state is in the badge and the run list): a selectbox whose
    # labels change under it can send back a stale label instead of the run's id
    names = {j.id: f"{j.name} · {j.id}" for j in jobs}
    st.session_state["run_pick"] = job.id if job is not None else ""
    where.selectbox("Run", ids, key="run_pick", on_change=_on_pick_run,
                    format_func=lambda i: names.get(i, "— new run —"),
                    help="Every run on this server. Runs go on in the background: switch pages, reload or close "
                         "the tab, and pick the run here again. Its id is in the URL (?run=…), so a reload or a "
                         "shared link reattaches to it")


def controls(job: Job | None, state: str | None = None):
    """The run picker and the slow-motion speed, then a row of Start, Pause/Resume, Step, Stop and Reset (two rows:
    in one, on a 1024-px projector, the buttons were cut to their icons). state: the job's state as the page read it
    (default: now)."""
    if state is None and job is not None:
        state = job.state
    top = st.columns([3, 2], vertical_alignment="bottom")
    run_picker(job, top[0])
    # the job's own delay whenever the slider shows another run, or comes back (Streamlit dropped it on another page)
    if job is not None and (st.session_state.get("_delay_for") != job.id or "train_delay" not in st.session_state):
        st.session_state["train_delay"] = min(SPEEDS, key=lambda s: abs(s - job.delay_s))
        st.session_state["_delay_for"] = job.id
    mine = job is None or core.owns(job)  # another session's run is watch-only here until taken over
    top[1].select_slider("Slow motion (pause per step)", SPEEDS, key="train_delay", on_change=_on_delay,
                         format_func=lambda s: "off" if s == 0 else f"{s:g} s", disabled=not mine,
                         help="For lectures: slow the run down to watch single steps; Step runs one batch")
    cols = st.columns(5)
    cols[0].button("Start", key="btn_start", type="primary", icon=":material/play_arrow:", on_click=_on_start,
                   width="stretch", help="Start a new run with the options in Configuration (a run on screen goes "
                                         "on in the background: Resume goes on with a paused one)")
    paused = state == INTERRUPTED or held_paused(state, job)
    live = state in (*ACTIVE, INTERRUPTED) and mine
    cols[1].button("Resume" if paused else "Pause", key="btn_pause",
                   icon=":material/play_circle:" if paused else ":material/pause:", on_click=_on_pause_resume,
                   args=(not paused,), disabled=not live, width="stretch")
    cols[2].button("Step", key="btn_step", icon=":material/skip_next:", on_click=_on_step, width="stretch",
                   disabled=not live and job is not None,
                   help="Run one batch, then stay paused (with no run on screen: the first batch of a new run)")
    cols[3].button("Stop", key="btn_stop", icon=":material/stop:", on_click=_on_stop, width="stretch",
                   disabled=not live, help="End this run (its weights stay savable)")
    cols[4].button("Reset", key="btn_reset", icon=":material/restart_alt:", on_click=_on_reset, width="stretch",
                   help="Back to epoch 0: stop this run and show the options for a fresh one (Start runs it, Step "
                        "takes one batch)")
    if not mine:
        with st.container(horizontal=True, vertical_alignment="center", key="watch_only"):
            st.caption(WATCH_ONLY.format(name=job.name))
            st.button("Take over", key="btn_take_over", icon=":material/front_hand:", on_click=_on_take_over,
                      help="Control this run from here: pause, step, stop, change its settings. It stays one run, "
                           "shared: the browser that started it can still control it too")


def live_settings(job: Job):
    """β, its schedule (and the cyclical one's M and R), free bits, lr and gradient clipping of the running job; the
    change is marked on the curves."""
    cfg = job.train_config
    # new widgets (with the new values) after each applied change; a restored run's count is its history's from the
    # first draw on (counted 0 before its trainer was attached, the form's key changed under the first Apply)
    k = f"{job.id}_{job.event_count()}"
    mine = core.owns(job)
    with st.form(f"live_form_{k}", border=False):
        c1, c2, c3 = st.columns(3)
        beta = c1.number_input("β", value=float(cfg.beta), step=0.5, format="%.2f", key=f"live_beta_{k}")
        sched = c2.selectbox("β schedule", SCHEDULES, index=SCHEDULES.index(cfg.beta_schedule),
                             key=f"live_sched_{k}", help="Schedules count steps from the start of the run")
        warm = c3.number_input("Warm-up / C ramp (epochs)", value=float(cfg.warmup_epochs), step=1.0,
                               format="%.1f", key=f"live_warm_{k}")
        fb = c1.number_input("Free bits λ", value=float(cfg.free_bits), step=0.1, format="%.2f",
                             key=f"live_fb_{k}")
        lr = c2.number_input("Learning rate", value=float(cfg.lr), step=5e-4, format="%g",
                             key=f"live_lr_{k}")
        cmax = c3.number_input("C_max (nats)", value=float(cfg.capacity_max), step=1.0, format="%.1f",
                               key=f"live_cmax_{k}")
        # the cyclical schedule's own two (a switch to it used values not on screen), and gradient clipping
        cycles = c1.number_input("Cycles M (cyclical)", value=int(cfg.cycles), step=1, key=f"live_cycles_{k}")
        ratio = c2.number_input("Rising fraction R (cyclical)", value=float(cfg.cycle_ratio), step=0.05,
                                format="%.2f", key=f"live_ratio_{k}")
        clip = c3.number_input("Grad clip (0 = off)", value=float(cfg.grad_clip), step=1.0, format="%.1f",
                               key=f"live_clip_{k}")
        if not mine:
            st.caption("Watch-only: this run was started in another browser session (**Take over** above to "
                       "change it from here).")
        if st.form_submit_button("Apply to the running job", icon=":material/tune:", disabled=not mine):
            try:
                check_limits({"β": beta, "Warm-up / C ramp (epochs)": warm, "Free bits λ": fb, "Learning rate": lr,
                              "C_max (nats)": cmax, "Cycles M": cycles, "Rising fraction R": ratio,
                              "Grad clip": clip})
                text = job.update(beta=beta, beta_schedule=sched, warmup_epochs=warm, free_bits=fb, lr=lr,
                                  capacity_max=cmax, cycles=int(cycles), cycle_ratio=ratio, grad_clip=clip)
            except ValueError as exc:
                st.error(f"Not applied: {exc}")
            else:
                step = job.snapshot().step
                _msg("success", (f"Applied at step {step}: {text}" if step else f"Changed before the first step: "
                                 f"{text}") if text else "Nothing changed")
                st.rerun()


# ---- saving and downloading ----------------------------------------------------------------------------------------
def _checkpoint_bytes(job_id: str) -> bytes:
    job = registry().get(job_id)
    if job is None:
        raise ValueError("the run is gone")
    buf = io.BytesIO()
    torch.save(job.checkpoint(), buf)
    return buf.getvalue()


def _metrics_csv(job_id: str) -> str:
    job = registry().get(job_id)
    return history_csv(job.snapshot().history) if job is not None else ""


def _on_save(job_id: str):
    job = registry().get(job_id)
    if job is None:  # forgotten meanwhile (from another tab)
        _msg("error", f"Not saved: run {job_id!r} is no longer on this server")
        return
    name = st.session_state.get("save_name", "")
    version = job.snapshot(steps=False).weights_version
    saved = st.session_state.setdefault("_saved_as", {})  # run id -> (name, weights version) saved in this session
    same = saved.get(job_id) == (name.strip().removesuffix(".pt"), version)
    if same and (core.USER_DIR / f"{saved[job_id][0]}.pt").exists():
        _msg("info", f"Already saved as {saved[job_id][0]}.pt: the weights have not changed since")
        return
    try:
        path = save_user_checkpoint(name, job.checkpoint(), overwrite=st.session_state.get("save_overwrite", False))
    except ValueError as exc:
        _msg("error", f"Not saved: {exc}")
        return
    except OSError as exc:  # a full disk, a folder not writable: nothing half-written is left (save_checkpoint)
        _msg("error", f"Not saved: could not write to {_shown_dir(core.USER_DIR)} ({exc.strerror or exc}); free "
             "some space or fix the folder's permissions, then Save again")
        return
    saved[job_id] = (path.stem, version)
    _msg("success", f"Saved {path.name} in {_shown_dir(path.parent)}: pick “saved: {path.stem}” in the sidebar on "
         "any page")


def _shown_dir(folder) -> str:
    """A folder as the user knows it: relative to the app's folder when inside it (checkpoints/user)."""
    return file_ref(folder).removeprefix("file:")


def save_panel(job: Job):
    if not job.has_weights:
        st.caption("Nothing to save yet: the run has no weights before it starts.")
        return
    saved = st.session_state.get("_saved_as", {}).get(job.id)
    if st.session_state.get("_save_for") != job.id:
        if saved:  # saved before in this session: that name again (Save then says so; newer weights need
            # "overwrite" or another name)
            st.session_state["save_name"] = saved[0]
        else:
            try:  # a name no saved checkpoint has yet: runs of one preset share a name ("digits-z8-b1")
                st.session_state["save_name"] = core.free_name(core.validate_name(job.name))
            except ValueError:
                st.session_state["save_name"] = job.name
        st.session_state["save_overwrite"] = False  # ticked for one run's name: never carried over to the next
        st.session_state["_save_for"] = job.id
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    c1.text_input("Checkpoint name", key="save_name", persist_state="session",  # kept across pages
                  help=f"Saved in {_shown_dir(core.USER_DIR)} as <name>.pt; letters, digits, . _ - only")
    c2.checkbox("overwrite", key="save_overwrite", persist_state="session")
    b1, b2, b3 = st.columns(3)
    b1.button("Save", key="btn_save", icon=":material/save:", on_click=_on_save, args=(job.id,), width="stretch",
              help="Current weights (for a failed run: the last good ones) with the history so far")
    b2.download_button("Model .pt", functools.partial(_checkpoint_bytes, job.id), file_name=f"{job.name}.pt",
                       mime="application/octet-stream", on_click="ignore", key="dl_ckpt",
                       help="The checkpoint: weights, configuration and history (vae.load_checkpoint reads it; "
                            "upload it in the sidebar of another VAE Explorer)",
                       icon=":material/download:", width="stretch")
    b3.download_button("Metrics .csv", functools.partial(_metrics_csv, job.id), file_name=f"{job.name}.csv",
                       mime="text/csv", on_click="ignore", key="dl_csv", icon=":material/table:",
                       width="stretch")
    if st.button("Show this run on the other pages", key="btn_use", icon=":material/visibility:",
                 help="Selects the run's latest weights in the sidebar model picker"):
        select_model(f"run:{job.id}")


# ---- the live view ---------------------------------------------------------------------------------------------------
def live_view(job: Job, state: str | None = None):
    """Fragments that poll the job while it is active, each redrawing only itself: the status (state, progress,
    ETA, samples/s, figures, collapse banner) every POLL_S; the curves, then (under the curve options and the
    comparison picker, widgets outside the polled parts so that a redraw does not rebuild them) the KL heatmap,
    image grids and comparison, every CHART_POLL_S (a browser redraw of the charts costs far more CPU than the
    numbers; on a small machine that CPU is taken from the training thread). Static once the run has ended."""
    # as the rest of the page saw it: if the run has ended since, the status fragment's first poll sees it and
    # redraws the whole page (with the state read then), so no part of the page is left showing the old state
    active = (state or job.state) in ACTIVE
    st.fragment(run_every=POLL_S if active else None)(_live_status)(job.id, active,
                                                                    (state or job.state, job.pause_requested))
    st.fragment(run_every=CHART_POLL_S if active else None)(_live_charts)(job.id, active)
    # under the curves (they read these from the session state): above them, the row pushed the curves below the
    # fold of a 1280x800 projector
    c1, c2, c3 = st.container(key="stack_liveopts").columns([1, 1.4, 3.2], vertical_alignment="bottom")
    c1.toggle("log scale", key="curves_log", help="NLL and KL on a log axis", persist_state="session")
    c2.select_slider("smoothing", SMOOTHING, value=0.6, key="curves_smooth",
                     persist_state="session", help="Exponential moving average of the per-step train curves")
    options = _compare_options(job)
    c3.multiselect("Compare with earlier runs and checkpoints", list(options), key="compare_runs",
                   format_func=lambda r: options.get(r, r), placeholder="overlay other runs…",
                   help="Test ELBO, KL and active units per epoch of this run and the ones picked")
    st.fragment(run_every=CHART_POLL_S if active else None)(_live_panels)(job.id, active)


def _live_status(job_id: str, polling: bool, drawn: tuple | None = None):
    """drawn: (state, pause asked for) as the rest of the page was drawn with them."""
    job = registry().get(job_id)
    if job is None:
        st.warning(f"run {job_id!r} is no longer on this server")
        return
    snap = job.snapshot(steps=False)  # the per-epoch history is all the status needs
    if polling and not snap.active:
        st.rerun()  # the run ended: redraw the whole page once (controls, run list, charts), then stop polling
    now = (snap.state, job.pause_requested)
    if polling and drawn is not None and {drawn[0], now[0]} <= {RUNNING, PAUSED, QUEUED} and now != drawn:
        st.rerun()  # paused, resumed or started (from the queue) meanwhile, maybe from another tab: the buttons follow
    _status(snap)
    h = snap.history
    if snap.step == 0:
        if snap.state in ACTIVE:
            st.info("Paused before its first step: press **Resume** (or **Step** for one batch)."
                    if snap.state == PAUSED
                    else "Waiting for the first step…" if snap.state != QUEUED else
                    "Queued: the curves appear once the run starts.")
        return
    status = detect_collapse(h, train_config=snap.train_config, model_config=snap.model_config)
    # a run that has gone wrong has not collapsed (its KL may be anything): the charts' warning says what happened
    broken = detect_instability({"epoch": h.get("epoch", {})}, snap.model_config, snap.train_config)
    if status.collapsed and broken is None:  # one line, the remedies in a popover (they pushed the curves down)
        what, _, why = status.reason.partition("; ")  # the facts on the banner, what they mean in the popover
        banner, tips = st.columns([5, 1], vertical_alignment="center")
        banner.error(f"**KL collapse detected.** {what}.", icon=":material/warning:")
        with tips.popover("What to try", icon=":material/healing:", width="stretch"):
            if why:  # "q_φ(z|x) ≈ p(z) for every x, ...": not capitalised (q_φ is not Q_φ)
                st.markdown(f"Here {why}.")
            st.markdown("\n".join(f"- {r}" for r in status.remedies))


def _live_charts(job_id: str, polling: bool):
    job = registry().get(job_id)
    if job is None:
        return
    snap = job.snapshot()
    h = snap.history
    if not h["step"]["step"]:
        return
    unstable = detect_instability(h, snap.model_config, snap.train_config)  # needs the steps: here, not in the status
    if unstable:
        st.warning(unstable, icon=":material/trending_up:")
    log_y, smooth = st.session_state.get("curves_log", False), st.session_state.get("curves_smooth", 0.6)
    cfg = LIVE_CHART_CONFIG if polling else CHART_CONFIG
    st.plotly_chart(curves_figure(h, snap.steps_per_epoch, smooth, log_y, train_config=snap.train_config),
                    key="fig_curves", config=cfg)
    st.caption("Train: per step (one batch, one z sample), smoothed. Test: per epoch on the test split. Dashed lines "
               "mark changes made while the run went on. All in nats per example."
               + (f" Charts redraw every {CHART_POLL_S:g} s while the run goes on." if polling else ""))


def _live_panels(job_id: str, polling: bool):
    """The per-dimension KL heatmap with the active units, the image grids and the comparison: under the curves'
    options (their own fragment, so that the options sit right under the curves they change)."""
    job = registry().get(job_id)
    if job is None:
        return
    snap = job.snapshot(steps=False)  # epochs, images and weights: not the per-step curves
    h = snap.history
    if snap.step == 0:
        return
    cfg = LIVE_CHART_CONFIG if polling else CHART_CONFIG
    left, right = st.container(key="stack_live").columns([1.3, 1])  # stacked when narrow (ui.core's CSS)
    with left:
        if not h["epoch"]["epoch"]:
            st.caption("The per-dimension KL heatmap (the collapse view) appears after the first epoch.")
        else:
            st.plotly_chart(collapse_figure(h), key="fig_collapse", config=cfg)
            e = h["epoch"]
            au, d = e["active_units"][-1], len(e["test_kl_per_dim"][-1])
            dead = sum(1 for v in e["test_kl_per_dim"][-1] if v < 0.01)
            st.caption(f"**{au}/{d} active units**: dimensions whose encoder mean moves with the input "
                       f"(Var_x E_q[z_d] > 0.01). **{d - dead}/{d}** carry at least 0.01 nats of KL."
                       + (" The two counts are different tests and can disagree near their thresholds."
                          if au != d - dead else "")
                       + " Colours are on a log scale: a dark row (≈ 0.001 nats) is a dimension the decoder no "
                         "longer gets information through.")
    with right:
        _images(job, snap)
    _compare(job, h)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def _status(snap):
    color, icon = STATE_BADGE.get(snap.state, ("gray", None))
    badge, bar = st.columns([1, 2.2], vertical_alignment="bottom") if snap.total_steps else (st, None)
    badge.badge(f"{snap.name} · {snap.state}", color=color, icon=icon)
    hold = _minutes(registry().pause_hold_s)
    if snap.state == QUEUED:
        holding = [j for j in registry().running() if j.state in (RUNNING, PAUSED)]
        who = ", ".join(f"“{j.name}” ({j.state})" for j in holding)
        paused = any(j.state == PAUSED for j in holding)
        released = snap.extra.get("released")
        st.info(f"Queued: place {snap.queue_position} in the queue. The server runs at most "
                f"{registry().max_concurrent} jobs at once; this one "
                + ("was paused long enough to give its place to waiting runs, and goes on where it stopped when "
                   "another ends." if released else "starts when another ends (it is never dropped).")
                + (f" Holding a place now: {who}." if who else "")
                + (f" A run paused for {hold} gives its place to the queue." if paused else ""))
    elif snap.state == PAUSED and snap.extra.get("released"):
        st.caption(f"Paused for over {hold} while other runs waited: its place went to them. **Resume** puts it "
                   "back in the queue; **Step** still runs single batches.")
    if snap.state == FAILED:
        step = snap.extra.get("failed_step")
        st.error(f"**The run failed**{f' at step {step}' if step is not None else ''}: {snap.error}  \n"
                 "The last good weights are kept: save or download them under **Save and download**.",
                 icon=":material/error:")
        if snap.extra.get("traceback"):
            with st.expander("Details (traceback)"):
                st.code(snap.extra["traceback"], language=None)
    if snap.state == INTERRUPTED:
        st.info("This run was interrupted by a server restart before it started (it was queued, or in its first "
                "epoch): **Resume** starts it." if snap.extra.get("not_started") else
                "This run was interrupted by a server restart; its last autosave (end of an epoch) is loaded. "
                "Resume goes on from there.")
    for k in ("autosave_error", "restore_error"):
        if snap.extra.get(k):
            st.warning(snap.extra[k])
    if bar is not None:
        bar.progress(snap.progress, text=f"epoch {snap.epoch}/{snap.epochs} · step {snap.step}/{snap.total_steps}")
    h = snap.history["epoch"]
    m = st.columns(5)
    # two rates: the label says which (246 in slow motion, then 31,094 after Stop, read as the same figure)
    m[0].metric("samples/s" if snap.live_rate or not snap.samples_per_s else "samples/s (steps alone)",
                f"{snap.samples_per_s:,.0f}" if snap.samples_per_s else "–",
                help="While it runs: the live rate over the last steps (wall clock, slow-motion pauses included). "
                     "Paused, stopped or finished: the last epoch's rate of training steps alone (no pauses, no "
                     "test evaluation)")
    m[1].metric("ETA", format_duration(snap.eta_s) if snap.state == RUNNING else "–")
    m[2].metric("test ELBO (nats)", core.nats2(h["test_elbo"][-1]) if h["test_elbo"] else "–",
                help="Negative for a Bernoulli decoder (a probability). A Gaussian decoder's log p(x|z) is a "
                     "density, which can exceed 1, so its ELBO can be positive")
    m[3].metric("test KL (nats)", core.nats2(h["test_kl"][-1]) if h["test_kl"] else "–")
    m[4].metric("active units", f"{h['active_units'][-1]}/{len(h['test_kl_per_dim'][-1])}"
                if h["active_units"] else "–")


def _images(job: Job, snap):
    """Test reconstructions and prior samples from the run's weights, refreshed at each epoch while it runs (at most
    every IMAGE_EVERY_S: digits epochs take a fraction of a second, and each grid is a decode and two PNGs for the
    server and the browser), and after every step while it is paused, for slow-motion stepping. The PNGs are kept
    per weights version, so a redraw in between re-sends the same files (no re-encoding, no flicker)."""
    mc = snap.model_config
    if mc is None:
        return
    data, err = get_dataset(snap.train_config["dataset"], "test", snap.train_config.get("binarize", False))
    if data is None:
        st.warning(err)
        return
    version_key = f"e{snap.epoch}" if snap.state == RUNNING else f"v{snap.weights_version}"
    key = (job.id, version_key, presenting())
    cache = st.session_state.setdefault("_train_grids", {})
    fresh = [k for k in cache if k[0] == job.id and k[2] == presenting()]
    if (key not in cache and fresh and snap.state == RUNNING
            and time.monotonic() - st.session_state.get("_train_grids_t", 0.0) < IMAGE_EVERY_S):
        key = fresh[0]  # epochs shorter than IMAGE_EVERY_S: keep the last grids a little longer
    if key not in cache:
        st.session_state["_train_grids_t"] = time.monotonic()
        w = job.latest_weights()
        if w is None:
            return
        cfg, state, version = w
        model = _load_run_model(job.id, version, "cpu", cfg, state)
        points = tuple(mc["image_shape"]) == (2,)
        x = data.x[:300 if points else N_IMAGES].numpy()
        recon, samples = recon_and_samples(f"run:{job.id}:{version}:cpu", model, x, 300 if points else N_IMAGES)
        cache.clear()  # only the newest is ever needed
        cache[key] = _grids(x, recon, samples, tuple(mc["image_shape"]), snap.epoch)
    kind, a, b = cache[key]
    if kind == "points":
        st.plotly_chart(a, key="fig_points", config=CHART_CONFIG)
        return
    st.image(a[0], caption=a[1], width="stretch")
    st.image(b[0], caption=b[1], width="stretch")


def _grids(x, recon, samples, shape, epoch):
    if shape == (2,):
        return "points", points_figure(x, recon, samples), None
    px = 360 if presenting() else 300
    both = tile(np.concatenate([x[:8], recon[:8], x[8:16], recon[8:16]]), shape, ncols=8, target_px=px)
    return ("images", (_png(both), f"test images (rows 1, 3) and their reconstructions (rows 2, 4), epoch {epoch}"),
            (_png(tile(samples, shape, ncols=8, target_px=px)), "samples: z ~ N(0, I), decoded by p_θ"))


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _compare_options(job: Job) -> dict[str, str]:
    """ref -> label of the other runs on this server and the checkpoints, named as the sidebar's model picker names
    them (ui.core.model_options)."""
    return {ref: label for ref, label in core.model_options().items() if ref != f"run:{job.id}"}


def _compare(job: Job, history: dict):
    """Overlay this run's test curves with the runs and checkpoints picked above the live view."""
    picked = st.session_state.get("compare_runs") or []
    if not picked:
        return
    runs = [(f"this run: {job.name}", history, True)]
    labels = _compare_options(job)
    spans = [job.train_config.epochs]  # this run's planned epochs, and the other runs' (not the checkpoints')
    other_data = []
    for ref in picked:
        hist, dataset = _history_of(ref)
        name = labels.get(ref, ref.split(":", 1)[1].rsplit("/", 1)[-1])  # as the picker said (a run's name)
        if hist and dataset not in (None, job.train_config.dataset):
            other_data.append(f"{name} ({dataset})")
        elif hist:
            runs.append((name, hist, False))
            if ref.startswith("run:"):
                spans.append(len(hist["epoch"]["epoch"]))
    if other_data:  # nats per example of other data: an ELBO of 2-D points beside one of 64 pixels means nothing
        st.caption(f"Not overlaid: {', '.join(other_data)}: trained on other data than this run's "
                   f"{job.train_config.dataset}, so their ELBO and KL are not comparable with its.")
    if len(runs) == 1:
        return
    # the axes fit those: a 200-epoch checkpoint beside a 20-epoch run squeezed the run into the left tenth
    longest = max(len(h["epoch"]["epoch"]) for _, h, _ in runs)
    x_max = max(spans) * 1.05 if longest > 2 * max(spans) else None
    st.plotly_chart(compare_figure(runs, x_max), key="fig_compare", config=CHART_CONFIG)
    if x_max:
        st.caption(f"The epoch axes end at this run's {job.train_config.epochs} epochs; longer histories go on "
                   "past the right edge (double-click a chart to see them whole).")


def _history_of(ref: str) -> tuple[dict | None, str | None]:
    """(the history, the dataset it was trained on) of a run or a checkpoint; (None, None) if it is gone."""
    if ref.startswith("run:"):
        j = registry().get(ref[4:])
        if j is None:
            return None, None
        snap = j.snapshot()
        return snap.history, snap.train_config.get("dataset")
    from ui.core import safe_checkpoint_path

    try:
        p = safe_checkpoint_path(ref)
        _, info = _load_file_model(str(p), core.file_stamp(p), "cpu")
    except (ValueError, OSError):
        return None, None
    return info.get("history") or None, info.get("dataset")


def runs_table():
    """All runs on the server, for reattaching; the one on screen can be forgotten once it has ended."""
    rows = []
    for j in reversed(registry().jobs()):
        s = j.snapshot(steps=False)  # the per-epoch history is all the table needs
        e = s.history["epoch"]
        # what tells runs apart first (a half-width panel shows the first few columns without scrolling); numbers
        # stay numbers, so that a click on a header sorts them as numbers ("—" before a run's first epoch)
        rows.append({"name": s.name, "state": s.state,
                     "test ELBO": e["test_elbo"][-1] if e["test_elbo"] else None,
                     "active units": e["active_units"][-1] if e["active_units"] else None,
                     "epoch": s.epoch, "of": s.epochs, "queue": s.queue_position or None,
                     "β": s.train_config["beta"], "schedule": s.train_config["beta_schedule"],
                     "free bits": s.train_config["free_bits"], "id": s.id})
    if not rows:
        st.caption("No runs yet.")
        return
    st.dataframe(rows, hide_index=True, width="stretch", placeholder="—", column_config={
        "test ELBO": st.column_config.NumberColumn(help="at the last epoch, nats per example", format="%.2f"),
        "epoch": st.column_config.NumberColumn(help="epochs done"),
        "of": st.column_config.NumberColumn(help="epochs asked for"),
        "queue": st.column_config.NumberColumn(help="place in the queue while it waits for a free slot",
                                               format="#%d")})
    st.caption(f"Autosaved every epoch to {core.AUTOSAVE_DIR.name}/: after a server restart, runs come back "
               "(active and queued ones as “interrupted”, resumable). Pick a run above to reattach.")
