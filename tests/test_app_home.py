"""Home under AppTest: the derivation with the right roles (q_φ the encoder, p_θ the decoder), the selected model's
images and figures, and the sidebar's controls that every page shares."""
from __future__ import annotations

from apptest_support import new_app_test, open_link


def _text(at) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption])


def test_home_states_the_derivation_and_shows_the_default_model():
    at = new_app_test()
    at.run()
    assert not at.exception
    assert at.title[0].value == "VAE Explorer"
    latex = "\n".join(x.value for x in at.latex)
    # log p_θ(x) = ELBO + KL(q_φ(z|x) || p_θ(z|x)) >= ELBO; ELBO = E_q[log p_θ(x|z)] - KL(q_φ(z|x) || p(z))
    assert r"\log p_\theta(x) &= \text{ELBO}" in latex
    assert r"\mathrm{KL}\!\left(q_\phi(z\mid x)\,\|\,p_\theta(z\mid x)\right)" in latex
    assert r"\ge\; \text{ELBO}" in latex
    assert (r"\mathbb{E}_{q_\phi(z\mid x)}\!\left[\log p_\theta(x\mid z)\right]" "\n"
            r"  - \mathrm{KL}\!\left(q_\phi(z\mid x)\,\|\,p(z)\right)") in latex
    text = _text(at)
    assert r"**encoder** $q_\phi(z\mid x)$" in text and r"**decoder** $p_\theta(x\mid z)$" in text
    assert "nats per example" in text and "summed over pixels and latent dimensions" in text
    labels = {m.label for m in at.metric}
    assert {"latent dims", "test ELBO (nats)", "active units"} <= labels
    elbo = next(m for m in at.metric if m.label == "test ELBO (nats)")
    assert float(elbo.value) < 0  # a Bernoulli decoder's ELBO: a log-probability
    captions = [i.caption for e in at.get("image") for i in e.proto.imgs]
    assert len(captions) == 3 and captions[0] == "test images x" and captions[1].startswith("reconstructions")
    assert captions[2] == "samples: z ~ N(0, I), decoded by p_θ"
    assert at.selectbox(key="model").value is not None and at.selectbox(key="device").value in ("auto", "cpu")
    assert at.toggle(key="present").value is False


def test_home_follows_the_model_picker_and_presentation_mode():
    at = new_app_test()
    at.run()
    opts = at.selectbox(key="model").options
    moons = next(o for o in opts if "moons" in o)
    at.selectbox(key="model").set_value(moons).run()
    assert not at.exception and any("2-D points" in i.value for i in at.info)
    assert at.query_params["model"] in (moons, [moons]) or moons in str(at.query_params["model"])
    def present_css():
        return any("Presentation mode" in e.proto.body for e in at.get("html"))

    assert not present_css()
    at.toggle(key="present").set_value(True).run()
    assert not at.exception and present_css()  # ui.core's PRESENT_CSS: larger type, the full width


def test_a_note_on_the_url_survives_present_being_spelled_1():
    """?present=1 is rewritten to true with a rerun: the note about a bad ?model= must still show."""
    at = open_link("pages/home.py", model="nope", present="1")
    assert not at.exception and at.toggle(key="present").value is True
    assert any("model 'nope' is not available" in w.value for w in at.sidebar.warning)


def test_a_device_this_machine_lacks_in_the_url_is_said_and_auto_used():
    at = open_link("pages/home.py", device="zzz")
    assert not at.exception and at.selectbox(key="device").value == "auto"
    assert any("device 'zzz' is not on this machine" in c.value for c in at.sidebar.caption)
    at.run()  # said once: the URL now holds the device used
    assert not any("is not on this machine" in c.value for c in at.sidebar.caption)


def test_a_bad_run_setting_in_the_environment_is_one_line_not_a_traceback(monkeypatch):
    import ui.core as core

    monkeypatch.setenv("VAE_MAX_JOBS", "lots")
    core.get_registry.clear()
    try:
        at = new_app_test()
        at.run()
        assert not at.exception
        assert [e.value for e in at.error] == [
            "VAE Explorer cannot start its run registry: $VAE_MAX_JOBS='lots' is not allowed: give a whole number "
            ">= 1. Fix it, then start `streamlit run app.py` again."]
    finally:
        monkeypatch.delenv("VAE_MAX_JOBS")
        core.get_registry.clear()
