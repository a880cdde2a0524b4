#!/usr/bin/env bash
# Rebuild the shipped checkpoints in checkpoints/ through the CLI (about a minute on 2 CPU cores).
#   digits-z2.pt        2-D latent: the latent scatter needs no projection; ELBO anatomy can integrate on a grid
#   digits-z16.pt       16-D latent
#   sweep/digits-beta-<b>.pt   a beta sweep for the trade-off (rate-distortion) view
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
COMMON=(--dataset digits --hidden 256,128 --epochs 200 --lr 2e-3 --batch-size 128 --seed 0 --device cpu --quiet --overwrite)
mkdir -p checkpoints/sweep
$PYTHON -m vae train "${COMMON[@]}" --latent-dim 2 --out checkpoints/digits-z2.pt
$PYTHON -m vae train "${COMMON[@]}" --latent-dim 16 --out checkpoints/digits-z16.pt
for b in 0.1 0.5 1 2 4 8; do
  $PYTHON -m vae train "${COMMON[@]}" --latent-dim 16 --beta "$b" --out "checkpoints/sweep/digits-beta-$b.pt"
done
$PYTHON -m vae list checkpoints
# moons-z2.pt: the 2-D toy set with a 2-D latent, so the Latent space page can show data space beside latent space
$PYTHON -m vae train --dataset moons --hidden 64,64 --latent-dim 2 --epochs 200 --lr 2e-3 --batch-size 128 --seed 0 \
  --device cpu --quiet --overwrite --out checkpoints/moons-z2.pt
