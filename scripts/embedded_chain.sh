#!/usr/bin/env bash
# The whole embedded chain on a fresh machine: VAE -> text-to-image -> LoRA on the held-out concept "star",
# then the fidelity figures and before/after grids (docs/). CPU: about 10 + 30 + 15 minutes of training.
#   bash scripts/embedded_chain.sh            # extra arguments go to every train.py call, e.g. logger=csv
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py experiment=vae "$@"
python train.py experiment=txt2img "$@"          # finds the newest VAE run by itself
python train.py experiment=lora_finetune "$@"    # finds the newest txt2img run by itself
LORA=$(ls -t logs/lora_finetune/runs/*/adapters/lora_finetune.safetensors | head -1)
python benchmarks/fidelity.py --ckpt last --sets heldout --grid-dir docs/fidelity
python benchmarks/fidelity.py --ckpt last --lora "$LORA" --samplers dpmpp_2m-20 --grid-dir docs/fidelity
python sample.py --ckpt last --lora "$LORA" --n 4 --out docs/lora_after \
  --prompt "a red star on a blue background" --prompt "a yellow star on a black background"
echo "LoRA: $LORA"
