#!/usr/bin/env bash
# The GPU paths in one run (< 10 minutes on one GPU): bf16 SD v1.5 UNet step vs diffusers (MFU), fine-tuning
# peak memory with each saver at 512 px, the real-size SDXL base UNet's LoRA, full fine-tune and sampling
# steps at 1024 px (peak memory and time; targets LoRA <= 10 GiB, full <= 20 GiB), and 1-GPU `trainer=ddp` and
# `trainer=fsdp` smoke runs of txt2img and LoRA. Writes everything under $OUT (default gpu_check/), summary in $OUT/summary.json.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
export WANDB_MODE=offline HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
python benchmarks/unet_step.py --config sd15 --resolution 64 --batch 8 --device cuda > "$OUT/unet_step.txt" 2>&1
python benchmarks/memory.py --device cuda --json "$OUT/memory.json" > "$OUT/memory.txt" 2>&1
python benchmarks/memory.py --unet sdxl --resolution 1024 --steps 3 --device cuda \
  --json "$OUT/memory_sdxl.json" > "$OUT/memory_sdxl.txt" 2>&1
TINY=(model/unet=tiny model/vae=tiny model/text_encoder=tiny data.train_size=64 data.val_size=8 debug=smoke paths.log_dir="$OUT/logs")
python train.py experiment=vae model/vae=tiny data.train_size=64 data.val_size=8 debug=smoke trainer=gpu \
  paths.log_dir="$OUT/logs" > "$OUT/vae_gpu.txt" 2>&1
for strategy in ddp fsdp; do
  python train.py experiment=txt2img "${TINY[@]}" trainer="$strategy" trainer.devices=1 \
    > "$OUT/txt2img_$strategy.txt" 2>&1
  python train.py experiment=lora_finetune data.source.train_size=16 data.source.val_size=4 debug=smoke \
    trainer="$strategy" trainer.devices=1 paths.log_dir="$OUT/logs" > "$OUT/lora_$strategy.txt" 2>&1
done
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {"gpu": (out / "gpu.txt").read_text().strip(),
           "memory": json.loads((out / "memory.json").read_text())["rows"],
           "memory_sdxl_1024": json.loads((out / "memory_sdxl.json").read_text())["rows"],
           "unet_step": (out / "unet_step.txt").read_text().strip().splitlines()[-6:],
           "checkpoints": sorted(str(p) for p in (out / "logs").rglob("last.ckpt"))}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
