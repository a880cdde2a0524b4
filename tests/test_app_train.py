"""AppTest for the Train page: every control is there, a short digits run started from the page produces metrics,
the buttons drive the run on screen, and bad input, failures and the queue are shown as one-line messages.

The registry is the page's own (ui.core.get_registry, one per process) pointed at temporary folders; jobs are polled
through it, then the page is rerun (fragment timers do not fire in AppTest).
"""
from __future__ import annotations

import time

import pytest

from apptest_support import new_app_test, open_page
from vae.jobs import FAILED, FINISHED, PAUSED, QUEUED, RUNNING, STOPPED
from vae.presets import model_config_for
from vae.config import TrainConfig

PAGE = "pages/train.py"
CONFIG_KEYS = ("cfg_dataset", "cfg_max_examples", "cfg_arch", "cfg_hidden", "cfg_latent_dim", "cfg_likelihood",
               "cfg_decoder", "cfg_beta_schedule", "cfg_beta", "cfg_free_bits", "cfg_lr", "cfg_batch_size",
               "cfg_epochs", "cfg_seed", "cfg_device", "cfg_grad_clip", "cfg_name")


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """The page's registry, writing into tmp_path; every job is stopped afterwards."""
    import ui.core as core

    monkeypatch.setattr(core, "AUTOSAVE_DIR", tmp_path / "autosave")
    monkeypatch.setattr(core, "USER_DIR", tmp_path / "user")
    core.get_registry.clear()
    reg = core.get_registry()
    yield reg
    reg.shutdown()
    core.get_registry.clear()


def wait_until(pred, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def widget_keys(at) -> set:
    keys = set()
    for kind in ("selectbox", "number_input", "text_input", "toggle", "select_slider", "checkbox", "button"):
        keys |= {w.key for w in getattr(at, kind)}
    return keys


def small_run(at, epochs=3):
    """Fill the form for a short digits run (the fast-demo model on the first 256 examples)."""
    at.number_input(key="cfg_epochs").set_value(epochs)
    at.number_input(key="cfg_max_examples").set_value(256)
    return at


def test_every_control_and_option_is_present(registry):
    at = open_page(PAGE)
    assert not at.exception
    keys = widget_keys(at)
    for k in ("btn_start", "btn_pause", "btn_step", "btn_stop", "btn_reset", "train_delay", "run_pick",
              "train_preset", *CONFIG_KEYS):
        assert k in keys, k
    assert [b.label for b in at.button if b.key.startswith("btn_")][:5] == ["Start", "Pause", "Step", "Stop",
                                                                              "Reset"]
    assert at.selectbox(key="train_preset").value == "fast demo"
    at.selectbox(key="train_preset").set_value("reproduce KL collapse").run()
    assert at.number_input(key="cfg_beta").value == 4.0 and at.number_input(key="cfg_latent_dim").value == 16
    assert at.selectbox(key="cfg_beta_schedule").value == "constant"
    at.selectbox(key="train_preset").set_value("fix it with warm-up").run()
    assert at.selectbox(key="cfg_beta_schedule").value == "linear"
    assert at.number_input(key="cfg_warmup_epochs").value == 10.0  # shown for a warm-up schedule


def test_a_short_run_from_the_page_produces_metrics_and_saves(registry, tmp_path):
    at = small_run(open_page(PAGE))
    at.button(key="btn_start").click().run()
    assert not at.exception and not at.error
    run_id = at.query_params["run"][0] if isinstance(at.query_params["run"], list) else at.query_params["run"]
    job = registry.get(run_id)
    assert job is not None and job.train_config.epochs == 3 and job.train_config.max_examples == 256
    assert job.join(120) and job.state == FINISHED
    at.run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["test ELBO (nats)"]) < 0 and metrics["active units"].endswith("/8")
    assert "epoch 3/3" in at.get("progress")[0].proto.text
    assert len(at.get("plotly_chart")) >= 2  # the curves and the collapse view
    (tmp_path / "user").mkdir(exist_ok=True)
    (tmp_path / "user" / f"{job.name}.pt").write_bytes(b"an earlier run of the same preset")
    at.session_state["_save_for"] = None  # the Save panel fills its name in afresh
    at.run()
    assert at.text_input(key="save_name").value == f"{job.name}-2"  # not the name a saved checkpoint has
    at.text_input(key="save_name").set_value("from-apptest")
    at.button(key="btn_save").click().run()
    assert (tmp_path / "user" / "from-apptest.pt").is_file()
    assert any("Saved from-apptest.pt" in s.value for s in at.success)
    assert any(f"in {tmp_path / 'user'}:" in s.value for s in at.success)  # the folder it went to, named
    at.button(key="btn_save").click().run()  # the same weights again: said, not refused as an existing name
    assert any("Already saved as from-apptest.pt" in i.value for i in at.info) and not at.error
    at.text_input(key="save_name").set_value("../escape").run()
    at.button(key="btn_save").click().run()
    assert any("not allowed" in e.value for e in at.error) and not (tmp_path / "escape.pt").exists()
    long = "a" * 70  # a pasted name over the limit is refused with its length, not cut or dropped by the box
    at.text_input(key="save_name").input(long).run()  # .input() keeps to a max_chars, as the browser does
    assert at.text_input(key="save_name").value == long
    at.button(key="btn_save").click().run()
    assert any("70 characters long: at most 64" in e.value for e in at.error)
    assert not list((tmp_path / "user").glob("a*.pt"))
    import ui.core as core

    blocked = tmp_path / "not-a-folder"  # the folder cannot be made: a one-line error, no traceback
    blocked.write_bytes(b"a file where the folder would go")
    core.USER_DIR = blocked  # (the fixture's monkeypatch puts it back)
    at.text_input(key="save_name").set_value("cannot-write").run()
    at.button(key="btn_save").click().run()
    assert not at.exception
    assert any("Not saved: could not write to" in e.value and "Save again" in e.value for e in at.error)
    assert blocked.read_bytes() == b"a file where the folder would go"


def test_reset_step_start_stop_drive_the_run_on_screen(registry):
    at = small_run(open_page(PAGE), epochs=5000)  # long enough to be still running at every check, then stopped
    at.button(key="btn_start").click().run()
    first = registry.get(at.query_params["run"])
    at.button(key="btn_reset").click().run()  # back to epoch 0: the run stops, no new one holds a place yet
    assert first.join(60) and first.state == STOPPED
    assert "run" not in at.query_params and registry.jobs() == [first]
    assert any("Back to epoch 0" in i.value for i in at.info)
    assert expanded(at)["Configuration"]  # Start will run these options: they stay in view
    at.button(key="btn_step").click().run()  # the first batch of a new run, then paused
    job = registry.get(at.query_params["run"])
    assert job is not first
    wait_until(lambda: job.snapshot().step == 1, what="one step")
    assert job.state == PAUSED
    at.button(key="btn_step").click().run()
    wait_until(lambda: job.snapshot().step == 2, what="a second step")
    at.button(key="btn_start").click().run()  # Start goes on with the run Step made (same options)
    assert registry.get(at.query_params["run"]) is job and job.state == RUNNING
    at.button(key="btn_pause").click().run()
    assert job.state == PAUSED and at.button(key="btn_pause").label == "Resume"
    at.button(key="btn_start").click().run()  # Start while paused: a second run, and the page says where the first is
    second = registry.get(at.query_params["run"])
    assert second is not job and job.state == PAUSED
    assert any(f"“{job.name}” goes on paused in the background" in i.value for i in at.info)
    second.stop()
    at.query_params["run"] = job.id
    at.run()
    at.button(key="btn_pause").click().run()
    assert job.state == RUNNING
    at.button(key="btn_stop").click().run()
    assert job.join(60) and job.state == STOPPED
    at.run()
    assert not at.exception and at.button(key="btn_stop").disabled


def test_start_after_a_step_queued_by_a_full_cap_starts_that_run_not_a_second_one(registry):
    """Step while other runs fill the cap makes a queued (paused) run: Start must go on with it, not submit a
    second run and leave the prepared one to take the next free place."""
    cfg = TrainConfig(dataset="digits", epochs=5000, max_examples=256, device="cpu")
    holders = [registry.submit(cfg, model_config_for("digits", hidden=(16,)), start_paused=True)
               for _ in range(registry.max_concurrent)]
    at = small_run(open_page(PAGE), epochs=2)
    at.button(key="btn_step").click().run()  # a stepped run: queued (paused) while the cap is full
    prepared = registry.get(at.query_params["run"])
    assert prepared.state == QUEUED and prepared.pause_requested
    at.button(key="btn_reset").click().run()  # Reset on it holds no place: nothing waits for one
    assert "run" not in at.query_params and prepared.state == STOPPED
    at.button(key="btn_step").click().run()
    prepared = registry.get(at.query_params["run"])
    at.button(key="btn_start").click().run()
    assert registry.get(at.query_params["run"]) is prepared and not prepared.pause_requested
    assert len(registry.jobs()) == len(holders) + 1  # no second run
    later = registry.submit(cfg, model_config_for("digits", hidden=(16,)))  # queued: its settings may change
    assert later.state == QUEUED and later.update(beta=2.0) == "beta: 1.0 -> 2.0" and later.train_config.beta == 2
    holders[0].stop()
    assert prepared.join(120) and prepared.state == FINISHED
    for j in (*holders, later):
        j.stop()


def test_a_run_another_session_started_is_watch_only_until_taken_over_and_reset_leaves_it_running(registry):
    """A student on the lecturer's shared link: every control of the lecture's run is disabled (Stop never touches
    another session's run), Reset moves only the student's own view; Take over hands the controls over."""
    cfg = TrainConfig(dataset="digits", epochs=5000, max_examples=256, device="cpu")
    lecture = registry.submit(cfg, model_config_for("digits", hidden=(16,)), name="lecture")
    at = open_page(PAGE)
    at.query_params["run"] = lecture.id
    at.run()
    assert all(at.button(key=k).disabled for k in ("btn_pause", "btn_step", "btn_stop"))
    assert at.select_slider(key="train_delay").disabled
    assert not at.button(key="btn_start").disabled and not at.button(key="btn_reset").disabled
    assert any("you are watching it" in c.value for c in at.caption)
    apply = next(b for b in at.get("form_submit_button") if "Apply" in b.proto.label)
    assert apply.proto.disabled
    at.button(key="btn_reset").click().run()  # the student's own fresh options; the lecture goes on
    assert "run" not in at.query_params and not lecture._stop and lecture.state == RUNNING
    assert any("goes on" in i.value for i in at.info)
    at.query_params["run"] = lecture.id
    at.run()
    at.button(key="btn_take_over").click().run()
    assert any("You control “lecture” from here now" in i.value for i in at.info)
    assert not at.button(key="btn_stop").disabled and "btn_take_over" not in {b.key for b in at.button}
    at.button(key="btn_stop").click().run()
    assert lecture.join(60) and lecture.state == STOPPED


def test_pause_drawn_before_another_tab_paused_does_not_resume(registry):
    """The button does what it said when drawn: tab A shows "Pause", tab B pauses the run, A's click keeps it
    paused (it used to toggle the run's real state and resume it)."""
    at = small_run(open_page(PAGE), epochs=5000)
    at.button(key="btn_start").click().run()
    assert "Change" in expanded(at)  # "Change while running" from the first page drawn after Start
    job = registry.get(at.query_params["run"])
    wait_until(lambda: job.state == RUNNING, what="the run")
    at.run()
    assert at.button(key="btn_pause").label == "Pause"
    job.pause()  # tab B
    wait_until(lambda: job.state == PAUSED, what="the pause")
    at.button(key="btn_pause").click().run()
    assert job.state == PAUSED
    assert at.button(key="btn_pause").label == "Resume"
    job.stop()
    assert job.join(60)


def test_bad_input_is_a_one_line_error_and_starts_nothing(registry):
    at = open_page(PAGE)
    at.text_input(key="cfg_hidden").set_value("256,abc").run()
    assert [e.value for e in at.error if "Hidden sizes = '256,abc'" in e.value]  # the option as the page names it
    at.button(key="btn_start").click().run()
    assert not at.exception and registry.jobs() == []
    said = [e.value for e in at.error if "Hidden sizes = '256,abc' is not allowed" in e.value]
    assert len(said) == 1 and "Not started" in said[0]  # once: Start's message, not the panel's too
    at.run()
    assert [e.value for e in at.error if "Start refuses these options" in e.value]  # the panel's, on the next run
    at.text_input(key="cfg_hidden").set_value("64 32").run()  # spaces separate sizes: not 6432
    assert not at.error
    at.button(key="btn_start").click().run()
    job = registry.get(at.query_params["run"])
    assert job.model_config.hidden == (64, 32)
    job.stop()
    assert job.join(60)
    at.text_input(key="cfg_name").set_value("<b>hi</b> **bold**").run()  # echoed as typed, not as Markdown
    at.button(key="btn_start").click().run()
    assert any(r"'\<b\>hi\</b\> \*\*bold\*\*' is not allowed" in e.value for e in at.error)
    assert len(registry.jobs()) == 1


def test_failure_queue_and_unknown_run_are_shown(registry):
    cfg = TrainConfig(dataset="digits", epochs=2, batch_size=32, max_examples=64, device="cpu")
    failing = registry.submit(cfg, model_config_for("moons"), name="mismatch")  # input_dim 2 vs 64: fails
    assert failing.join(120) and failing.state == FAILED
    at = open_page(PAGE)
    at.query_params["run"] = failing.id
    at.run()
    assert not at.exception and any("The run failed" in e.value and "does not match" in e.value for e in at.error)

    holders = [registry.submit(cfg, model_config_for("digits", hidden=(16,)), start_paused=True)
               for _ in range(registry.max_concurrent)]
    queued = registry.submit(cfg, model_config_for("digits", hidden=(16,)))
    assert queued.state == QUEUED
    at.query_params["run"] = queued.id
    at.run()
    assert any("place 1 in the queue" in i.value for i in at.info)
    # the places are held by paused runs: the message names them, and says how to free a place
    holding = next(i.value for i in at.info if "place 1 in the queue" in i.value)
    assert [h.state for h in holders] == [PAUSED] * len(holders)
    assert all(f"“{h.name}” (paused)" in holding for h in holders) and "gives its place to the queue" in holding
    # the run list keeps numbers as numbers (they sort as numbers): the queue place, and none yet for the metrics
    table = next(d.value for d in at.dataframe if "queue" in d.value.columns).set_index("id")
    assert table.loc[queued.id, "queue"] == 1 and table.loc[queued.id, "of"] == 2
    assert table.loc[queued.id, ["test ELBO", "active units"]].isna().all()
    assert table.loc[failing.id, "state"] == FAILED and table["queue"].isna().sum() == len(table) - 1
    for h in holders:
        h.stop()

    at.query_params["run"] = "nosuchrun"
    at.run()
    assert not at.exception and any("not on this server" in w.value for w in at.warning)


def test_a_run_that_gave_its_place_away_while_paused_says_so(registry):
    registry.pause_hold_s = 0.3
    cfg = TrainConfig(dataset="digits", epochs=5000, batch_size=32, max_examples=64, device="cpu")
    # one paused run, and running ones in the other places: the paused one gives its place to the waiting run
    holders = [registry.submit(cfg, model_config_for("digits", hidden=(16,)), start_paused=i == 0)
               for i in range(registry.max_concurrent)]
    waiting = registry.submit(cfg, model_config_for("digits", hidden=(16,)))
    wait_until(lambda: waiting.state == RUNNING, timeout=30, what="the waiting run to get a place")
    released = holders[0]
    assert released.state == PAUSED and released.snapshot().extra.get("released")
    at = open_page(PAGE, _own_runs={released.id})  # this session started it
    at.query_params["run"] = released.id
    at.run()
    assert any("Paused for over 0.3 s while other runs waited" in c.value for c in at.caption)
    assert at.button(key="btn_pause").label == "Resume"
    at.button(key="btn_pause").click().run()
    assert released.state == QUEUED
    assert any("was paused long enough to give its place" in i.value for i in at.info)
    for j in (*holders, waiting):
        j.stop()


def expanded(at) -> dict[str, bool]:
    """label (first word) -> whether the page sends that expander open."""
    return {e.label.split(":")[0].split()[0]: e.proto.expanded for e in at.expander}


def test_the_panels_open_and_close_with_the_run_and_stay_as_left_across_pages(registry):
    at = small_run(open_page(PAGE), epochs=5000)
    assert expanded(at)["Configuration"] and "Save" not in expanded(at)  # no run yet: the options are open
    at.button(key="btn_start").click().run()
    job = registry.get(at.query_params["run"])
    wait_until(lambda: job.trainer is not None, what="the run's trainer")
    at.run()
    ex = expanded(at)
    assert not ex["Configuration"] and not ex["Save"] and not ex["Change"]  # a run on screen: the live view leads
    at.session_state["exp_config"] = True  # the user opens the configuration (to read it) while it runs
    at.run()
    assert expanded(at)["Configuration"]
    at.button(key="btn_stop").click().run()
    assert job.join(60) and job.state == STOPPED
    at.run()
    ex = expanded(at)
    assert ex["Save"] and ex["Configuration"]  # the run ended: Save opens by itself; the rest stays as left
    at.session_state["exp_save"] = False  # the user closes it: a rerun does not reopen it
    at.run()
    assert not expanded(at)["Save"]
    at.session_state["exp_save"] = True
    at.run()
    at.switch_page("pages/home.py").run()
    at.switch_page(PAGE).run()  # Streamlit dropped the widgets' state on Home; the page kept a copy
    ex = expanded(at)
    assert ex["Save"] and ex["Configuration"] and not ex["All"], ex
    assert not at.exception


def test_a_run_that_ends_while_the_page_draws_leaves_no_part_showing_the_old_state(registry, monkeypatch):
    """The job's thread can end a run while the page's script runs. The page reads the state once, so the live view
    keeps polling as the rest of the page saw it, its first poll finds the run ended and redraws the whole page:
    the Save panel opens. (Reading it afresh at the live view, the page stayed with a closed Save panel and a
    status saying "stopped", and nothing redrew it: seen once in CI's browser test.)"""
    import ui.train_views as tv

    cfg = TrainConfig(dataset="digits", epochs=1, batch_size=64, max_examples=128, device="cpu")
    job = registry.submit(cfg, model_config_for("digits", hidden=(16,)))
    assert job.join(120) and job.state == FINISHED
    ended = {"now": False}  # the run "ends" when the page reaches its live view

    class EndingJob:
        def __getattr__(self, name):
            return getattr(job, name)

        @property
        def state(self):
            return job.state if ended["now"] else RUNNING

    real_live_view = tv.live_view

    def live_view(*args, **kwargs):
        ended["now"] = True
        return real_live_view(*args, **kwargs)

    at = open_page(PAGE)
    at.query_params["run"] = job.id
    monkeypatch.setattr(tv, "current_job", lambda: EndingJob() if registry.get(job.id) else None)
    monkeypatch.setattr(tv, "live_view", live_view)
    at.run()
    assert not at.exception
    assert any("· finished" in m.value for m in at.markdown)  # the status, drawn by the redraw
    assert expanded(at)["Save"]


def test_clearing_the_preset_keeps_the_options_and_breaks_nothing(registry):
    at = open_page(PAGE)
    at.number_input(key="cfg_epochs").set_value(77).run()
    at.selectbox(key="train_preset").set_value(None).run()  # its x, or Escape in the browser
    assert not at.exception and at.number_input(key="cfg_epochs").value == 77


def test_a_link_to_a_run_opens_the_options_panel_with_that_runs_options(registry):
    """A reload or a shared link (a new session) shows the run's own options, not the fast-demo preset's."""
    from apptest_support import new_app_test

    cfg = TrainConfig(dataset="digits", epochs=7, batch_size=32, max_examples=64, lr=2e-3, beta=2.5, seed=3,
                      device="cpu")
    job = registry.submit(cfg, model_config_for("digits", hidden=(48, 24), latent_dim=4), name="linked")
    assert job.join(120)
    at = new_app_test()
    at.query_params["run"] = job.id
    at.switch_page(PAGE).run()
    assert not at.exception
    got = {k: at.number_input(key=k).value for k in ("cfg_epochs", "cfg_batch_size", "cfg_latent_dim", "cfg_seed",
                                                     "cfg_max_examples")}
    assert got == {"cfg_epochs": 7, "cfg_batch_size": 32, "cfg_latent_dim": 4, "cfg_seed": 3, "cfg_max_examples": 64}
    assert at.number_input(key="cfg_beta").value == 2.5 and at.text_input(key="cfg_hidden").value == "48,24"
    assert at.selectbox(key="train_preset").value is None  # not a preset's options
    fresh = open_page(PAGE)  # no link: the preset, as before
    assert fresh.selectbox(key="train_preset").value == "fast demo" and fresh.number_input(key="cfg_epochs").value == 50


def test_coming_back_from_another_page_shows_the_run_watched_before(registry):
    at = small_run(open_page(PAGE), epochs=5000)
    at.button(key="btn_start").click().run()
    run_id = at.query_params["run"]
    job = registry.get(run_id)
    at.switch_page("pages/latent.py").run()
    at.query_params.pop("run", None)  # the sidebar's link to Train carries no ?run=
    at.switch_page(PAGE).run()
    assert not at.exception and at.query_params["run"] == run_id
    assert at.selectbox(key="run_pick").value == run_id
    at.selectbox(key="run_pick").set_value("").run()  # "— new run —" chosen: no run is put back after that
    at.switch_page("pages/home.py").run()
    at.query_params.pop("run", None)
    at.switch_page(PAGE).run()
    assert "run" not in at.query_params and at.selectbox(key="run_pick").value == ""
    job.stop()
    registry.remove(job.id) if job.join(60) else None
    at.session_state["_train_run"] = job.id  # a run the server has forgotten is not put back
    at.run()
    assert not at.exception and "run" not in at.query_params


def test_the_kl_heatmap_keeps_a_fixed_floor_and_a_top_of_at_least_one_nat():
    """A collapsed run (every KL ~ 0.001 nats) must look dark, not stretched to its noise; a run whose dimensions
    carry more than a nat gets a scale up to its largest value. The colours are log10 of the KL (one huge value
    does not black out the rest), and the hover shows the KL itself."""
    import math

    from vae.trainer import new_history
    from ui.train_figures import collapse_figure

    def heat(kl_rows):
        h = new_history()
        h["epoch"]["epoch"] = list(range(1, len(kl_rows) + 1))
        h["epoch"]["test_kl_per_dim"] = kl_rows
        h["epoch"]["active_units"] = [0] * len(kl_rows)
        fig = collapse_figure(h)["data"][0]
        assert fig["type"] == "heatmap" and fig["zmin"] == -3.0  # 0.001 nats and below: black
        return fig

    collapsed = heat([[0.0015, 0.001, 0.0], [0.001, 0.0005, 0.0]])
    assert collapsed["zmax"] == 0.0  # 1 nat
    assert collapsed["z"][2].tolist() == [-3.0, -3.0]  # dimension 3: 0 nats, at the floor
    assert collapsed["customdata"][:, 0].tolist() == [0.0015, 0.001, 0.0]  # dims x epochs: the KL itself
    assert collapsed["colorbar"]["ticktext"] == ["0.001", "0.01", "0.1", "1"]
    spread = heat([[0.2, 3.5], [0.1, 4.25]])
    assert math.isclose(spread["zmax"], math.log10(4.25)) and spread["colorbar"]["ticktext"][-1] == "4.25"
    diverged = heat([[40_000.0, 0.5], [0.3, 0.4]])  # one diverged epoch: 0.3-0.5 nats stay well above black
    assert math.isclose(diverged["zmax"], math.log10(40_000.0))
    assert all((v - -3.0) / (diverged["zmax"] - -3.0) > 0.3 for v in (diverged["z"][0, 1], *diverged["z"][1]))


def test_the_comparison_names_runs_and_checkpoints_as_the_picker_does(registry):
    import json

    cfg = TrainConfig(dataset="digits", epochs=2, batch_size=64, max_examples=128, device="cpu")
    other = registry.submit(cfg, model_config_for("digits", hidden=(16,)), name="earlier-run")
    here = registry.submit(cfg, model_config_for("digits", hidden=(16,)), name="this-one")
    assert other.join(120) and here.join(120)
    at = open_page(PAGE)
    at.query_params["run"] = here.id
    at.run()
    box = at.multiselect(key="compare_runs")
    assert f"run: earlier-run ({other.id})" in box.options, box.options  # as shown
    assert "shipped: digits-z2" in box.options and "shipped: sweep/digits-beta-1" in box.options  # as the sidebar
    box.select(f"run: earlier-run ({other.id})").run()
    fig = next(c for c in at.get("plotly_chart") if "fig_compare" in str(c.proto.id))
    names = {t.get("name") for t in json.loads(fig.proto.spec)["data"]}
    assert any(n and n.startswith("run: earlier-run") for n in names), names
    assert "range" not in json.loads(fig.proto.spec)["layout"]["xaxis"]  # runs of one length: the axes fit all
    assert not at.exception
    # a 200-epoch checkpoint beside this 2-epoch run: the axes end at the run's epochs, and the caption says so
    at.multiselect(key="compare_runs").select("file:checkpoints/digits-z2.pt").run()
    fig = next(c for c in at.get("plotly_chart") if "fig_compare" in str(c.proto.id))
    assert json.loads(fig.proto.spec)["layout"]["xaxis"]["range"] == [0, 2.1]
    assert any("longer histories go on past the right edge" in c.value for c in at.caption)
    # a model of other data (2-D moons) is named and left out: its nats are not this run's
    at.multiselect(key="compare_runs").select("file:checkpoints/moons-z2.pt").run()
    fig = next(c for c in at.get("plotly_chart") if "fig_compare" in str(c.proto.id))
    names = {t.get("name") for t in json.loads(fig.proto.spec)["data"]}
    assert not any(n and "moons" in n for n in names), names
    assert any("Not overlaid: shipped: moons-z2 (moons)" in c.value and "digits" in c.value for c in at.caption)


def test_the_save_box_and_the_view_options_survive_a_visit_to_another_page(registry):
    cfg = TrainConfig(dataset="digits", epochs=1, batch_size=64, max_examples=128, device="cpu")
    job = registry.submit(cfg, model_config_for("digits", hidden=(16,)), name="kept-name")
    assert job.join(120)
    at = open_page(PAGE)
    at.query_params["run"] = job.id
    at.run()
    assert at.text_input(key="save_name").value == "kept-name"
    at.text_input(key="save_name").set_value("typed-name").run()
    at.toggle(key="curves_log").set_value(True).run()
    at.switch_page("pages/decode.py").run()
    at.switch_page(PAGE).run()
    assert not at.exception
    assert at.text_input(key="save_name").value == "typed-name" and at.toggle(key="curves_log").value
    assert at.select_slider(key="train_delay").value == job.delay_s


def test_presentation_mode_enlarges_the_axes_of_the_live_figures(registry):
    import json

    from ui.core import PRESENT_TICK_PX

    cfg = TrainConfig(dataset="digits", epochs=1, batch_size=64, max_examples=128, device="cpu")
    job = registry.submit(cfg, model_config_for("digits", hidden=(16,)))
    assert job.join(120)
    sizes = {}
    for present in (False, True):
        at = open_page(PAGE, present=present)
        at.query_params["run"] = job.id
        at.run()
        assert not at.exception
        for chart in at.get("plotly_chart"):
            layout = json.loads(chart.proto.spec)["layout"]
            for name, axis in layout.items():
                if name.startswith(("xaxis", "yaxis")):
                    sizes.setdefault(present, set()).add((axis.get("tickfont") or {}).get("size"))
    assert sizes[True] == {PRESENT_TICK_PX} and PRESENT_TICK_PX not in sizes[False]


@pytest.mark.parametrize("key, value, words", [("cfg_lr", 1e9, "Learning rate = 1e+09 is out of range"),
                                               ("cfg_beta", -1.0, "β (target) = -1 is out of range"),
                                               ("cfg_epochs", 0, "Epochs = 0 is out of range"),
                                               ("cfg_latent_dim", 5000, "Latent dim d = 5,000 is out of range: use a number from 1 to 1,024")])
def test_an_out_of_range_number_is_named_at_once_and_start_refuses_it(registry, key, value, words):
    """The widgets take any number (a browser would silently keep the old value of one outside its own min/max):
    the server names the bad one under the options, and Start runs nothing until it is fixed."""
    at = open_page(PAGE)
    at.number_input(key=key).set_value(value).run()
    assert not at.exception and any(words in e.value for e in at.error)
    assert at.number_input(key=key).value == value  # what the user typed stays on screen
    at.button(key="btn_start").click().run()
    assert registry.jobs() == [] and any("Not started" in e.value and words in e.value for e in at.error)


def test_a_change_while_running_out_of_range_is_refused(registry):
    at = small_run(open_page(PAGE), epochs=5000)
    at.button(key="btn_step").click().run()  # a paused run, on screen
    job = registry.get(at.query_params["run"])
    wait_until(lambda: job.trainer is not None, what="the fresh run")
    at.run()
    lr_box = next(w for w in at.number_input if w.key.startswith("live_lr_"))
    lr_box.set_value(5.0)
    next(b for b in at.button if "Apply to the running job" in str(b.label)).click().run()
    assert not at.exception
    assert any("Not applied: Learning rate = 5 is out of range" in e.value for e in at.error)
    assert job.train_config.lr != 5.0
    job.stop()


def test_a_switch_to_the_cyclical_schedule_while_running_takes_its_cycles_and_ratio_from_the_form(registry):
    at = small_run(open_page(PAGE), epochs=5000)
    at.button(key="btn_step").click().run()  # started: a change now is a live one
    job = registry.get(at.query_params["run"])
    wait_until(lambda: job.snapshot().step == 1, what="the first step")
    at.run()

    def box(prefix):
        return next(w for w in at.number_input if w.key.startswith(prefix))

    next(w for w in at.selectbox if w.key.startswith("live_sched_")).set_value("cyclical")
    box("live_cycles_").set_value(3)
    box("live_ratio_").set_value(0.25)
    box("live_clip_").set_value(5.0)
    next(b for b in at.button if "Apply to the running job" in str(b.label)).click().run()
    assert not at.exception and any("Applied at step 1" in s.value for s in at.success)
    cfg = job.train_config
    assert (cfg.beta_schedule, cfg.cycles, cfg.cycle_ratio, cfg.grad_clip) == ("cyclical", 3, 0.25, 5.0)
    box("live_cycles_").set_value(0)
    next(b for b in at.button if "Apply to the running job" in str(b.label)).click().run()
    assert any("Not applied: Cycles M = 0 is out of range" in e.value for e in at.error)
    assert job.train_config.cycles == 3
    job.stop()


@pytest.mark.parametrize("flag, on", [("1", True), ("yes", True), ("true", True), ("0", False), ("off", False)])
def test_present_in_the_url_takes_the_usual_spellings(flag, on):
    at = new_app_test()
    at.query_params["present"] = flag
    at.run()
    assert not at.exception and at.toggle(key="present").value is on
    if on:  # a link that keeps it on; off is the default, which the URL leaves out
        assert at.query_params["present"] in ("true", ["true"])
    else:
        assert at.query_params.get("present") in (None, "false", ["false"])


def test_present_in_the_url_not_understood_says_so():
    at = new_app_test()
    at.query_params["present"] = "maybe"
    at.run()
    assert not at.exception and at.toggle(key="present").value is False
    assert any("?present=maybe is not understood" in c.value for c in at.sidebar.caption)


def test_overwrite_is_never_carried_over_to_the_next_runs_save_box(registry):
    first = registry.submit(TrainConfig(dataset="digits", epochs=1, batch_size=32, max_examples=64, device="cpu"),
                            model_config_for("digits", hidden=(16,), latent_dim=2), name="first")
    second = registry.submit(TrainConfig(dataset="digits", epochs=1, batch_size=32, max_examples=64, device="cpu"),
                             model_config_for("digits", hidden=(16,), latent_dim=2), name="second")
    assert first.join(120) and second.join(120)
    at = open_page(PAGE)
    at.query_params["run"] = first.id
    at.run()
    at.checkbox(key="save_overwrite").check().run()
    assert at.checkbox(key="save_overwrite").value
    at.query_params["run"] = second.id
    at.run()
    assert not at.exception and at.text_input(key="save_name").value == "second"
    assert at.checkbox(key="save_overwrite").value is False


def test_an_option_off_screen_does_not_block_start_and_labels_follow_the_schedule(registry):
    at = small_run(open_page(PAGE))
    at.selectbox(key="cfg_beta_schedule").set_value("cyclical").run()
    at.number_input(key="cfg_cycles").set_value(0).run()
    assert any("Cycles M = 0 is out of range" in e.value for e in at.error)
    at.selectbox(key="cfg_beta_schedule").set_value("capacity").run()  # cycles no longer on screen
    assert not any("Cycles M" in e.value for e in at.error)
    at.number_input(key="cfg_beta").set_value(-1.0).run()
    assert any("γ (capacity weight) = -1 is out of range" in e.value for e in at.error)
    at.number_input(key="cfg_beta").set_value(1.0).run()
    assert not at.error
    at.button(key="btn_start").click().run()
    job = registry.get(at.query_params["run"])
    assert job.train_config.beta_schedule == "capacity" and job.train_config.cycles == 4  # the default
    job.stop()


def test_binarize_left_on_under_the_sigma_box_does_not_binarise_a_gaussian_run(registry):
    at = small_run(open_page(PAGE))
    at.toggle(key="cfg_binarize").set_value(True).run()
    at.selectbox(key="cfg_likelihood").set_value("gaussian").run()
    assert "cfg_binarize" not in {t.key for t in at.toggle} and "cfg_sigma" in {n.key for n in at.number_input}
    at.button(key="btn_start").click().run()
    job = registry.get(at.query_params["run"])
    assert job.model_config.likelihood == "gaussian" and job.train_config.binarize is False
    job.stop()
    at.selectbox(key="cfg_likelihood").set_value("bernoulli").run()  # the toggle back on screen, as it was left
    at.button(key="btn_start").click().run()
    job = registry.get(at.query_params["run"])
    assert job.model_config.likelihood == "bernoulli" and job.train_config.binarize is True
    job.stop()


def test_several_bad_numbers_are_all_named_in_the_one_line(registry):
    at = open_page(PAGE)
    at.number_input(key="cfg_lr").set_value(1e9)
    at.number_input(key="cfg_epochs").set_value(0)
    at.number_input(key="cfg_seed").set_value(-1).run()
    line = next(e.value for e in at.error if "out of range" in e.value)
    assert line.startswith("Epochs = 0 is out of range") or line.startswith("Learning rate = 1e+09 is out of range")
    assert "(also out of range:" in line and all(n in line for n in ("Learning rate", "Epochs", "Seed"))
    at.text_input(key="cfg_hidden").set_value("256,abc")
    at.text_input(key="cfg_name").set_value("../x").run()  # the text boxes are named in the same line
    line = next(e.value for e in at.error if "out of range" in e.value)
    assert "(also not allowed: Hidden sizes, Run name)" in line, line


def test_log_axis_ticks_are_labelled_in_full():
    """The curves' log scale: 1, 2, 5 x 10^k, each labelled as the number it is (Plotly labelled 0.5 and 0.2 as a
    bare "5" and "2"); under a decade, Plotly's own plain ticks."""
    from ui.train_figures import curves_figure, log_ticks

    t = log_ticks([0.012, 0.3, 3.0])
    assert t["ticktext"] == ["0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2"]
    assert log_ticks([25.0, 40.0]) == {} and log_ticks([]) == {}
    assert log_ticks([1e-3, 1e4])["ticktext"] == ["0.001", "0.01", "0.1", "1", "10", "100", "1000", "10000"]
    h = {"step": {"step": [1, 2, 3], "recon": [40.0, 30.0, 25.0], "kl": [0.01, 0.5, 3.0], "elbo": [-40.0, -30.5, -28.0],
                  "beta": [1.0] * 3, "loss": [40.0, 30.5, 28.0], "epoch": [1 / 3, 2 / 3, 1.0], "lr": [1e-3] * 3},
         "epoch": {k: [] for k in ("epoch", "test_recon", "test_kl", "test_elbo")}, "events": []}
    fig = curves_figure(h, steps_per_epoch=3, smoothing=0.0, log_y=True)
    assert fig["layout"]["yaxis"]["type"] == "log" and "tickvals" not in fig["layout"]["yaxis"]
    assert fig["layout"]["yaxis2"]["ticktext"][:3] == ["0.01", "0.02", "0.05"]


def test_the_collapse_banner_is_one_line_with_the_remedies_in_a_popover(registry):
    cfg = TrainConfig(dataset="digits", epochs=8, batch_size=64, max_examples=256, beta=4.0, lr=2e-3, device="cpu")
    job = registry.submit(cfg, model_config_for("digits", hidden=(64,), latent_dim=8))
    assert job.join(120)
    at = open_page(PAGE)
    at.query_params["run"] = job.id
    at.run()
    assert not at.exception
    [banner] = [e.value for e in at.error if "KL collapse detected" in e.value]
    assert "Try" not in banner and "free bits" not in banner  # the remedies are not in the banner's text
    assert "Since epoch" in banner and "total KL now" in banner and "decoder ignores z" not in banner
    remedies = " ".join(m.value for m in at.markdown)
    assert "free bits" in remedies and "~4 nats here" in remedies  # in the popover, digits' capacity hint
    assert "Here q_φ(z|x) ≈ p(z) for every x, so the decoder ignores z." in remedies


def test_c_max_follows_the_dataset_until_the_user_sets_it(registry):
    at = open_page(PAGE)
    at.selectbox(key="cfg_beta_schedule").set_value("capacity").run()
    assert at.number_input(key="cfg_capacity_max").value == 4.0  # digits: about the KL a good model carries
    at.selectbox(key="cfg_dataset").set_value("mnist").run()
    assert at.number_input(key="cfg_capacity_max").value == 25.0
    at.number_input(key="cfg_capacity_max").set_value(12.0).run()
    at.selectbox(key="cfg_dataset").set_value("digits").run()
    assert at.number_input(key="cfg_capacity_max").value == 12.0  # typed: kept


def test_the_likelihood_follows_the_dataset_until_the_user_picks_one(registry):
    """fast demo sets Bernoulli (the digits' likelihood): the moons' 2-D points get theirs, a learned Gaussian."""
    at = open_page(PAGE)
    assert at.selectbox(key="cfg_likelihood").value == "bernoulli"
    at.selectbox(key="cfg_dataset").set_value("moons").run()
    assert at.selectbox(key="cfg_likelihood").value == "gaussian-learned"
    at.selectbox(key="cfg_dataset").set_value("digits").run()
    assert at.selectbox(key="cfg_likelihood").value == "bernoulli"
    at.selectbox(key="cfg_likelihood").set_value("gaussian").run()
    at.selectbox(key="cfg_dataset").set_value("mnist").run()
    assert at.selectbox(key="cfg_likelihood").value == "gaussian" and not at.exception  # picked: kept


def test_an_edited_preset_says_so_and_can_be_applied_again(registry):
    at = open_page(PAGE)
    assert any("It sets slow motion to 0.01 s" in c.value for c in at.caption)  # fast demo's description
    at.number_input(key="cfg_epochs").set_value(20).run()
    at.select_slider(key="train_delay").set_value(0.0).run()
    [note] = [c.value for c in at.caption if "Edited since “fast demo” was applied" in c.value]
    assert "Epochs" in note and "Slow motion" in note
    at.button(key="btn_reapply").click().run()
    assert at.number_input(key="cfg_epochs").value == 50 and at.select_slider(key="train_delay").value == 0.01
    assert any("It sets slow motion to 0.01 s" in c.value for c in at.caption)
