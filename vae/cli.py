"""python -m vae {train, evaluate, list, bench}: the last stdout line of each command is one JSON object.

Errors are one line on stderr with a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from .config import ARCHS, DECODERS, DEVICES, LIKELIHOODS, SCHEDULES, ModelConfig, TrainConfig, parse_hidden


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def emit(obj: dict) -> None:
    print(json.dumps(_json_safe(obj)), flush=True)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .data import DATASETS

    d = TrainConfig()
    p.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(DATASETS)} (default %(default)s)")
    p.add_argument("--data-root", default=None, help="folder with MNIST-style files (default $VAE_DATA_ROOT or data/)")
    p.add_argument("--binarize", action="store_true", help="static Bernoulli binarisation of the data")
    p.add_argument("--max-examples", type=int, default=None, help="train on the first N examples only")
    p.add_argument("--arch", default="mlp", help=f"{' | '.join(ARCHS)} (default %(default)s)")
    p.add_argument("--hidden", default="256,128", help="hidden sizes, comma-separated (default %(default)s)")
    p.add_argument("--latent-dim", type=int, default=16, help="latent dimensions d (default %(default)s)")
    p.add_argument("--likelihood", default=None, help=f"{' | '.join(LIKELIHOODS)} (default: the dataset's)")
    p.add_argument("--sigma", type=float, default=0.1, help="decoder std for --likelihood gaussian")
    p.add_argument("--decoder", default="standard", help=f"{' | '.join(DECODERS)} (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm, 0 = off")
    p.add_argument("--beta", type=float, default=d.beta, help="KL weight (gamma for --beta-schedule capacity)")
    p.add_argument("--beta-schedule", default=d.beta_schedule, help=f"{' | '.join(SCHEDULES)}")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help="linear/logistic warm-up length; capacity: epochs to ramp C (default %(default)s)")
    p.add_argument("--cycles", type=int, default=d.cycles, help="cyclical: number of cycles M")
    p.add_argument("--cycle-ratio", type=float, default=d.cycle_ratio, help="cyclical: rising fraction R")
    p.add_argument("--capacity-max", type=float, default=d.capacity_max, help="capacity: C_max in nats")
    p.add_argument("--free-bits", type=float, default=d.free_bits, help="per-dimension KL floor lambda, nats")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help=f"{' | '.join(DEVICES)}")
    p.add_argument("--out", default=None, help="checkpoint path to write (default: none); an existing file is "
                                                "kept unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_out(out: Path, overwrite: bool) -> None:
    """ValueError (one line) if training could not end with a checkpoint at out, or would replace one unasked."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file path such as {out}/model.pt")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists: give another path, or add --overwrite to replace it")
    folder = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("."))
    try:  # a probe file: permission bits say nothing for root, nor for /proc or a read-only mount
        fd, probe = tempfile.mkstemp(prefix=".vae-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write in {folder} ({exc.strerror or exc})") from None


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (what was wrong, where to look), as every other CLI error."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def cmd_train(args) -> dict:
    from tqdm import tqdm

    from .checkpoint import save_checkpoint
    from .data import load_dataset
    from .trainer import Trainer, default_model_config

    cfg = TrainConfig(dataset=args.dataset, data_root=args.data_root, binarize=args.binarize, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, grad_clip=args.grad_clip, beta=args.beta,
                      beta_schedule=args.beta_schedule, warmup_epochs=args.warmup_epochs, cycles=args.cycles,
                      cycle_ratio=args.cycle_ratio, capacity_max=args.capacity_max, free_bits=args.free_bits,
                      seed=args.seed, device=args.device, max_examples=args.max_examples)
    overrides = dict(arch=args.arch, hidden=parse_hidden(args.hidden), latent_dim=args.latent_dim,
                     sigma=args.sigma, decoder=args.decoder)
    if args.likelihood:
        overrides["likelihood"] = args.likelihood
    train = load_dataset(cfg.dataset, "train", cfg.data_root, binarize=cfg.binarize, max_examples=cfg.max_examples)
    test = load_dataset(cfg.dataset, "test", cfg.data_root, binarize=cfg.binarize)
    mcfg = default_model_config(train, **overrides)
    if args.out:  # fail before training, not after
        check_out(Path(args.out), args.overwrite)
    trainer = Trainer(cfg, mcfg, train, test)
    bar = tqdm(total=trainer.total_steps, disable=args.quiet, file=sys.stderr, unit="step", dynamic_ncols=True)

    def on_step(rec):
        bar.update(1)
        if rec["epoch_end"]:
            e = trainer.last_epoch()
            bar.set_postfix(epoch=e["epoch"], test_elbo=f"{e['test_elbo']:.2f}", kl=f"{e['test_kl']:.2f}",
                            au=e["active_units"])

    try:
        metrics = trainer.fit(on_step=on_step)
    finally:
        bar.close()
    result = {"dataset": cfg.dataset, "latent_dim": mcfg.latent_dim, "beta": cfg.beta,
              "beta_schedule": cfg.beta_schedule, "free_bits": cfg.free_bits, "device": str(trainer.device),
              **{k: metrics[k] for k in ("test_elbo", "test_recon", "test_kl", "active_units", "samples_per_s",
                                         "epochs", "steps")}}
    if args.out:
        try:
            save_checkpoint(args.out, trainer.checkpoint())
        except OSError as exc:
            raise ValueError(f"could not write --out {args.out}: {exc.strerror or exc}") from None
        result["checkpoint"] = str(args.out)
    return result


def cmd_evaluate(args) -> dict:
    from .checkpoint import load_checkpoint
    from .data import load_dataset
    from .diagnostics import evaluate

    if args.iw_samples < 0:
        raise ValueError(f"--iw-samples {args.iw_samples} is not allowed: give K >= 0 (0 skips log p(x))")
    model, info = load_checkpoint(args.checkpoint, device=args.device)
    tc = info.get("train_config") or {}
    dataset = args.dataset or info.get("dataset") or "digits"
    data = load_dataset(dataset, args.split, args.data_root or tc.get("data_root"), binarize=tc.get("binarize", False))
    if data.dim != model.config.input_dim:
        raise ValueError(f"dataset '{dataset}' has D={data.dim} but the model expects {model.config.input_dim}")
    r = evaluate(model, data.x, iw_samples=args.iw_samples, seed=args.seed)
    out = {"checkpoint": str(args.checkpoint), "dataset": dataset, "split": args.split,
           "elbo": r["elbo"], "log_px": r.get("log_px"), "log_px_stderr": r.get("log_px_stderr"),
           "recon": r["recon"], "kl": r["kl"], "kl_per_dim": r["kl_per_dim"], "active_units": r["active_units"],
           "iw_samples": args.iw_samples, "n": r["n"]}
    return out


def cmd_list(args) -> dict:
    from .checkpoint import list_checkpoints

    folder = Path(args.folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder" + (" (it is a file: `python -m vae evaluate` reads one)"
                                                         if folder.is_file() else ""))
    rows = []
    for s in list_checkpoints(args.folder):
        rows.append({"name": s.name, "path": s.path, "dataset": s.dataset, "error": s.error,
                     "latent_dim": (s.model_config or {}).get("latent_dim"),
                     "test_elbo": (s.metrics or {}).get("test_elbo")})
        if not args.quiet:
            desc = s.error or f"{s.dataset}, z={rows[-1]['latent_dim']}, test ELBO {rows[-1]['test_elbo']:.2f}"
            print(f"{s.name:24s} {desc}", file=sys.stderr)
    return {"folder": str(args.folder), "checkpoints": rows}


def cmd_bench(args) -> dict:
    from .bench import run_bench

    return run_bench(steps=args.steps, batch_size=args.batch_size, device=args.device, seed=args.seed,
                     log=lambda s: print(s, flush=True))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m vae", description="VAE Explorer command line")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a VAE; prints a JSON summary (nats per example)")
    _add_train_args(t)
    e = sub.add_parser("evaluate", help="evaluate a checkpoint on a split; prints JSON")
    e.add_argument("checkpoint")
    e.add_argument("--iw-samples", type=int, default=1000, help="K for the importance-sampled log p(x); 0 skips")
    e.add_argument("--split", default="test", choices=("train", "test"))
    e.add_argument("--dataset", default=None, help="override the checkpoint's dataset")
    e.add_argument("--data-root", default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)
    ls = sub.add_parser("list", help="list the checkpoints in a folder; prints JSON")
    ls.add_argument("folder", nargs="?", default="checkpoints")
    ls.add_argument("--quiet", action="store_true")
    b = sub.add_parser("bench", help="training throughput against the canonical DataLoader loop; prints JSON")
    b.add_argument("--steps", type=int, default=300)
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--device", default="cpu")
    b.add_argument("--seed", type=int, default=0)
    return p


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "list": cmd_list, "bench": cmd_bench}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error: one line on stderr, exit 2 (_Parser)
    from .checkpoint import CheckpointError
    from .device import flush_denormals
    from .data import DatasetUnavailable
    from .trainer import TrainingDiverged

    flush_denormals()  # before torch's thread pool starts (it inherits the mode): vae.device.flush_denormals
    try:
        result = COMMANDS[args.command](args)
    except (ValueError, CheckpointError, DatasetUnavailable, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback: name the failure in one line
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1
    emit(result)
    return 0
