"""Imported once by the worker server (the forkserver's preload, see vae.jobs.worker_context): what every training
process would otherwise import and set up itself, seconds each time: torch, scikit-learn's datasets, and the
compiler stack that torch's first optimiser pulls in. No torch thread pool is started here, so forking stays safe.
It runs at the workers' lower priority (its children inherit it): booting it must not slow the server's first page."""
import os

try:
    os.nice(int(os.environ.get("VAE_JOB_NICE", "10") or 10))
except (OSError, ValueError, AttributeError):
    pass

import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from . import worker  # noqa: F401,E402
from .device import flush_denormals  # noqa: E402
from .trainer import make_optimizer  # noqa: E402

flush_denormals()  # the workers forked from here start with it (vae.device.flush_denormals)

load_digits()  # its file into the page cache
make_optimizer([torch.nn.Parameter(torch.zeros(1))], 1e-3)
