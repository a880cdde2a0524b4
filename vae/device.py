"""Device selection: auto picks cuda, then mps, then cpu; an explicit choice that does not exist is an error."""
from __future__ import annotations

import torch


def available_devices() -> list[str]:
    """The devices this machine has, cpu always last."""
    out = []
    if torch.cuda.is_available():
        out.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out + ["cpu"]


def resolve_device(name: str | None = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device(available_devices()[0])
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={name!r} is not known: choose auto, cpu, cuda or mps")
    if name not in available_devices():
        raise ValueError(f"device={name!r} is not available on this machine: choose one of "
                         f"{', '.join(['auto', *available_devices()])}")
    return torch.device(name)
