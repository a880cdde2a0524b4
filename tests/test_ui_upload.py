"""Uploading a checkpoint (ui.core.accept_upload): validated with weights_only before anything is kept, a bad file
changes nothing, and nothing already saved is ever replaced."""
from __future__ import annotations

import io

import pytest
import torch

import ui.core
from vae import ModelConfig
from vae.checkpoint import CheckpointError, make_checkpoint
from vae.trainer import build_model


@pytest.fixture()
def user_dir(tmp_path, monkeypatch):
    folder = tmp_path / "user"
    monkeypatch.setattr(ui.core, "USER_DIR", folder)
    return folder


def _bytes(latent_dim: int, seed: int = 0) -> bytes:
    cfg = ModelConfig(input_dim=64, image_shape=(8, 8), hidden=(16,), latent_dim=latent_dim)
    buf = io.BytesIO()
    torch.save(make_checkpoint(build_model(cfg, seed), dataset="digits"), buf)
    return buf.getvalue()


def test_a_good_upload_is_kept_under_its_name(user_dir):
    path, note = ui.core.accept_upload("mine.pt", _bytes(2))
    assert path == user_dir / "mine.pt" and note is None
    assert path.read_bytes()  # a checkpoint written by save_checkpoint (it loads: the next test reads one back)


def test_an_upload_never_replaces_a_saved_checkpoint_of_the_same_name(user_dir):
    first, _ = ui.core.accept_upload("live8.pt", _bytes(8))
    before = first.read_bytes()
    second, note = ui.core.accept_upload("live8.pt", _bytes(16, seed=1))
    assert first.read_bytes() == before  # untouched
    assert second == user_dir / "live8-2.pt" and "live8-2" in note and "already saved" in note
    assert ui.core.load_selection(ui.core.file_ref(second), "cpu").model.config.latent_dim == 16
    third, _ = ui.core.accept_upload("live8.pt", _bytes(4, seed=2))
    assert third.name == "live8-3.pt"
    again, note = ui.core.accept_upload("live8.pt", _bytes(16, seed=1))  # the second file once more
    assert again == second and "uploaded before" in note and "live8-2" in note
    assert sorted(p.name for p in user_dir.glob("live8*.pt")) == ["live8-2.pt", "live8-3.pt", "live8.pt"]


def test_the_same_file_uploaded_again_is_not_kept_twice(user_dir):
    data = _bytes(2)
    path, _ = ui.core.accept_upload("twice.pt", data)
    assert path.read_bytes() == data  # kept as uploaded
    again, note = ui.core.accept_upload("twice.pt", data)
    assert again == path and note is None and sorted(p.name for p in user_dir.iterdir()) == ["twice.pt"]


@pytest.mark.parametrize("filename, name", [("mine (1).pt", "mine-1"), ("my model.PT", "my-model"),
                                            ("../../etc/x.pt", "x"), ("(1).pt", "1"), ("???.pt", "upload")])
def test_browser_style_file_names_become_valid_names(user_dir, filename, name):
    path, _ = ui.core.accept_upload(filename, _bytes(2))
    assert path == user_dir / f"{name}.pt"


def _mismatched() -> bytes:
    """A readable checkpoint whose 28x28 model says it is of the 8x8 digits: it passed, then crashed the pages."""
    cfg = ModelConfig(input_dim=784, image_shape=(28, 28), hidden=(16,), latent_dim=2)
    buf = io.BytesIO()
    torch.save(make_checkpoint(build_model(cfg, 0), dataset="digits"), buf)
    return buf.getvalue()


@pytest.mark.parametrize("data", [b"", b"not a checkpoint", _bytes(2)[:100], _mismatched()],
                         ids=["empty", "text", "truncated", "model-not-of-its-dataset"])
def test_a_bad_upload_says_so_and_writes_nothing(user_dir, data):
    ui.core.accept_upload("keep.pt", _bytes(2))
    kept = (user_dir / "keep.pt").read_bytes()
    with pytest.raises(CheckpointError, match="bad.pt"):
        ui.core.accept_upload("bad.pt", data)
    with pytest.raises(CheckpointError):
        ui.core.accept_upload("keep.pt", data)  # a bad file under a saved name leaves the saved one as it was
    assert sorted(p.name for p in user_dir.iterdir()) == ["keep.pt"] and (user_dir / "keep.pt").read_bytes() == kept


def test_the_upload_note_shows_once_in_the_sidebar_outside_its_expander():
    from apptest_support import new_app_test

    at = new_app_test()
    at.session_state["_upload_note"] = "a different checkpoint named 'x' was already saved; this one is kept as 'x-2'"
    at.run()
    assert [i.value for i in at.sidebar.info if "kept as 'x-2'" in i.value]
    assert not [i for e in at.sidebar.expander for i in e.info]  # not inside the (closed) upload expander
    at.run()
    assert not [i.value for i in at.sidebar.info if "kept as" in i.value]  # said once


def test_the_model_picker_lists_what_the_user_made_first_newest_at_the_top(user_dir):
    import os

    older, _ = ui.core.accept_upload("older.pt", _bytes(2))
    newer, _ = ui.core.accept_upload("newer.pt", _bytes(4, seed=1))
    os.utime(older, (1_000_000, 1_000_000))  # saved long before the other
    labels = list(ui.core.model_options().values())
    kinds = [label.split(":")[0] for label in labels]  # live runs of other tests may be there too: first
    assert kinds == sorted(kinds, key=["run", "saved", "shipped"].index) and "shipped" in kinds
    assert [label for label in labels if label.startswith("saved: ")] == ["saved: newer", "saved: older"]


def test_a_file_replaced_with_its_old_modification_time_kept_is_reloaded(user_dir):
    """The model cache's key is the file's stamp (times in ns, size, inode): `cp -p` over a checkpoint keeps the
    old modification time, and the old weights were served."""
    import os

    path, _ = ui.core.accept_upload("swap.pt", _bytes(2))
    first = ui.core.load_selection(ui.core.file_ref(path), "cpu")
    assert ui.core.load_selection(ui.core.file_ref(path), "cpu").model is first.model  # unchanged: the cached one
    st_ = path.stat()
    data = _bytes(2, seed=5)
    assert len(data) == st_.st_size  # the same size: only the change time tells the files apart
    path.write_bytes(data)  # in place, as cp -p writes: the same inode ...
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))  # ... and the old modification time
    assert path.stat().st_ino == st_.st_ino and path.stat().st_mtime_ns == st_.st_mtime_ns
    second = ui.core.load_selection(ui.core.file_ref(path), "cpu")
    assert first.error is None and second.error is None and first.key != second.key
    w1, w2 = first.model.state_dict(), second.model.state_dict()
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_a_renamed_upload_says_what_it_is_kept_as(user_dir):
    path, note = ui.core.accept_upload("name with spaces & ünï.pt", _bytes(2))
    assert path.name == "name-with-spaces-n.pt"
    assert note == ("'name with spaces & ünï.pt' is kept as 'name-with-spaces-n': a checkpoint name takes ASCII "
                    "letters, digits, '.', '_' and '-'")
    _, same = ui.core.accept_upload("plain.pt", _bytes(2))
    assert same is None  # kept under its own name: nothing to say


def test_a_browser_is_known_by_its_xsrf_token_whatever_the_mask():
    import os as _os

    from ui.core import xsrf_identity

    def cookie(token: bytes, mask: bytes, ts: int = 1796172254) -> str:
        masked = bytes(b ^ mask[i % len(mask)] for i, b in enumerate(token))
        return f"2|{mask.hex()}|{masked.hex()}|{ts}"

    token, other = _os.urandom(32), _os.urandom(32)
    one = xsrf_identity(cookie(token, b"\x01\x02\x03\x04"))
    assert one is not None and token.hex() not in one  # a hash, not the token
    assert xsrf_identity(cookie(token, _os.urandom(4), ts=1)) == one  # a reload: a new mask, the same browser
    assert xsrf_identity(cookie(other, b"\x01\x02\x03\x04")) != one  # another browser
    for bad in (None, "", "abc", "1|00|00|1", "2|zz|00|1", "2||00|1", "2|01|02"):
        assert xsrf_identity(bad) is None, bad
