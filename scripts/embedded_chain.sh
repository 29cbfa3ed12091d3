#!/usr/bin/env bash
# The whole embedded chain on a fresh machine: VAE -> CLIP -> text-to-image (on the CLIP's frozen text tower) ->
# LoRA on the held-out concept "star", then the fidelity figures and before/after grids (docs/). CPU: about
# 10 + 6 + 30 + 15 minutes of training.
#   bash scripts/embedded_chain.sh            # extra arguments go to every train.py call, e.g. logger=csv
# Environment (all optional): LDM_ROOT (logs go to $LDM_ROOT/logs, default: the repository), DOCS (figures,
# default docs), VAE_ARGS / CLIP_ARGS / TXT2IMG_ARGS / LORA_ARGS (extra train.py overrides for one stage),
# FIDELITY_ARGS and SAMPLE_ARGS (extra arguments of benchmarks/fidelity.py and sample.py). tests/test_readme.py
# runs it shortened this way.
set -euo pipefail
cd "$(dirname "$0")/.."
export LDM_ROOT="${LDM_ROOT:-.}"
LOGS="$LDM_ROOT/logs"
DOCS="${DOCS:-docs}"
# shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
python train.py experiment=vae ${VAE_ARGS:-} "$@"
# shellcheck disable=SC2086
python train.py experiment=clip ${CLIP_ARGS:-} "$@"
# shellcheck disable=SC2086
python train.py experiment=txt2img ${TXT2IMG_ARGS:-} "$@"          # finds the newest VAE and CLIP runs by itself
# shellcheck disable=SC2086
python train.py experiment=lora_finetune ${LORA_ARGS:-} "$@"    # finds the newest txt2img run by itself
LORA=$(ls -t "$LOGS"/lora_finetune/runs/*/adapters/lora_finetune.safetensors | head -1)
# shellcheck disable=SC2086
python benchmarks/fidelity.py --ckpt last --log-dir "$LOGS" --sets heldout --grid-dir "$DOCS/fidelity" ${FIDELITY_ARGS:-}
# shellcheck disable=SC2086
python benchmarks/fidelity.py --ckpt last --log-dir "$LOGS" --lora "$LORA" --samplers dpmpp_2m-20 \
  --grid-dir "$DOCS/fidelity" ${FIDELITY_ARGS:-}
# shellcheck disable=SC2086
python sample.py --ckpt last --log-dir "$LOGS" --lora "$LORA" --n 4 --out "$DOCS/lora_after" --overwrite \
  --prompt "a red star on a blue background" --prompt "a yellow star on a black background" ${SAMPLE_ARGS:-}
echo "LoRA: $LORA"
