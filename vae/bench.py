"""Training throughput of the in-memory trainer against the canonical PyTorch VAE loop, on MNIST-shaped data.

Both train the reference MLP 784-400-20 (Bernoulli, batch 128, Adam 1e-3) for the same number of steps:
  - baseline: torchvision.datasets.MNIST read through a DataLoader with a per-sample ToTensor, the model and loss of
    pytorch/examples/vae (sigmoid + BCE, separate mu/logvar layers, Adam with default settings);
  - ours:     vae.Trainer on the same images held in memory on the device, its steps taken as Trainer.fit takes
              them (Trainer.steps: with the C library, vae.native, a chunk of steps in one call).
roofline_fraction = achieved FLOP/s of our step over the measured throughput of the same GEMMs (forward and backward
of every Linear at batch 128, the shapes and transposes our step issues: vae.fused, and vae.native's C step, which
calls the same BLAS sgemm_ as torch.mm) run back to back on this machine.
"""
from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, TrainConfig
from .data import Dataset, data_root, write_idx
from .device import flush_denormals, resolve_device
from .trainer import Trainer

LAYERS = ((784, 400), (400, 40), (20, 400), (400, 784))  # ours: mu and logvar come from one 400 -> 40 GEMM


class CanonicalVAE(nn.Module):
    """pytorch/examples vae/main.py, verbatim in structure."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        return mu + torch.randn_like(std) * std

    def decode(self, z):
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def canonical_loss(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def _images(n: int, seed: int) -> np.ndarray:
    """MNIST-shaped uint8 images: the real training images when data/MNIST has them, else smooth random blobs."""
    try:
        from torchvision import datasets

        ds = datasets.MNIST(str(data_root()), train=True, download=False)
        return ds.data[:n].numpy()
    except Exception:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:28, 0:28]
        cy, cx = rng.uniform(8, 20, (2, n, 1, 1))
        r = rng.uniform(3, 7, (n, 1, 1))
        img = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2))
        return (255 * img).astype(np.uint8)


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), for benchmark reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gemm_seconds(batch: int, device, repeats: int) -> float:
    """Seconds for one step's GEMMs, as the trainer's fused step issues them (vae.fused.FusedStep, and the C step of
    vae.native through the same BLAS: same shapes, same transposes): forward addmm(b, X, W^T); grad-weight
    mm(GY^T, X); grad-input mm(GY, W) except for layer 1. Best of 5 timings of `repeats` back-to-back steps."""
    mats = []
    for i, (a, b) in enumerate(LAYERS):
        x, w, gy, bias = (torch.randn(batch, a, device=device), torch.randn(b, a, device=device),
                          torch.randn(batch, b, device=device), torch.randn(b, device=device))
        mats.append((x, w, gy, bias, i > 0))

    def run():
        for x, w, gy, bias, need_gx in mats:
            torch.addmm(bias, x, w.t())
            torch.mm(gy.t(), x)
            if need_gx:
                torch.mm(gy, w)

    for _ in range(10):
        run()
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            run()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def step_flops(batch: int) -> float:
    f = 0.0
    for i, (a, b) in enumerate(LAYERS):
        f += 2 * batch * a * b * (3 if i > 0 else 2)
    return f


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_baseline(images, steps, batch_size, seed, log) -> float:
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as tmp:
        raw = f"{tmp}/MNIST/raw"
        import os

        os.makedirs(raw)
        write_idx(f"{raw}/train-images-idx3-ubyte", images)
        write_idx(f"{raw}/train-labels-idx1-ubyte", np.zeros(len(images), np.uint8))
        write_idx(f"{raw}/t10k-images-idx3-ubyte", images[:16])
        write_idx(f"{raw}/t10k-labels-idx1-ubyte", np.zeros(16, np.uint8))
        ds = datasets.MNIST(tmp, train=True, download=False, transform=transforms.ToTensor())
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True)
        model = CanonicalVAE()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()

        def one(data):
            opt.zero_grad()
            recon, mu, logvar = model(data)
            loss = canonical_loss(recon, data, mu, logvar)
            loss.backward()
            opt.step()
            return loss.item()

        it = iter(loader)
        for _ in range(10):  # warm-up
            one(next(it)[0])
        done, t0 = 0, time.perf_counter()
        while done < steps:
            for data, _ in loader:
                one(data)
                done += 1
                if done >= steps:
                    break
        dt = time.perf_counter() - t0
    sps = steps * batch_size / dt
    log(f"baseline (DataLoader + ToTensor, canonical loop): {sps:,.0f} samples/s over {steps} steps")
    return sps


def run_ours(images, steps, batch_size, seed, device, log) -> tuple[float, float]:
    x = torch.from_numpy(images.reshape(len(images), -1)).float() / 255.0
    y = torch.zeros(len(images), dtype=torch.long)
    train = Dataset("mnist", "train", x, y, (28, 28))
    test = Dataset("mnist", "test", x[:256], y[:256], (28, 28))
    cfg = TrainConfig(dataset="mnist", epochs=10_000, batch_size=batch_size, lr=1e-3, seed=seed, device=str(device))
    mcfg = ModelConfig(input_dim=784, image_shape=(28, 28), hidden=(400,), latent_dim=20, likelihood="bernoulli")
    trainer = Trainer(cfg, mcfg, train, test)
    per_epoch = trainer.steps_per_epoch

    def run(n):  # as Trainer.fit runs its steps (Trainer.steps: in chunks, one C call each where it can)
        while n > 0:
            n -= len(trainer.steps(n))

    run(10)
    _sync(device)
    # time only optimiser steps: skip the per-epoch test evaluation by stopping short of epoch ends
    done, elapsed = 0, 0.0
    while done < steps:
        left_in_epoch = per_epoch - (trainer.step_count % per_epoch) - 1
        if left_in_epoch <= 0:
            trainer.step()
            continue
        n = min(steps - done, left_in_epoch)
        t0 = time.perf_counter()
        run(n)
        _sync(device)
        elapsed += time.perf_counter() - t0
        done += n
    sps = steps * batch_size / elapsed
    why = ""
    if device.type == "cpu" and trainer.fused and trainer.step_path != "native fused step":
        from . import native

        why = f" (the C step is off: {native.unavailable_reason()})"
    log(f"ours (in-memory trainer, {trainer.step_path}, {device}): {sps:,.0f} samples/s over {steps} steps{why}")
    return sps, elapsed / steps


def run_bench(steps: int = 300, batch_size: int = 128, device: str = "cpu", seed: int = 0, log=print) -> dict:
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps}, batch_size={batch_size}: both must be >= 1")
    dev = resolve_device(device)
    # both loops with denormals flushed, as the CLI runs them (the CLI set it before torch's thread pool started;
    # called from Python after the pool has started, only this thread is covered: vae.device.flush_denormals)
    ftz = flush_denormals()
    log(f"machine: {platform.machine()} {cpu_name()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {dev}, denormals {'flushed' if ftz else 'kept'}")
    images = _images(max(10_000, batch_size * 20), seed)
    base = run_baseline(images, steps, batch_size, seed, log)
    ours, step_s = run_ours(images, steps, batch_size, seed, dev, log)
    gemm_s = _gemm_seconds(batch_size, dev, repeats=max(20, steps // 4))
    flops = step_flops(batch_size)
    achieved, peak = flops / step_s, flops / gemm_s
    result = {"samples_per_s": ours, "baseline_samples_per_s": base, "speedup": ours / base,
              "roofline_fraction": achieved / peak, "achieved_gflops": achieved / 1e9,
              "gemm_gflops": peak / 1e9, "steps": steps, "batch_size": batch_size, "device": str(dev),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "flush_denormals": ftz}
    log(f"speedup: {result['speedup']:.2f}x")
    log(f"roofline_fraction: {result['roofline_fraction']:.2f} "
        f"({achieved / 1e9:.1f} GFLOP/s achieved / {peak / 1e9:.1f} GFLOP/s for the same GEMMs)")
    return result
