"""Checkpoints: one self-describing file per model, written atomically, read with torch.load(weights_only=True).

A file holds: format, format_version, model_config, train_config, state_dict, history, metrics, dataset, created.
A crafted pickle cannot run code (weights_only); truncated, corrupt, foreign or newer files raise CheckpointError
with a one-line message naming the file and the reason.
"""
from __future__ import annotations

import datetime as _dt
import os
import pickle
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig, TrainConfig
from .model import VAE

FORMAT = "vae-explorer"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file could not be used; the message names the file and why."""


def make_checkpoint(model: VAE, train_config: TrainConfig | None = None, history: dict | None = None,
                    metrics: dict | None = None, dataset: str | None = None) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "train_config": train_config.to_dict() if train_config is not None else None,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "history": history or {},
        "metrics": metrics or {},
        "dataset": dataset or (train_config.dataset if train_config is not None else None),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def save_checkpoint(path: str | os.PathLike, ckpt: dict) -> Path:
    """Write ckpt to path atomically: a temp file in the same folder, flushed, then renamed over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load and validate the raw checkpoint dict (weights_only=True)."""
    path = Path(path)
    name = str(path)
    if path.is_dir():
        raise CheckpointError(f"{name}: is a folder, not a checkpoint file (`python -m vae list {name}` lists the "
                              f"checkpoints in it)")
    if not path.is_file():
        raise CheckpointError(f"{name}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns about some pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        unsafe = [ln.strip() for ln in text.splitlines() if "Unsupported global" in ln or "Unsupported class" in ln]
        if not unsafe:  # random bytes also fail in the restricted unpickler ("Unsupported operand 103")
            raise CheckpointError(f"{name}: not a readable PyTorch checkpoint (truncated, corrupt, or another "
                                  f"kind of file); re-save or re-download it") from None
        detail = unsafe[0].removeprefix("WeightsUnpickler error: ").split(". ")[0]  # "Unsupported global: ..."
        raise CheckpointError(f"{name}: refused to load: it holds objects other than tensors and plain data, which "
                              f"could run code ({detail[:120]})") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint (truncated, corrupt, or another kind "
                              f"of file); re-save or re-download it") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{name}: not a VAE Explorer checkpoint (no format={FORMAT!r} key); save models "
                              f"with `python -m vae train` or the Train page")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{name}: format version {version!r} is newer than this VAE Explorer reads "
                              f"({FORMAT_VERSION}); update VAE Explorer")
    for key in ("model_config", "state_dict"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{name}: the checkpoint has no {key}")
    return ckpt


def model_from_checkpoint(ckpt: dict, name: str = "checkpoint") -> VAE:
    try:
        config = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{name}: invalid model_config ({exc})") from None
    model = VAE(config)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines[1:] if ln), lines[0] if lines else "")  # past "Error(s) in loading..."
        raise CheckpointError(f"{name}: the weights do not fit the model_config ({detail[:160]})") from None
    return model.eval()


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = "cpu"):
    """(model in eval mode on device, info dict without the state_dict)."""
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, str(path))
    if device is not None:
        from .device import resolve_device

        model = model.to(resolve_device(str(device)) if isinstance(device, str) else device)
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    info["path"] = str(path)
    return model, info


@dataclass
class CheckpointSummary:
    path: str
    name: str
    size_bytes: int
    mtime: float
    dataset: str | None = None
    model_config: dict | None = None
    train_config: dict | None = None
    metrics: dict | None = None
    created: str | None = None
    error: str | None = None  # set when the file could not be read


def list_checkpoints(folder: str | os.PathLike = "checkpoints") -> list[CheckpointSummary]:
    """Every *.pt file in folder with its metadata (or its error), sorted by name."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
        st = p.stat()
        s = CheckpointSummary(path=str(p), name=p.stem, size_bytes=st.st_size, mtime=st.st_mtime)
        try:
            ck = read_checkpoint(p)
            s.dataset, s.model_config, s.train_config = ck.get("dataset"), ck["model_config"], ck.get("train_config")
            s.metrics, s.created = ck.get("metrics"), ck.get("created")
        except CheckpointError as exc:
            s.error = str(exc)
        out.append(s)
    return out
