"""AppTest for the Trade-off page and the Collapse lab, with the shipped beta sweep and a private job registry (so no
run lands in checkpoints/autosave and other tests' runs do not show up here)."""
from __future__ import annotations

import json

import pytest

import ui.core
import ui.tradeoff
from apptest_support import open_page
from vae.jobs import ACTIVE, JobRegistry

SWEEP = [f"file:checkpoints/sweep/digits-beta-{b}.pt" for b in ("0.1", "0.5", "1", "2", "4", "8")]


@pytest.fixture
def registry(tmp_path, monkeypatch):
    reg = JobRegistry(max_concurrent=2, autosave_dir=tmp_path / "autosave")
    monkeypatch.setattr(ui.core, "get_registry", lambda: reg)
    monkeypatch.setattr(ui.tradeoff, "get_registry", lambda: reg)
    yield reg
    reg.shutdown()


def plane_traces(at) -> dict:
    """name -> trace of the rate-distortion figure (the first Plotly chart on the page)."""
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    return {t.get("name"): t for t in spec["data"] if t.get("name")}


def wait_group(reg, group, timeout=120):
    for j in reg.jobs(group=group):
        j.join(timeout)
    assert not any(j.snapshot().state in ACTIVE for j in reg.jobs(group=group))


def test_tradeoff_page_shows_the_shipped_sweep_compares_and_refuses_bad_input(registry):
    at = open_page("pages/tradeoff.py")
    assert not at.exception
    assert not at.error
    traces = plane_traces(at)
    sweep = traces["shipped sweep"]
    assert sorted(sweep["customdata"]) == sorted(SWEEP)
    rates = dict(zip(sweep["customdata"], sweep["x"]))
    assert rates[SWEEP[0]] > rates[SWEEP[2]] > rates[SWEEP[4]]  # rate falls with beta
    assert "frontier (these models)" in traces
    assert any(name.startswith("slope −β = −1") for name in traces)  # model A is the beta = 1 model
    hover = " ".join(sweep["hovertext"])
    assert "ELBO" in hover and "active units" in hover and "β=4" in hover
    assert at.selectbox(key="rd_a").value == SWEEP[2]
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["rate R"]) == pytest.approx(3.34, abs=0.05)
    assert metrics["active units"] == "5/16"
    assert len(at.get("plotly_chart")) == 3  # the plane, KL bars and the I(x;z) split of model A

    # compare with beta = 4: both sets of figures side by side, both models marked on the plane
    at.selectbox(key="rd_b").set_value(SWEEP[4]).run()
    assert not at.exception
    assert [m.value for m in at.metric if m.label == "active units"] == ["5/16", "0/16"]
    assert len(at.get("plotly_chart")) == 5
    notes = [a["text"] for a in json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["annotations"]]
    assert "<b>A</b>" in notes and "<b>B</b>" in notes

    # a bad beta list: one line saying what is wrong, nothing submitted
    at.text_input(key="rd_betas").set_value("0.5, lots")
    next(b for b in at.button if b.label == "Start sweep").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "β values" in at.error[0].value
    assert registry.jobs() == []


def test_tradeoff_sweep_runs_through_the_registry_points_appear_and_cancel_stops_it(registry):
    at = open_page("pages/tradeoff.py")
    at.text_input(key="rd_betas").set_value("0.5, 4, 4, 0.5, 4")
    at.number_input(key="rd_epochs").set_value(4)
    next(b for b in at.button if b.label == "Start sweep").click().run()
    assert not at.exception and not at.error
    assert any("β = 4, 0.5 given more than once: each β runs once (2 runs)" in i.value for i in at.info)
    group = at.session_state["rd_sweep"]
    jobs = registry.jobs(group=group)
    assert [j.name for j in jobs] == ["sweep β=0.5", "sweep β=4"]
    wait_group(registry, group)
    at.run()
    assert not at.exception
    runs = plane_traces(at)["run"]
    assert sorted(runs["customdata"]) == sorted(f"run:{j.id}" for j in jobs)
    assert sorted(runs["text"]) == ["β=0.5", "β=4"]
    assert any("2/2 runs ended" in p.proto.text for p in at.get("progress"))
    again = open_page("pages/tradeoff.py")  # a reload: the sweep's progress is found again from the URL
    again.query_params["sweep"] = group
    again.run()
    assert not again.exception and any("2/2 runs ended" in p.proto.text for p in again.get("progress"))
    foreign = open_page("pages/tradeoff.py")  # a lab's id is not a sweep: refused in one line, nothing blocked
    foreign.query_params["sweep"] = next(iter(registry.jobs())).group.replace("sweep-", "lab-")
    foreign.run()
    assert not foreign.exception and "sweep" not in foreign.query_params
    assert any("not on this server" in w.value for w in foreign.warning) and not foreign.get("progress")

    # a long sweep, cancelled: every run of the group stops
    at.text_input(key="rd_betas").set_value("0.5, 1, 2, 4")
    at.number_input(key="rd_epochs").set_value(300)
    next(b for b in at.button if b.label == "Start sweep").click().run()
    long_group = at.session_state["rd_sweep"]
    assert long_group != group and len(registry.jobs(group=long_group)) == 4
    at.button(key="rd_cancel").click().run()
    assert not at.exception
    wait_group(registry, long_group, timeout=30)
    assert {j.snapshot().state for j in registry.jobs(group=long_group)} == {"stopped"}


def test_collapse_lab_runs_preset_and_remedies_side_by_side(registry):
    at = open_page("pages/collapse.py")
    assert not at.exception
    assert any("Press **Run**" in i.value for i in at.info)
    at.radio(key="lab_preset").set_value("autoregressive").run()
    assert any("autoregressive decoder" in m.value for m in at.markdown)
    at.radio(key="lab_preset").set_value("beta4").run()
    at.session_state["lab_remedies"] = ["free_bits"]
    at.number_input(key="lab_epochs").set_value(12)
    at.button(key="lab_run").click().run()
    assert not at.exception and not at.error
    group = at.session_state["lab_group"]
    jobs = registry.jobs(group=group)
    assert [j.name for j in jobs] == ["lab β4 · collapsed", "lab β4 · + free bits λ = 0.5"]
    assert jobs[0].train_config.seed == jobs[1].train_config.seed
    wait_group(registry, group)
    at.run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["run"]) == ["collapsed", "+ free bits λ = 0.5"]
    collapsed_au, fixed_au = table["active units"]  # numbers, so that they sort as numbers
    assert collapsed_au <= 1 and fixed_au >= 8
    charts = {c.key: c for c in at.get("plotly_chart")}
    # active units, the colour scale, a heatmap per run
    assert list(charts) == ["lab_au", "lab_scale", "lab_heat_0", "lab_heat_1"]
    heats = [json.loads(charts[f"lab_heat_{i}"].proto.spec)["data"][0] for i in range(2)]
    z = heats[0]["z"]
    shape = tuple(int(v) for v in z["shape"].split(",")) if isinstance(z, dict) else (len(z), len(z[0]))
    assert heats[0]["type"] == "heatmap" and shape == (16, 12)  # latent dims x epochs
    # one colour scale for all, in its own strip: no heatmap draws a colour bar that would take its width
    assert not any(h["showscale"] for h in heats)
    scale = json.loads(charts["lab_scale"].proto.spec)["layout"]["xaxis"]
    assert scale["ticktext"] == ["0.001", "0.01", "0.1", "≥1"]
    assert at.query_params["lab"] in (group, [group])

    # a reload (a new session with the same URL) finds the lab again, roles and all; a stale lab id is dropped
    again = open_page("pages/collapse.py")
    again.query_params["lab"] = group
    again.run()
    assert not again.exception and again.session_state["lab_group"] == group
    assert list(again.dataframe[0].value["run"]) == ["collapsed", "+ free bits λ = 0.5"]
    assert any("costs nothing (Kingma et al. 2016)" in c.value for c in again.caption)  # the remedy's note
    stale = open_page("pages/collapse.py")
    stale.query_params["lab"] = "lab-nosuch"
    stale.run()
    assert not stale.exception and "lab" not in stale.query_params
    assert any("Press **Run**" in i.value for i in stale.info)
    assert any("lab-nosuch" in w.value and "not on this server" in w.value for w in stale.warning)
    # a page switch clears the URL's parameters: coming back puts the lab in it again, for the next reload
    again.switch_page("pages/home.py").run()
    again.switch_page("pages/collapse.py").run()
    assert again.query_params["lab"] in (group, [group])


def test_a_lab_opened_from_someone_elses_link_cannot_stop_it(registry):
    owner = open_page("pages/collapse.py")
    owner.session_state["lab_remedies"] = ["free_bits"]
    owner.number_input(key="lab_epochs").set_value(300)
    owner.button(key="lab_run").click().run()
    group = owner.session_state["lab_group"]
    assert not owner.button(key="lab_stop").disabled
    visitor = open_page("pages/collapse.py")  # another browser session, on the shared ?lab= link
    visitor.query_params["lab"] = group
    visitor.run()
    assert not visitor.exception and visitor.button(key="lab_stop").disabled
    assert "another browser session" in visitor.button(key="lab_stop").proto.help
    assert not visitor.button(key="lab_run").disabled  # a lab of one's own can still be run
    owner.button(key="lab_stop").click().run()
    wait_group(registry, group, timeout=60)
    assert {j.snapshot().state for j in registry.jobs(group=group)} == {"stopped"}


def test_an_extreme_model_does_not_squeeze_the_plane(registry, tmp_path, monkeypatch):
    import torch

    from vae import VAE, TrainConfig
    from vae.checkpoint import make_checkpoint, save_checkpoint
    from vae.presets import model_config_for

    at = open_page("pages/tradeoff.py")  # the shipped models alone: nothing is far out, no zoom toggle
    assert not at.exception and not [t for t in at.toggle if t.key == "rd_zoom"]
    user = tmp_path / "user"
    monkeypatch.setattr(ui.core, "USER_DIR", user)
    monkeypatch.setattr(ui.tradeoff, "USER_DIR", user)
    model = VAE(model_config_for("digits", latent_dim=16))
    with torch.no_grad():  # every pixel predicted on, with great confidence: hundreds of nats of distortion
        model.decoder[-1].bias.fill_(20.0)
    save_checkpoint(user / "far-out.pt", make_checkpoint(model, TrainConfig(dataset="digits"), dataset="digits"))
    at = open_page("pages/tradeoff.py")
    assert not at.exception and not at.error
    far = plane_traces(at)["saved"]["y"][0]
    assert far > 200
    y_range = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["yaxis"]["range"]
    assert y_range[1] < 100  # fitted to the sweep, the far model off the axes ...
    assert any("Off the axes" in c.value and "far-out" in c.value for c in at.caption)  # ... and named
    at.toggle(key="rd_zoom").set_value(False).run()
    y_range = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["yaxis"]["range"]
    assert y_range[1] > far and not any("Off the axes" in c.value for c in at.caption)


def test_a_saved_model_named_as_a_shipped_one_gets_a_label_of_its_own_in_the_pickers(tmp_path, monkeypatch):
    """The URL keeps the picker's text: two models reading "digits-z2 (β=1)" made the shipped one unreachable."""
    import shutil

    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.setattr(ui.core, "USER_DIR", user)
    monkeypatch.setattr(ui.tradeoff, "USER_DIR", user)
    shutil.copy(ui.core.ROOT / "checkpoints" / "digits-z16.pt", user / "digits-z2.pt")  # a 16-D model, so named
    at = open_page("pages/tradeoff.py")
    assert not at.exception
    options = at.selectbox(key="rd_a").options
    assert len(options) == len(set(options))
    twins = [o for o in options if "digits-z2 (β=1)" in o]
    assert sorted(twins) == ["saved: digits-z2 (β=1)", "shipped: digits-z2 (β=1)"]
    at.selectbox(key="rd_a").select("file:checkpoints/digits-z2.pt").run()
    assert not at.exception and at.selectbox(key="rd_a").value == "file:checkpoints/digits-z2.pt"
    assert any(m.label == "active units" and m.value.endswith("/2") for m in at.metric)


def test_shipped_models_are_never_left_off_the_zoomed_plane():
    def pt(source, r, d):
        return ui.tradeoff.PlanePoint(f"file:{source}-{r}-{d}", "m", source, "digits", 1.0, "β=1",
                                      {"rate": r, "distortion": d})

    crowd = [pt("run", 3.0 + 0.1 * i, 21.0 + 0.1 * i) for i in range(8)]  # many similar runs: a tight middle
    edge = pt("shipped sweep", 14.3, 16.5)  # the sweep's β = 0.1 end, far from that middle
    assert ui.tradeoff.outliers([(edge.rd["rate"], edge.rd["distortion"])] +
                                [(p.rd["rate"], p.rd["distortion"]) for p in crowd])[0]
    assert ui.tradeoff.far_flags([edge, *crowd]) == [False] * 9
    wild = pt("saved", 0.0, 400.0)
    assert ui.tradeoff.far_flags([edge, *crowd, wild])[-1]
    box, off = ui.tradeoff.plane_extent([edge, *crowd, wild], zoom=True)
    assert off == [False] * 9 + [True] and box[3] < 100  # the wild one off the axes, the rest on
    assert ui.tradeoff.plane_extent([edge, *crowd, wild], zoom=True, keep={wild.ref})[1] == [False] * 10  # model A
    neighbour = pt("saved", 14.0, 16.6)  # an outlier by the quartiles, but next to the shipped edge: inside the box
    assert ui.tradeoff.far_flags([edge, *crowd, neighbour])[-1]
    assert ui.tradeoff.plane_extent([edge, *crowd, neighbour], zoom=True)[1] == [False] * 10  # so not "off"


def test_points_on_one_spot_share_one_label_each_beta_once():
    def pt(ref, source, label, beta, r, d):
        return ui.tradeoff.PlanePoint(ref, label, source, "digits", beta, f"β={beta:g}", {"rate": r, "distortion": d})

    shipped = pt("file:b1", "shipped sweep", "sweep β=1", 1.0, 6.0, 20.0)
    rerun = pt("run:a", "run", "sweep β=1 (seed 0)", 1.0, 6.01, 20.02)  # the same β and seed: the same point
    other = pt("run:b", "run", "sweep β=2", 2.0, 6.02, 19.98)  # a different β that happens to land there too
    apart = pt("run:c", "run", "sweep β=4", 4.0, 2.0, 30.0)
    texts = ui.tradeoff._labels([shipped, rerun, other, apart])
    assert texts == {"file:b1": "β=1, 2", "run:a": "", "run:b": "", "run:c": "β=4"}


def test_texts_of_nearby_points_go_on_sides_that_do_not_overlap():
    def pt(ref, source, r, d):
        return ui.tradeoff.PlanePoint(ref, ref, source, "digits", 1.0, "β=1", {"rate": r, "distortion": d})

    box = (0.0, 15.0, 15.0, 30.0)  # about 47 px a nat across, 32 px a nat up at height 640
    shipped, run = pt("file:s", "shipped sweep", 1.2, 23.8), pt("run:r", "run", 1.5, 24.0)  # 14 px apart
    alone = pt("run:a", "run", 10.0, 20.0)
    texts = {"file:s": "β=2", "run:r": "β=1", "run:a": "β=0.1"}
    where = ui.tradeoff.text_positions([run, alone, shipped], texts, box, height=640)
    # the shipped text first: not above-right, where the run's star is; the run's then not below, where that went
    assert (where["file:s"], where["run:r"]) == ("bottom right", "top right")
    assert where["run:a"] == "bottom right"  # a run alone: below its star


def test_out_of_range_numbers_for_a_sweep_or_a_lab_are_named_and_start_nothing(registry):
    at = open_page("pages/tradeoff.py")
    at.number_input(key="rd_epochs").set_value(5000)
    next(b for b in at.button if b.label == "Start sweep").click().run()
    assert not at.exception and registry.jobs() == []
    assert any("epochs = 5,000 is out of range: use a number from 1 to 500" in e.value for e in at.error)
    at.number_input(key="rd_epochs").set_value(4)
    at.number_input(key="rd_lambda").set_value(-0.5)
    next(b for b in at.button if b.label == "Start sweep").click().run()
    assert registry.jobs() == [] and any("free bits λ (nats) = -0.5 is out of range" in e.value for e in at.error)
    lab = open_page("pages/collapse.py")
    lab.number_input(key="lab_epochs").set_value(2)
    lab.button(key="lab_run").click().run()
    assert not lab.exception and registry.jobs() == []
    assert any("epochs per run = 2 is out of range: use a number from 5 to 300" in e.value for e in lab.error)


def test_model_a_follows_the_sidebar_model_when_it_is_on_the_plane():
    at = open_page("pages/tradeoff.py", model=SWEEP[4])
    assert not at.exception
    assert at.selectbox(key="rd_a").value == SWEEP[4]  # not the β = 1 default: the model the user picked
    at.selectbox(key="model").set_value(SWEEP[1]).run()
    assert not at.exception and at.selectbox(key="rd_a").value == SWEEP[1]
    at.selectbox(key="rd_a").set_value(SWEEP[5]).run()  # chosen on the page: kept while the sidebar stays
    at.run()
    assert at.selectbox(key="rd_a").value == SWEEP[5]


def test_the_frontier_is_of_the_standard_decoders_and_an_autoregressive_one_is_named():
    """An autoregressive decoder reaches a lower D for its R: on the standard VAEs' frontier it made the text about
    model A false (the line no longer touched A)."""
    from ui.tradeoff import PlanePoint, plane_figure

    def pt(label, r, d, decoder="standard"):
        return PlanePoint(f"run:{label}", label, "run", "digits", 1.0, "β=1",
                          {"rate": r, "distortion": d, "elbo": -(r + d)}, decoder=decoder)

    pts = [pt("a", 1.0, 30.0), pt("b", 3.0, 22.0), pt("c", 8.0, 20.0), pt("ar", 0.01, 19.0, "autoregressive")]
    fig = plane_figure(pts, show_paths=False)
    front = next(t for t in fig.data if str(t.name).startswith("frontier"))
    assert 0.01 not in front.x and set(front.x) <= {1.0, 3.0, 8.0} and "standard decoder" in front.name
    assert pts[3].objective == "β=1 · autoregressive decoder" and pts[0].objective == "β=1"
    labels = [a.text for a in fig.layout.annotations if str(a.text).startswith("ELBO")]
    assert labels and not any(t == "ELBO -0" for t in labels)
