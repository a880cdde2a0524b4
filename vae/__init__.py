"""VAE Explorer's core: a variational autoencoder and everything to train, evaluate and inspect it.

Pure PyTorch/NumPy (no Streamlit). q_phi(z|x) is the encoder, p_theta(x|z) the decoder; every term is in nats per
example, summed over pixels and latent dimensions and averaged over the batch.
"""
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from .config import ModelConfig, TrainConfig
from .data import DatasetUnavailable, load_dataset
from .device import available_devices, resolve_device
from .losses import ELBOTerms, elbo_terms, iw_log_px, iwae_bound
from .model import VAE
from .schedules import Schedule, make_schedule
from .trainer import Trainer, TrainingDiverged

__all__ = ["VAE", "ModelConfig", "TrainConfig", "Trainer", "TrainingDiverged", "ELBOTerms", "elbo_terms",
           "iwae_bound", "iw_log_px", "Schedule", "make_schedule", "load_dataset", "DatasetUnavailable",
           "load_checkpoint", "save_checkpoint", "list_checkpoints", "CheckpointError", "available_devices",
           "resolve_device"]
