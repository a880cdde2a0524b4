"""Checkpoints: a lossless round trip, atomic writes, no code execution from a crafted file, one-line errors that
name the file, and the shipped checkpoints' quality."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from vae import CheckpointError, list_checkpoints, load_checkpoint, load_dataset, save_checkpoint
from vae.checkpoint import FORMAT, FORMAT_VERSION, make_checkpoint, read_checkpoint
from vae.diagnostics import encode_dataset, evaluate, kl_decomposition


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, digits_train, digits_test):
    """A digits model trained for one epoch, its Trainer, and the file it was saved to."""
    from vae import Trainer, TrainConfig
    from vae.trainer import default_model_config

    cfg = TrainConfig(dataset="digits", epochs=1, lr=1e-2, seed=0, device="cpu")
    trainer = Trainer(cfg, default_model_config(digits_train, hidden=(32,), latent_dim=4), digits_train, digits_test)
    trainer.fit()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, trainer.checkpoint())
    return trainer, path


def test_round_trip(trained_checkpoint):
    trainer, path = trained_checkpoint
    model, info = load_checkpoint(path)
    original = trainer.model.state_dict()
    loaded = model.state_dict()
    assert list(loaded) == list(original)
    for k in original:
        assert torch.equal(loaded[k], original[k].cpu()), k
    assert not model.training and model.device == torch.device("cpu")
    assert info["format"] == FORMAT and info["format_version"] == FORMAT_VERSION
    assert info["model_config"] == trainer.model.config.to_dict()
    assert info["train_config"] == trainer.config.to_dict()
    assert info["history"] == trainer.history
    assert info["metrics"] == trainer.final_metrics() | {"samples_per_s": info["metrics"]["samples_per_s"]}
    assert info["metrics"]["test_elbo"] < 0 and info["dataset"] == "digits"
    assert info["path"] == str(path) and "state_dict" not in info and info["created"]
    x = load_dataset("digits", "test").x[:5]
    torch.testing.assert_close(model.reconstruct(x), trainer.model.reconstruct(x), rtol=0, atol=0)


def test_make_checkpoint_without_training():
    from conftest import tiny_model

    ck = make_checkpoint(tiny_model())
    assert ck["train_config"] is None and ck["history"] == {} and ck["dataset"] is None


def test_atomic_write_leaves_no_temp_files(tmp_path, trained_checkpoint):
    trainer, _ = trained_checkpoint
    target = tmp_path / "sub" / "m.pt"
    save_checkpoint(target, trainer.checkpoint())  # creates the folder
    save_checkpoint(target, trainer.checkpoint())  # and overwrites in place
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # what open() would give, not mkstemp's 0600
    good = target.read_bytes()
    # a failed write (an object torch.save cannot pickle) leaves the old file and no temp file behind
    bad = trainer.checkpoint() | {"metrics": {"oops": lambda: None}}
    with pytest.raises(Exception):
        save_checkpoint(target, bad)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.pt"]
    assert target.read_bytes() == good


class _Exploit:
    """Unpickling this object would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_save_that_must_not_replace_leaves_the_file_there_as_it_was(tmp_path, trained_checkpoint):
    ckpt = trained_checkpoint[0].checkpoint()
    path = tmp_path / "taken.pt"
    path.write_bytes(b"saved before")
    with pytest.raises(FileExistsError):
        save_checkpoint(path, ckpt, replace=False)
    assert path.read_bytes() == b"saved before" and sorted(p.name for p in tmp_path.iterdir()) == ["taken.pt"]
    fresh = save_checkpoint(tmp_path / "new.pt", ckpt, replace=False)
    assert read_checkpoint(fresh)["model_config"] == ckpt["model_config"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.pt", "taken.pt"]


def test_a_save_that_must_not_replace_works_where_the_folder_has_no_hard_links(tmp_path, trained_checkpoint,
                                                                               monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # as on a mount without hard links

    ckpt = trained_checkpoint[0].checkpoint()
    monkeypatch.setattr(os, "link", no_links)
    saved = save_checkpoint(tmp_path / "new.pt", ckpt, replace=False)
    assert read_checkpoint(saved)["model_config"] == ckpt["model_config"]
    with pytest.raises(FileExistsError):  # still never over an existing file
        save_checkpoint(tmp_path / "new.pt", ckpt, replace=False)
    assert read_checkpoint(saved)["model_config"] == ckpt["model_config"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.pt"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle-protocol-2", "pickle-protocol-4"])
def test_crafted_pickle_does_not_execute(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": FORMAT, "format_version": 1, "model_config": {}, "state_dict": {},
               "extra": _Exploit(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=int(writer[-1]))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert not marker.exists()
    assert str(path) in str(info.value)
    if writer != "pickle-protocol-4":  # protocol 4 is not even read far enough to meet the global
        assert "refused" in str(info.value) and "could run code" in str(info.value)
    # the file is really dangerous: a plain pickle load does run it
    if writer.startswith("pickle"):
        with open(path, "rb") as f:
            pickle.load(f)
        assert marker.exists()


def _write_truncated(path, good):
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_random(path, good):
    path.write_bytes(np.random.default_rng(0).bytes(5000))


def _write_text(path, good):
    path.write_text("not a checkpoint\n")


def _write_empty(path, good):
    path.write_bytes(b"")


def _write_plain_dict(path, good):
    torch.save({"state_dict": {"w": torch.zeros(2)}, "model_config": {}}, path)


def _write_future_version(path, good):
    ck = torch.load(good, weights_only=True)
    ck["format_version"] = 99
    torch.save(ck, path)


def _write_no_state_dict(path, good):
    ck = torch.load(good, weights_only=True)
    del ck["state_dict"]
    torch.save(ck, path)


def _write_mismatched_weights(path, good):
    ck = torch.load(good, weights_only=True)
    ck["model_config"]["latent_dim"] = 7
    torch.save(ck, path)


def _write_bad_config(path, good):
    ck = torch.load(good, weights_only=True)
    ck["model_config"]["arch"] = "transformer"
    torch.save(ck, path)


BAD_FILES = {
    "truncated": (_write_truncated, "not a readable PyTorch checkpoint"),
    "random-bytes": (_write_random, "not a readable PyTorch checkpoint"),
    "text": (_write_text, "not a readable PyTorch checkpoint"),
    "empty": (_write_empty, "not a readable PyTorch checkpoint"),
    "plain-dict": (_write_plain_dict, "not a VAE Explorer checkpoint"),
    "format-version-99": (_write_future_version, "newer"),
    "no-state-dict": (_write_no_state_dict, "no state_dict"),
    "mismatched-weights": (_write_mismatched_weights, "do not fit"),
    "bad-config": (_write_bad_config, "arch="),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_files_raise_checkpoint_error(tmp_path, trained_checkpoint, kind):
    _, good = trained_checkpoint
    writer, reason = BAD_FILES[kind]
    path = tmp_path / f"{kind}.pt"
    writer(path, good)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(str(path) + ":")
    assert reason in msg
    assert "\n" not in msg  # one line, for the CLI and the UI
    if kind in ("random-bytes", "text"):
        assert "could run code" not in msg  # garbage is corrupt, not dangerous


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file") as info:
        load_checkpoint(tmp_path / "nope.pt")
    assert str(tmp_path / "nope.pt") in str(info.value)
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        read_checkpoint(tmp_path)


def test_list_checkpoints(tmp_path, trained_checkpoint):
    _, good = trained_checkpoint
    (tmp_path / "b-good.pt").write_bytes(good.read_bytes())
    (tmp_path / "a-bad.pt").write_bytes(b"\x00garbage")
    (tmp_path / "notes.txt").write_text("not a checkpoint, not listed")
    rows = list_checkpoints(tmp_path)
    assert [r.name for r in rows] == ["a-bad", "b-good"]
    bad, ok = rows
    assert bad.error and str(tmp_path / "a-bad.pt") in bad.error and bad.model_config is None
    assert ok.error is None and ok.dataset == "digits" and ok.model_config["latent_dim"] == 4
    assert ok.metrics["test_elbo"] < 0 and ok.size_bytes == good.stat().st_size and ok.created
    assert list_checkpoints(tmp_path / "missing-folder") == []


# ---- the shipped checkpoints ---------------------------------------------------------------------------------------
SHIPPED = REPO / "checkpoints"
SWEEP_BETAS = ["0.1", "0.5", "1", "2", "4", "8"]
# Quality bar (digits test split, 359 images, one z sample per example, seed 0): test ELBO >= -26 nats for
# digits-z2 and digits-z16 (measured -24.26 and -23.99 when written; a fresh 1-epoch model scores about -43).
ELBO_BAR = -26.0


@pytest.fixture(scope="module")
def shipped_results(digits_test):
    out = {}
    for path in [SHIPPED / "digits-z2.pt", SHIPPED / "digits-z16.pt",
                 *[SHIPPED / "sweep" / f"digits-beta-{b}.pt" for b in SWEEP_BETAS]]:
        model, info = load_checkpoint(path)
        mu, logvar = encode_dataset(model, digits_test.x)
        out[path.relative_to(SHIPPED).as_posix()] = (model, info, evaluate(model, digits_test.x, seed=0), mu, logvar)
    return out


def test_shipped_checkpoints_load_and_are_small(shipped_results):
    assert len(shipped_results) == 8
    for name, (model, info, _, _, _) in shipped_results.items():
        assert os.path.getsize(SHIPPED / name) < 2 * 1024 * 1024, name
        assert info["dataset"] == "digits" and model.config.input_dim == 64
        assert info["train_config"]["dataset"] == "digits"
    assert shipped_results["digits-z2.pt"][0].config.latent_dim == 2
    assert shipped_results["digits-z16.pt"][0].config.latent_dim == 16


@pytest.mark.parametrize("name", ["digits-z2.pt", "digits-z16.pt"])
def test_shipped_quality_bar(shipped_results, name):
    _, info, r, _, _ = shipped_results[name]
    assert r["elbo"] >= ELBO_BAR, f"{name}: test ELBO {r['elbo']:.2f} nats is below the bar {ELBO_BAR}"
    assert r["active_units"] >= 2
    # the metrics stored in the file are the ones it actually scores
    assert info["metrics"]["test_elbo"] == pytest.approx(r["elbo"], abs=1e-4)


def test_shipped_beta_sweep(shipped_results):
    """The rate (KL, nats) falls as beta grows, and beta = 4 and 8 have collapsed: no active unit left."""
    results = {b: shipped_results[f"sweep/digits-beta-{b}.pt"] for b in SWEEP_BETAS}
    for b, (_, info, _, _, _) in results.items():
        assert info["train_config"]["beta"] == float(b)
    rates = [results[b][2]["kl"] for b in SWEEP_BETAS]
    assert all(hi > lo for hi, lo in zip(rates[:4], rates[1:5])), rates  # strictly down to beta = 4
    assert rates[5] <= rates[4] + 1e-3
    assert results["4"][2]["active_units"] == 0 and results["8"][2]["active_units"] == 0
    assert results["0.1"][2]["active_units"] > results["2"][2]["active_units"] > 0
    # ELBO surgery on the most informative model: the mutual information respects its cap log N
    _, _, _, mu, logvar = results["0.1"]
    r = kl_decomposition(mu, logvar, generator=torch.Generator().manual_seed(0))
    assert r["mutual_info"] <= r["mutual_info_max"] + 1e-6
    assert r["marginal_kl"] > 0


def _ck_file(tmp_path, name="m", model=None, **changes):
    from conftest import tiny_model

    ck = make_checkpoint(model or tiny_model(), dataset="digits")
    ck.update(changes)
    path = tmp_path / f"{name}.pt"
    torch.save(ck, path)
    return path


@pytest.mark.parametrize("changes, message", [
    (dict(metrics={"test_elbo": "oops"}), "invalid metrics"),
    (dict(metrics=[1, 2]), "invalid metrics"),
    (dict(metrics={"test_kl_per_dim": [0.1, "x"]}), "invalid metrics"),
    (dict(train_config=[1, 2]), r"invalid train_config \(a list, not a dict\)"),
    (dict(train_config={"epochs": "many"}), "invalid train_config"),
    (dict(history={"epoch": 5}), "invalid history"),
    (dict(history={"epoch": {"test_elbo": 3.0}}), "invalid history"),
    (dict(history={"events": "x"}), "invalid history"),
    (dict(metrics={"test_elbo": [1.0]}), "invalid metrics"),  # a list where Home formats a number
    (dict(history={"epoch": {"test_elbo": ["x"]}}), "invalid history"),
    (dict(history={"epoch": {"test_elbo": [[1.0]]}}), "invalid history"),
    (dict(history={"epoch": {"test_kl_per_dim": [[0.1, "x"]]}}), "invalid history"),
    (dict(history={"events": [{"text": "β → 2"}]}), "invalid history"),
    (dict(history={"events": [{"step": 3, "text": None}]}), "invalid history"),
    (dict(history={"epoch": {"test_elbo": torch.zeros(3, dtype=torch.float64)}}), "invalid history"),  # step's only
    (dict(dataset="cifar"), r"dataset 'cifar' is not one VAE Explorer has \(digits, "),
    (dict(dataset=3), "dataset 3 is not one"),
])
def test_metadata_the_pages_read_is_checked(tmp_path, changes, message):
    """A file made elsewhere with wrong metadata is refused with a one-line reason naming it (it crashed pages)."""
    path = _ck_file(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_dataset_must_fit_the_model_and_is_worked_out_when_missing(tmp_path):
    from vae import ModelConfig
    from vae.trainer import build_model

    big = build_model(ModelConfig(input_dim=784, image_shape=(28, 28), hidden=(8,), latent_dim=2), 0)
    with pytest.raises(CheckpointError, match="the model takes 28x28 inputs but says dataset 'digits', whose are 8x8"):
        read_checkpoint(_ck_file(tmp_path, "a", big))
    assert read_checkpoint(_ck_file(tmp_path, "b", big, dataset=None))["dataset"] == "mnist"
    odd = build_model(ModelConfig(input_dim=25, image_shape=(5, 5), hidden=(8,), latent_dim=2), 0)
    with pytest.raises(CheckpointError, match="the model takes 5x5 inputs, which no dataset here has"):
        read_checkpoint(_ck_file(tmp_path, "c", odd, dataset=None))
    ck = read_checkpoint(_ck_file(tmp_path, "d", metrics=None, history=None))  # absent metadata: empty, not None
    assert ck["metrics"] == {} and ck["history"] == {} and ck["dataset"] == "digits"


# ---- format 2: the per-step lists stored as tensors --------------------------------------------------------------
def test_per_step_lists_are_stored_as_tensors_and_read_back_as_the_same_lists(tmp_path):
    from conftest import tiny_model

    history = {"step": {"step": [1, 2, 3], "loss": [0.5, 0.25, 1e-300], "mixed": [1, 2.5], "empty": [],
                        "huge": [1, 2 ** 70]},
               "epoch": {"epoch": [1], "test_kl_per_dim": [[0.1, 0.2]]}, "events": [{"step": 2, "text": "lr"}]}
    ck = make_checkpoint(tiny_model(), history=history)
    ck["job"] = {"trainer_state": {"history": history, "step_count": 3}}  # an autosave: the same history twice
    path = save_checkpoint(tmp_path / "a.pt", ck)
    assert ck["history"] is history and type(history["step"]["loss"]) is list  # the caller's dict is untouched
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION == 2
    steps = raw["history"]["step"]
    assert steps["step"].dtype == torch.int64 and steps["loss"].dtype == torch.float64
    assert [type(steps[k]) for k in ("mixed", "empty", "huge")] == [list] * 3  # not one kind of number: as is
    assert raw["job"]["trainer_state"]["history"] is raw["history"]  # stored once
    back = read_checkpoint(path)
    assert back["history"] == history and back["job"]["trainer_state"]["history"] == history
    assert [type(x) for x in back["history"]["step"]["step"]] == [int] * 3
    assert back["history"]["step"]["loss"][2] == 1e-300  # float64: exact


def test_a_format_1_file_with_lists_is_still_read(tmp_path, trained_checkpoint):
    trainer, _ = trained_checkpoint
    ck = trainer.checkpoint()
    ck["format_version"] = 1
    torch.save(ck, tmp_path / "old.pt")  # lists, as format 1 wrote them
    assert read_checkpoint(tmp_path / "old.pt")["history"] == trainer.history


def test_a_history_tensor_that_is_not_a_list_of_numbers_is_refused(tmp_path, trained_checkpoint):
    trainer, _ = trained_checkpoint
    ck = trainer.checkpoint()
    ck["history"]["step"]["loss"] = torch.zeros(2, 2)
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="invalid history"):
        read_checkpoint(tmp_path / "bad.pt")
