"""AppTest for the Latent space and Decode pages: the projection path by latent size, a slider moving the decoded
image, the traversal grid's shape, a kept selection, t-SNE, moons' data space, a 1-D strip, a checkpoint whose
dataset is missing, and the encoding cache following a model's weights."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import app_test as _app_test

import ui.core
from apptest_support import open_page
from vae import ModelConfig, load_checkpoint, load_dataset
from vae.checkpoint import make_checkpoint, save_checkpoint
from vae.diagnostics import encode_dataset
from vae.latent_ops import dims_by_kl
from vae.projection import dimension_stats
from vae.trainer import build_model

Z2 = "file:checkpoints/digits-z2.pt"
Z16 = "file:checkpoints/digits-z16.pt"
MOONS = "file:checkpoints/moons-z2.pt"


# ---- helpers -------------------------------------------------------------------------------------------------------
class _RecordingStorage(MemoryMediaFileStorage):
    """AppTest's media storage, remembered so a test can read back the PNG bytes behind st.image."""

    instances: list = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        _RecordingStorage.instances.append(self)


@pytest.fixture
def media(monkeypatch):
    _RecordingStorage.instances = []
    monkeypatch.setattr(_app_test, "MemoryMediaFileStorage", _RecordingStorage)

    def read(url: str) -> np.ndarray:
        name = url.rsplit("/", 1)[-1]
        return np.asarray(Image.open(io.BytesIO(_RecordingStorage.instances[-1].get_file(name).content)))

    return read


def images(at, caption_part: str | None = None):
    out = [im for im in at.get("image") if caption_part is None or any(caption_part in c for c in im.captions)]
    return out


def decoded_url(at) -> str:
    [im] = images(at, "decoded by p_θ")
    return im.value[0]


def plotly_specs(at) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def no_exception(at):
    assert not at.exception, [e.value for e in at.exception]


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A private checkpoints/user folder for checkpoints made in the test (the sidebar lists them)."""
    folder = tmp_path / "user"
    folder.mkdir()
    monkeypatch.setattr(ui.core, "USER_DIR", folder)
    return folder


def _save(folder: Path, name: str, dataset: str, **model) -> str:
    cfg = dict(input_dim=64, image_shape=(8, 8), hidden=(32,), latent_dim=3)
    cfg.update(model)
    path = save_checkpoint(folder / f"{name}.pt", make_checkpoint(build_model(ModelConfig(**cfg), 0), dataset=dataset))
    return ui.core.file_ref(path)


@pytest.fixture(scope="module")
def z16_stats():
    """Per-dimension statistics of the shipped 16-D model on the digits test split, computed here independently."""
    m, _ = load_checkpoint("checkpoints/digits-z16.pt")
    mu, logvar = encode_dataset(m, load_dataset("digits", "test").x)
    return dimension_stats(mu.numpy(), logvar.numpy())


# ---- Latent space ----------------------------------------------------------------------------------------------
def test_latent_pca_for_16d_and_direct_for_2d(z16_stats):
    at = open_page("pages/latent.py", model=Z16)
    no_exception(at)
    assert at.selectbox(key="latent_method").value == "pca"
    assert any("PCA of 16-D means" in c.value and "% of their variance" in c.value for c in at.caption)
    scatter = plotly_specs(at)[0]
    assert scatter["layout"]["xaxis"]["title"]["text"].startswith("PC1 (")
    assert any(t["type"] == "scattergl" for t in scatter["data"])  # WebGL markers
    assert any(f"{z16_stats.n_active} of 16 dimensions active" in c.value for c in at.caption)

    at = open_page("pages/latent.py", model=Z2)
    no_exception(at)
    assert at.selectbox(key="latent_method").value == "identity"
    assert not any("PCA" in c.value for c in at.caption)
    scatter = plotly_specs(at)[0]
    assert scatter["layout"]["xaxis"]["title"]["text"] == "z1"
    # prior contours and +-2 sigma ellipses are drawn in the plane
    assert any(t.get("name", "").startswith("prior N(0, I)") for t in scatter["data"])
    assert sum(t["type"] == "scatter" and t.get("mode") == "lines" for t in scatter["data"]) >= 2


def test_the_kl_bars_of_a_collapsed_model_stay_flat_and_name_the_inactive_ones():
    at = open_page("pages/latent.py", model="file:checkpoints/sweep/digits-beta-8.pt")
    no_exception(at)
    dims = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "latent_dims" in str(c.proto.id))
    kl = dims["data"][0]
    assert dims["layout"]["yaxis"]["range"] == [0, 0.5]  # KLs of 1e-6 nats are not drawn as tall bars
    assert set(kl["text"]) == {"inactive"} and kl["textangle"] == -90 and kl["constraintext"] == "none"


def test_latent_raw_dims_and_tsne(z16_stats):
    at = open_page("pages/latent.py", model=Z16)
    at.selectbox(key="latent_method").set_value("dims").run()
    no_exception(at)
    x, y = at.selectbox(key="latent_dim_x").value, at.selectbox(key="latent_dim_y").value
    assert (x, y) == tuple(int(k) for k in dims_by_kl(z16_stats.kl)[:2])  # the two with the most KL
    at.selectbox(key="latent_dim_y").set_value(x).run()
    assert any("choose two different dimensions" in w.value for w in at.warning)
    at.selectbox(key="latent_dim_y").set_value(3).run()
    at.selectbox(key="latent_method").set_value("tsne").run()
    no_exception(at)
    assert any("t-SNE of 359 points" in c.value for c in at.caption)
    assert any("not a linear map" in i.value for i in at.info)


def test_latent_selection_is_kept_and_shows_images():
    at = open_page("pages/latent.py", model=Z2)
    n = len(load_dataset("digits", "test"))
    at.session_state["latent_selection"] = {"data": ("digits", "test", n), "rows": [3, 5, 8], "event": []}
    at.run()
    no_exception(at)
    assert any("3 selected" in m.value for m in at.markdown)
    assert images(at, "originals x") and images(at, "reconstructions")
    at.selectbox(key="latent_method").set_value("tsne").run()  # a rerun with another projection keeps it
    assert at.session_state["latent_selection"]["rows"] == [3, 5, 8]
    assert any("3 selected" in m.value for m in at.markdown)
    assert at.query_params["sel"] in ("3,5,8", ["3,5,8"])  # in the URL: a reload or a link shows it
    at.button(key="latent_clear").click().run()
    assert at.session_state["latent_selection"]["rows"] == [] and "sel" not in at.query_params


def test_a_link_with_a_selection_opens_with_it():
    from apptest_support import open_link

    at = open_link("pages/latent.py", model=Z2, sel="3,5-7,99999")  # the last row is past the split's end: dropped
    no_exception(at)
    assert at.session_state["latent_selection"]["rows"] == [3, 5, 6, 7]
    assert any("4 selected" in m.value for m in at.markdown)


@pytest.mark.parametrize("sel", ["abc", "99999", "20-3"])
def test_a_link_whose_selection_has_no_point_here_says_so(sel):
    from apptest_support import open_link

    at = open_link("pages/latent.py", model=Z2, sel=sel)
    no_exception(at)
    assert at.session_state["latent_selection"]["rows"] == []
    assert any(f"?sel={sel} selects none of the" in c.value for c in at.caption)


def test_moons_data_space_beside_latent_space():
    at = open_page("pages/latent.py", model=MOONS)
    no_exception(at)
    titles = [s["layout"].get("title", {}).get("text", "") for s in plotly_specs(at)]
    assert any(t.startswith("data space") for t in titles)


def test_one_dimensional_latent_gets_a_strip(user_dir):
    ref = _save(user_dir, "d1", "digits", latent_dim=1)
    at = open_page("pages/latent.py", model=ref)
    no_exception(at)
    assert at.selectbox(key="latent_method").value == "strip"
    scatter = plotly_specs(at)[0]
    assert scatter["layout"]["yaxis"]["showticklabels"] is False
    at = open_page("pages/decode.py", model=ref)
    no_exception(at)
    assert [s.key for s in at.slider if s.key.startswith("dec_z_")] == ["dec_z_0"]  # one slider, one dimension
    before = decoded_url(at)
    at.slider(key="dec_z_0").set_value(3.0).run()
    assert decoded_url(at) != before


# ---- Decode ----------------------------------------------------------------------------------------------------
def test_decode_slider_changes_image_and_orders_by_kl(z16_stats):
    at = open_page("pages/decode.py", model=Z16)
    no_exception(at)
    stats = z16_stats
    top = int(dims_by_kl(stats.kl)[0])
    sliders = [s for s in at.slider if s.key and s.key.startswith("dec_z_")]
    assert len(sliders) == 16
    # the decoder-sensitivity bars in the sliders' order (most informative first), not z1, z2, ...
    sens = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "dec_sens_fig" in str(c.proto.id))
    assert sens["data"][0]["x"] == [f"z{int(i) + 1}" for i in dims_by_kl(stats.kl)]
    assert {s.key for s in sliders if "inactive: barely moves the image" in s.label} == \
        {f"dec_z_{k}" for k in range(16) if not stats.active[k]}
    before = decoded_url(at)
    at.slider(key=f"dec_z_{top}").set_value(2.5).run()
    no_exception(at)
    assert decoded_url(at) != before
    assert any(c.value.startswith("z = (") and "2.50" in c.value for c in at.caption)
    # starting from a prior sample moves every slider to that sample
    at.radio(key="dec_start").set_value("prior").run()
    assert any(abs(at.slider(key=f"dec_z_{k}").value) > 0 for k in range(16))


def test_the_sliders_point_is_in_the_url_and_a_link_opens_with_it(z16_stats):
    from apptest_support import open_link

    at = open_page("pages/decode.py", model=Z16)
    assert "z" not in at.query_params  # at its start: no point in the URL
    top = int(dims_by_kl(z16_stats.kl)[0])
    at.slider(key=f"dec_z_{top}").set_value(2.5).run()
    want = ["0"] * 16
    want[top] = "2.5"
    assert at.query_params["z"] in (",".join(want), [",".join(want)])
    image = decoded_url(at)
    at.button(key="dec_reset").click().run()  # back to the start: the point leaves the URL
    assert "z" not in at.query_params and at.slider(key=f"dec_z_{top}").value == 0.0
    # a link (or a reload) with that point: the sliders open there; a point for another d is ignored
    for text, value in ((",".join(want), 2.5), ("1,2,3", 0.0), ("nonsense", 0.0)):
        at = open_link("pages/decode.py", model=Z16, z=text)
        no_exception(at)
        assert at.slider(key=f"dec_z_{top}").value == value, text
        assert (decoded_url(at) == image) == (value == 2.5)  # the very image the link was made from
        assert any("is not a point of this model's 16 latent dimensions" in c.value for c in at.caption) \
            == (value != 2.5)  # a link it cannot use says so
    far = want.copy()
    far[top] = "100"
    at = open_link("pages/decode.py", model=Z16, z=",".join(far))  # past the sliders' ends: there, and said
    no_exception(at)
    assert at.slider(key=f"dec_z_{top}").value == 3.0
    assert any("beyond the sliders' ±3" in c.value for c in at.caption)


def test_traversal_grid_shape(media, z16_stats):
    at = open_page("pages/decode.py", model=Z16)
    at.slider(key="dec_trav_rows").set_value(3).run()
    at.slider(key="dec_trav_cols").set_value(5).run()
    no_exception(at)
    assert any(c.value.startswith("3 dimensions × 5 values") for c in at.caption)
    # the rows are labelled by dimension in KL order, and each row image holds 5 8x8 tiles
    labels = [m.value.split("**")[1] for m in at.markdown if m.value.startswith("**z")]
    assert labels == [f"z{k + 1}" for k in dims_by_kl(z16_stats.kl)[:3]]
    i0 = [i for i, im in enumerate(at.get("image")) if "decoded by p_θ" in im.captions[0]][0]
    rows = at.get("image")[i0 + 1:i0 + 4]
    for im in rows:
        px = media(im.value[0])
        h, w = px.shape[:2]
        scale = h // 10  # one row of 8-pixel tiles with 1-pixel padding above and below
        assert h == 10 * scale and w == (5 * 9 + 1) * scale, (h, w)


def test_missing_dataset_message_and_decoding_still_works(user_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DATA_ROOT", str(tmp_path / "no-data"))
    ref = _save(user_dir, "mnist-nodata", "mnist", input_dim=784, image_shape=(28, 28))
    at = open_page("pages/latent.py", model=ref)
    no_exception(at)
    [warn] = at.warning
    assert "dataset 'mnist' is not available" in warn.value and "Put the four files" in warn.value
    assert any("Decode" in i.value for i in at.info)

    at = open_page("pages/decode.py", model=ref)
    no_exception(at)
    assert any("is not available" in w.value and "still work" in w.value for w in at.warning)
    assert [s.label for s in at.slider if s.key.startswith("dec_z_")] == ["z1", "z2", "z3"]  # no KL to claim
    before = decoded_url(at)
    assert images(at, "32 samples at T = 1.0")  # prior samples need no data
    at.slider(key="dec_temp").set_value(0.5).run()
    assert images(at, "32 samples at T = 0.5")
    at.slider(key="dec_z_0").set_value(-2.0).run()
    no_exception(at)
    assert decoded_url(at) != before
    at.radio(key="dec_start").set_value("image").run()  # needs the data: a message, no traceback
    no_exception(at)
    assert any("Starting from a test image needs the dataset" in w.value for w in at.warning)


def test_decode_moons_points():
    at = open_page("pages/decode.py", model=MOONS)
    no_exception(at)
    titles = [s["layout"].get("title", {}).get("text", "") for s in plotly_specs(at)]
    assert "E[x|z] in data space" in titles


# ---- the encoding cache follows the weights --------------------------------------------------------------------
def test_encoded_split_follows_the_weights_key():
    from ui.core import Selection
    from ui.latent import encoded_split

    a = build_model(ModelConfig(hidden=(16,), latent_dim=2), 0).eval()
    b = build_model(ModelConfig(hidden=(16,), latent_dim=2), 1).eval()
    info = {"dataset": "digits"}
    first, _ = encoded_split(Selection("run:t", "t", a, info, key="run:t:1:cpu"), "test")
    again, _ = encoded_split(Selection("run:t", "t", b, info, key="run:t:1:cpu"), "test")
    newer, _ = encoded_split(Selection("run:t", "t", b, info, key="run:t:2:cpu"), "test")
    np.testing.assert_array_equal(first.mu, again.mu)  # same key: served from the cache
    with torch.no_grad():
        ref = b.encode(load_dataset("digits", "test").x)[0].numpy()
    np.testing.assert_allclose(newer.mu, ref, rtol=1e-5, atol=1e-6)  # new weights version: re-encoded
    assert newer.key != first.key


def test_update_selection_keeps_rows_until_a_new_pick():
    from ui.latent import selected_rows, update_selection

    store = {"rows": [], "event": []}
    assert update_selection(store, [4, 7])
    assert not update_selection(store, [4, 7])  # the same event again: nothing new
    assert not update_selection(store, [])  # a redrawn chart comes back empty: the selection is kept
    assert store["rows"] == [4, 7]
    store["rows"] = []  # Clear
    assert not update_selection(store, []) and store["rows"] == []
    event = {"selection": {"points": [{"customdata": 5}, {"customdata": [2]}, {"x": 1.0}], "point_indices": []}}
    assert selected_rows(event) == [2, 5]
    assert selected_rows(None) == []


def test_live_run_refreshes_with_its_weights(tmp_path, monkeypatch):
    """A live run's latest weights: the page shows them, and after more steps a rerun shows the new ones."""
    import time

    from vae import TrainConfig
    from vae.jobs import JobRegistry

    reg = JobRegistry(autosave_dir=tmp_path / "autosave")
    monkeypatch.setattr(ui.core, "get_registry", lambda: reg)
    job = reg.submit(TrainConfig(dataset="digits", epochs=5, batch_size=128, lr=1e-2, device="cpu"),
                     ModelConfig(hidden=(32,), latent_dim=2), name="live", start_paused=True)

    def steps(n):
        target = job.snapshot().step + n
        job.step_once(n)
        deadline = time.monotonic() + 30
        while job.snapshot().step < target and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.snapshot().step >= target

    try:
        steps(1)
        at = open_page("pages/latent.py", model=f"run:{job.id}")
        no_exception(at)
        assert at.toggle(key="latent_follow").value  # a paused run is still live: follow it
        version = job.snapshot().weights_version
        assert any(f"weights version {version}" in c.value for c in at.caption)
        surgery = [c.value for c in at.caption if "ELBO surgery" in c.value]
        steps(8)
        at.run()
        no_exception(at)
        assert any(f"weights version {job.snapshot().weights_version}" in c.value for c in at.caption)
        assert [c.value for c in at.caption if "ELBO surgery" in c.value] != surgery  # re-encoded, not stale
    finally:
        job.stop()
        reg.shutdown()


def test_more_than_16_dims_holds_the_rest(user_dir):
    ref = _save(user_dir, "d20", "digits", latent_dim=20)
    at = open_page("pages/decode.py", model=ref)
    no_exception(at)
    assert sum(s.key.startswith("dec_z_") for s in at.slider) == 16
    assert any("4 less informative dimensions held" in c.value for c in at.caption)
    at.number_input(key="dec_n_sliders").set_value(20).run()
    no_exception(at)
    assert sum(s.key.startswith("dec_z_") for s in at.slider) == 20


def test_decode_numbers_out_of_range_are_brought_in_with_a_note():
    from ui.core import get_dataset

    n_test = len(get_dataset("digits", "test", False)[0].x)
    at = open_page("pages/decode.py", model=Z16)
    at.radio(key="dec_start").set_value("image").run()
    at.number_input(key="dec_image").set_value(99_999).run()
    no_exception(at)
    assert any(f"Test image # 99,999 is outside 0 to {n_test - 1}: showing {n_test - 1}" in c.value
               for c in at.caption)
    assert at.session_state["dec_signature"][-1] == n_test - 1  # the sliders start from the last test image
    at.number_input(key="dec_sample_seed").set_value(-3).run()
    no_exception(at)
    assert any("Seed -3 is outside 0 to 1,000,000: showing 0" in c.value for c in at.caption)


def test_aggregate_posterior_plot_draws_the_prior_at_1_2_3_sigma():
    """The q(z) plot's prior rings are the 1, 2 and 3 sigma circles of N(0, I) (as on the scatter), not density
    contours at other radii."""
    from ui.latent import Codes, aggregate_figure
    from vae.projection import project

    rng = np.random.default_rng(0)
    mu = rng.normal(size=(200, 2))
    codes = Codes("test-aggregate", mu, np.full_like(mu, -2.0), np.zeros(200, int), "digits", "test")
    fig = aggregate_figure(codes, project(mu))
    prior = [t for t in fig.data if t.name and t.name.startswith("prior")]
    assert len(prior) == 1 and prior[0].type == "scatter"
    x, y = (np.array([v for v in getattr(prior[0], a) if v is not None], float) for a in ("x", "y"))
    r = np.hypot(x, y)
    assert np.allclose(np.unique(r.round(6)), [1, 2, 3])


def test_decode_morph_slider_goes_from_one_test_image_to_the_other():
    at = open_page("pages/decode.py", model=Z16)
    no_exception(at)
    morph = at.slider(key="dec_morph_t")
    assert morph.value == 0.5 and "0 = #9 (a 4)" in morph.label and "1 = #24 (a 9)" in morph.label  # a 4 to a 9
    [mid] = images(at, "decoded at t = 0.50")  # between x_a and x_b
    before = mid.value[0]
    morph.set_value(0.0).run()
    no_exception(at)
    [mid] = images(at, "decoded at t = 0.00")
    assert mid.value[0] != before and at.slider(key="dec_morph_t").value == 0.0


def test_kl_estimates_a_hair_below_zero_show_as_zero():
    assert [ui.core.nats2(v) for v in (-0.001, 0.004, -0.3, 3.071)] == ["0.00", "0.00", "-0.30", "3.07"]
