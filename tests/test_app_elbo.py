"""AppTest for pages/elbo.py on the shipped 2-D and 16-D models: the derivation's numbers, the figures, the grid
check for a 2-D latent, and one-line messages for bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from apptest_support import open_page
from conftest import tiny_model

PAGE = "pages/elbo.py"
Z2, Z16 = "file:checkpoints/digits-z2.pt", "file:checkpoints/digits-z16.pt"
FAST = dict(elbo_k=500, elbo_s=200)  # keep the AppTests quick


def _metrics(at) -> dict:
    return {m.label: m.value for m in at.metric}


def _number(text: str) -> float:
    return float(text.replace("−", "-").split()[0])


def _charts(at) -> int:
    return len(at.get("plotly_chart"))


def test_page_on_the_2d_model():
    at = open_page(PAGE, model=Z2, elbo_idx=3, **FAST)
    assert not at.exception and not at.error
    m = _metrics(at)
    elbo, kl = _number(m["ELBO (nats)"]), _number(m["KL(q_φ(z|x) ‖ p(z)), closed form (nats)"])
    recon = _number(m["E_q[log p_θ(x|z)], S = 200 samples (nats)"])
    log_px = _number(m["log p_θ(x), importance sampling, K = 500 (nats)"])
    grid = _number(m["log p_θ(x), grid integral 241² (nats)"])
    gap = _number(m["gap = log p(x) − ELBO, IS (nats)"])
    assert elbo == pytest.approx(recon - kl, abs=0.011)  # shown to 2 decimals
    assert gap == pytest.approx(log_px - elbo, abs=0.011)
    assert _number(m["loss = −ELBO at β = 1 (nats)"]) == pytest.approx(-elbo, abs=0.011)
    assert -30 < elbo < log_px < 0 and kl > 0 and gap > 0  # digits: ELBO about -24 nats
    assert abs(log_px - grid) < 0.5
    assert "KL(q ‖ p(z|x)), quadrature (nats)" in m
    assert any("within the tolerance" in s.value for s in [*at.success, *at.warning])
    assert _charts(at) == 4  # decomposition, IWAE curve, posterior heatmap, ELBO per epoch
    assert not at.info  # no "no grid" notice for a 2-D latent


def test_page_on_the_16d_model_explains_the_missing_grid():
    at = open_page(PAGE, model=Z16, elbo_draws=False, present=True, **FAST)  # presentation mode's layout too
    assert not at.exception and not at.error
    m = _metrics(at)
    assert "log p_θ(x), grid integral 241² (nats)" not in m
    assert _number(m["gap = log p(x) − ELBO, IS (nats)"]) > 0
    assert any("No grid for this model: its latent has 16 dimensions" in i.value for i in at.info)
    assert _charts(at) == 3  # no posterior heatmap
    from ui.core import PRESENT_AXIS_TITLE_PX

    bars = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]  # its subplot titles are annotations
    assert bars["annotations"] and all(a["font"]["size"] == PRESENT_AXIS_TITLE_PX for a in bars["annotations"])


def test_page_average_over_a_set_and_history_log_px():
    at = open_page(PAGE, model=Z2, elbo_mode="first N images", elbo_n=8, elbo_draws=False, **FAST)
    assert not at.exception and not at.error
    assert any("of 8 images agree within tolerance" in md.value for md in at.markdown)
    assert any("choose 'one image'" in i.value for i in at.info)
    # log p(x) of the current weights on the history chart, and the honest note about per-epoch log p(x)
    at.toggle(key="elbo_hist_lp").set_value(True).run(timeout=120)
    assert not at.exception and not at.error
    assert any("which are not stored" in c.value and "Gap now" in c.value for c in at.caption)


@pytest.mark.parametrize("mode, extra, draws", [("one image", {}, 10), ("first N images", {"elbo_n": 4}, 3),
                                                ("first N images", {"elbo_n": 40}, 2)])
def test_a_set_takes_fewer_independent_draws_for_its_iwae_curve(mode, extra, draws):
    """Each draw's curve already averages the N images; the draws were 8 times the rest's time on 50 images."""
    at = open_page(PAGE, model=Z16, elbo_mode=mode, **extra, **FAST)
    assert not at.exception and not at.error
    fig = json.loads(next(c for c in at.get("plotly_chart") if "elbo_iwae" in str(c.proto.id)).proto.spec)
    assert any(t.get("name") == f"L_K: mean of {draws} draws ±1 SE" for t in fig["data"])


BAD_INPUTS = [
    ("elbo_k", 99999, "K=99999 is out of range: choose between 10 and 5000"),
    ("elbo_idx", 5000, "image index 5000 is out of range: the test split has 359 images, pick 0 to 358"),
    ("elbo_s", 1, "S=1 is out of range"),
]


def test_bad_inputs_give_one_line_messages():
    """Each bad value in turn (as typed, or from a shared link): one st.error line, no traceback; then a good value
    brings the page back."""
    at = open_page(PAGE, model=Z16, elbo_draws=False, **FAST)
    assert not at.exception and not at.error
    good = {"elbo_k": FAST["elbo_k"], "elbo_idx": 0, "elbo_s": FAST["elbo_s"]}
    for key, value, message in BAD_INPUTS:
        at.number_input(key=key).set_value(value).run()
        assert not at.exception
        assert len(at.error) == 1 and message in at.error[0].value, (key, value, [e.value for e in at.error])
        assert "\n" not in at.error[0].value
        at.number_input(key=key).set_value(good[key]).run()
        assert not at.exception and not at.error
    at.number_input(key="elbo_idx").set_value(-1)  # two bad boxes at once: one line naming both
    at.number_input(key="elbo_k").set_value(10_000_000).run()
    assert len(at.error) == 1 and "\n" not in at.error[0].value
    assert at.error[0].value.startswith("K=10000000 is out of range: choose between ")
    assert "importance samples; also image index -1 is out of range" in at.error[0].value
    at.number_input(key="elbo_idx").set_value(0)
    at.number_input(key="elbo_k").set_value(FAST["elbo_k"]).run()
    assert not at.exception and not at.error
    at.radio(key="elbo_mode").set_value("first N images").run()
    at.number_input(key="elbo_n").set_value(0).run()
    assert len(at.error) == 1 and "number of images 0 is out of range: average over 1 to 359 images" in \
        at.error[0].value


def test_unavailable_dataset_gives_one_line_message(tmp_path, monkeypatch):
    """A model trained on MNIST, offline and without the files: one line that says what to do."""
    import torchvision.datasets

    import ui.core
    from vae.checkpoint import make_checkpoint, save_checkpoint

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [])  # offline: the download fails at once
    monkeypatch.setattr(ui.core, "USER_DIR", tmp_path / "user")
    monkeypatch.setenv("VAE_DATA_ROOT", str(tmp_path / "data"))
    model = tiny_model(input_dim=784, image_shape=(28, 28), latent_dim=2)
    save_checkpoint(tmp_path / "user" / "mnist-tiny.pt", make_checkpoint(model, dataset="mnist"))
    at = open_page(PAGE, model=ui.core.file_ref(tmp_path / "user" / "mnist-tiny.pt"))
    assert not at.exception
    assert len(at.error) == 1 and "Test data unavailable: dataset 'mnist' is not available" in at.error[0].value
    assert _charts(at) == 0


def test_the_headline_numbers_add_up_as_shown():
    """ELBO + gap = log p(x) on screen: more decimals where two would show -27.30 + 0.02 = -27.29."""
    from ui.anatomy_figures import headline_decimals

    elbo, log_px = -27.3049, -27.2886
    d = headline_decimals(elbo, log_px, log_px - elbo)
    assert d == 3 and round(round(elbo, d) + round(log_px - elbo, d), d) == round(log_px, d)
    assert headline_decimals(-27.30, -27.10, 0.20) == 2  # already adds up: two decimals, as everywhere
    rng = np.random.default_rng(0)
    for elbo, gap in zip(rng.uniform(-300, 0, 200), rng.uniform(0, 5, 200)):
        d = headline_decimals(elbo, elbo + gap, gap)
        assert 2 <= d <= 4
        if d < 4:
            assert round(round(elbo, d) + round(gap, d), d) == round(elbo + gap, d)


def test_a_2d_data_point_is_written_to_three_decimals():
    at = open_page(PAGE, model="file:checkpoints/moons-z2.pt", elbo_idx=0, **FAST)
    assert not at.exception and not at.error
    shown = [m.value for m in at.markdown if m.value.startswith("x = (")]
    assert len(shown) == 1 and all(len(v.strip().split(".")[1]) == 3 for v in shown[0][5:-1].split(","))
