"""`python -m vae` as a user runs it, in subprocesses: the last stdout line is JSON; errors are one stderr line.

Each process spends most of its time importing torch, so the independent runs start together (one thread each)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

ERROR_CASES = {
    "latent-dim-0": ["train", "--latent-dim", "0", "--epochs", "1", "--quiet"],
    "unknown-dataset": ["train", "--dataset", "nope", "--quiet"],
    "negative-lr": ["train", "--lr", "-1", "--quiet"],
    "missing-checkpoint": ["evaluate", "{tmp}/missing.pt"],
    "corrupt-checkpoint": ["evaluate", "{tmp}/corrupt.pt"],
}


def _start(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    return subprocess.Popen([sys.executable, "-m", "vae", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc):
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train a tiny model (2 epochs), then evaluate its checkpoint; the error cases run alongside the training."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "corrupt.pt").write_bytes(b"this is not a checkpoint\n")
    ckpt = tmp / "tiny.pt"
    train = _start(["train", "--dataset", "digits", "--epochs", "2", "--hidden", "32", "--latent-dim", "4",
                    "--lr", "1e-2", "--seed", "0", "--device", "cpu", "--quiet", "--out", str(ckpt)])
    errors = {name: _start([a.format(tmp=tmp) for a in args]) for name, args in ERROR_CASES.items()}
    results = {"train": _finish(train)}
    evaluate = _start(["evaluate", str(ckpt), "--iw-samples", "50", "--device", "cpu"])
    results |= {name: _finish(p) for name, p in errors.items()}
    results["evaluate"] = _finish(evaluate)
    results["ckpt"] = ckpt
    results["tmp"] = tmp
    return results


def _json_result(run):
    rc, out, err = run
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines, err
    return json.loads(lines[-1])


def test_train_prints_json(runs):
    r = _json_result(runs["train"])
    assert {"test_elbo", "test_recon", "test_kl", "active_units", "samples_per_s"} <= set(r)
    assert r["test_elbo"] < 0
    assert r["test_recon"] > 0 and r["test_kl"] >= 0
    assert r["test_elbo"] == pytest.approx(-(r["test_recon"] + r["test_kl"]))
    assert 0 <= r["active_units"] <= 4 and r["samples_per_s"] > 0
    assert r["epochs"] == 2 and r["steps"] == 24 and r["latent_dim"] == 4 and r["dataset"] == "digits"
    assert r["checkpoint"] == str(runs["ckpt"]) and runs["ckpt"].is_file()
    assert "Traceback" not in runs["train"][2]


def test_evaluate_prints_json(runs):
    train, r = _json_result(runs["train"]), _json_result(runs["evaluate"])
    assert {"elbo", "log_px", "recon", "kl", "kl_per_dim", "active_units"} <= set(r)
    assert r["iw_samples"] == 50 and r["split"] == "test" and r["n"] == 359 and r["dataset"] == "digits"
    assert len(r["kl_per_dim"]) == 4
    assert r["elbo"] < 0
    assert r["log_px"] >= r["elbo"] - 0.05  # L_50 >= ELBO, up to Monte Carlo error
    assert r["log_px_stderr"] >= 0
    # the same model, split and seed as training's final evaluation: the same figures
    assert r["elbo"] == pytest.approx(train["test_elbo"], abs=1e-4)
    assert r["kl"] == pytest.approx(train["test_kl"], abs=1e-4)
    assert r["active_units"] == train["active_units"]


def test_list_prints_json(runs, capsys):
    """In-process (main() is what `python -m vae` calls), to spare one more torch import."""
    from vae.cli import main

    assert main(["list", str(runs["tmp"]), "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {row["name"]: row for row in r["checkpoints"]}
    assert set(rows) == {"corrupt", "tiny"}
    assert rows["tiny"]["error"] is None and rows["tiny"]["latent_dim"] == 4 and rows["tiny"]["test_elbo"] < 0
    assert str(runs["tmp"] / "corrupt.pt") in rows["corrupt"]["error"]


@pytest.mark.parametrize("argv, says", [(["evaluate", "x.pt", "--split", "validation"], "invalid choice"),
                                        (["train", "--epochs", "1.5"], "invalid int value: '1.5'"),
                                        (["bogus"], "invalid choice: 'bogus'")])
def test_argparse_errors_are_one_line_and_exit_2(capsys, argv, says):
    from vae.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and says in err and "--help" in err


def test_list_of_a_missing_folder_is_an_error(tmp_path, capsys):
    from vae.cli import main

    assert main(["list", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such folder" in capsys.readouterr().err


def test_out_is_checked_before_training_and_never_replaced_unasked(tmp_path, capsys):
    from vae.cli import main

    kept = tmp_path / "kept.pt"
    kept.write_bytes(b"an earlier checkpoint")
    assert main(["train", "--epochs", "1", "--quiet", "--out", str(kept)]) == 2
    err = capsys.readouterr().err
    assert f"--out {kept} exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert kept.read_bytes() == b"an earlier checkpoint"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--epochs", "1", "--quiet", "--out", str(blocker / "sub" / "m.pt")]) == 2
    assert "cannot write in" in capsys.readouterr().err  # before a single step: no "epochs" in any output
    assert main(["train", "--epochs", "1", "--quiet", "--max-examples", "64", "--hidden", "16", "--latent-dim",
                 "2", "--overwrite", "--out", str(kept)]) == 0
    assert kept.read_bytes() != b"an earlier checkpoint"


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_one_error_line(runs, case):
    rc, out, err = runs[case]
    assert rc != 0
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    expected = {"latent-dim-0": "latent_dim=0", "unknown-dataset": "dataset='nope'", "negative-lr": "lr=-1",
                "missing-checkpoint": str(runs["tmp"] / "missing.pt"),
                "corrupt-checkpoint": str(runs["tmp"] / "corrupt.pt")}[case]
    assert expected in lines[0]
