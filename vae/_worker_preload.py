"""Imported once by the worker server (the forkserver's preload, see vae.jobs.worker_context): what every training
process would otherwise import and set up itself, seconds each time: torch, scikit-learn's datasets, and the
compiler stack that torch's first optimiser pulls in. No torch thread pool is started here, so forking stays safe."""
import torch
from sklearn.datasets import load_digits

from . import worker  # noqa: F401
from .trainer import make_optimizer

load_digits()  # its file into the page cache
make_optimizer([torch.nn.Parameter(torch.zeros(1))], 1e-3)
