"""Peak memory of one UNet fine-tuning step with each memory saver added in turn (SD v1.5-shaped UNet by
default).

Variants, each in its own process so its peak is its own (CPU: peak resident memory, ru_maxrss; CUDA:
torch.cuda.max_memory_allocated); the inputs are what a cached fine-tune feeds the UNet (latents and text
context), random, fp32 weights:
  full          every UNet weight trained, AdamW                                   (the baseline)
  +ckpt         + gradient checkpointing of every ResBlock / transformer block (model.gradient_checkpointing)
  +adafactor    + Adafactor instead of AdamW (factored second moments)             (model/optimizer=adafactor)
  +in_backward  + the optimiser step fused into backward, gradients freed early (model.optimizer_in_backward)
  +bf16         + bf16 autocast of the forward/backward (activations in bf16) (trainer.precision=bf16-mixed)
  +bf16_weights +in_backward with the weights stored in bf16, stochastic rounding  (model.bf16_weights)
  lora          LoRA r=8 on the transformer layers + gradient checkpointing, AdamW (model/method=lora)
  lora_bf16     lora + the UNet (LoRA included) stored in bf16, stochastic rounding (model.bf16_weights=true)
  sample        one sampling step: UNet forward, no gradients, batch 2 x --batch (classifier-free guidance)

SDXL (``--unet sdxl``, or any UNet with a label embedding): the inputs are what a fine-tune with cached text
outputs feeds it, context [B, 77, 2048] and the vector y [B, 2816] (pooled text + size features), random. Its
default variants leave out full / +ckpt / +adafactor (fp32 AdamW on 2.6 G parameters needs ~41 GB).

    python benchmarks/memory.py                               # SD v1.5 UNet, 512 px (64x64 latents), batch 1
    python benchmarks/memory.py --unet small --resolution 32  # the embedded demo's UNet (seconds)
    python benchmarks/memory.py --unet sdxl --resolution 1024 --steps 1  # real-size SDXL base UNet
    python benchmarks/memory.py --device cuda                 # on a GPU
Prints one table and writes ``--json`` if given.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.utils.task import child_failure, run_main

VARIANTS = {  # name -> (checkpointing, optimiser, in_backward, bf16 autocast, lora, bf16 weights)
    "full": (False, "adamw", False, False, False, False),
    "+ckpt": (True, "adamw", False, False, False, False),
    "+adafactor": (True, "adafactor", False, False, False, False),
    "+in_backward": (True, "adafactor", True, False, False, False),
    "+bf16": (True, "adafactor", True, True, False, False),
    "+bf16_weights": (True, "adafactor", True, False, False, True),
    "lora": (True, "adamw", False, False, True, False),
    "lora_bf16": (True, "adamw", False, False, True, True),
}
SAMPLE = "sample"  # not a training step: one UNet forward at batch 2 x --batch under no_grad
SDXL_VARIANTS = ["lora", "lora_bf16", "+in_backward", "+bf16_weights", SAMPLE]


def build_unet(name: str, dtype=None):
    """The conf/model/unet preset ``name``, random weights, created in ``dtype`` (default float32): a bf16
    UNet built in bf16 never holds an fp32 copy, which would otherwise be the process's peak."""
    import hydra
    import torch
    from omegaconf import OmegaConf

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or default)
    try:
        return hydra.utils.instantiate(OmegaConf.load(ROOT / "conf/model/unet" / f"{name}.yaml"))
    finally:
        torch.set_default_dtype(default)


def optimizer_factory(name: str):
    import functools

    import torch
    from transformers.optimization import Adafactor

    if name == "adafactor":
        return functools.partial(Adafactor, lr=1e-5, scale_parameter=False, relative_step=False)
    return functools.partial(torch.optim.AdamW, lr=1e-5)


def run_variant(variant: str, unet_name: str, resolution: int, batch: int, steps: int, device: str) -> dict:
    import functools

    import torch

    from ldm.models.bf16_weights import StochasticRoundingOptimizer, use_bf16_weights
    from ldm.models.finetune.lora import expand_targets
    from ldm.models.optimizers import OptimizerInBackward
    from ldm.modules.adapters.lora import inject_lora, lora_parameters

    torch.manual_seed(0)
    size = resolution // 8
    if variant == SAMPLE:
        unet = build_unet(unet_name).to(device)
        return _result(variant, _sample_times(unet, 2 * batch, size, steps, device), [], device)
    checkpointing, opt_name, in_backward, bf16, lora, bf16_weights = VARIANTS[variant]
    unet = build_unet(unet_name, torch.bfloat16 if bf16_weights else None).to(device)
    if checkpointing:
        unet.enable_gradient_checkpointing(True)
    if lora:
        inject_lora(unet, expand_targets("UNET_TRANSFORMER"), rank=8, alpha=8)
        params = lora_parameters(unet)
    else:
        params = list(unet.parameters())
    if bf16_weights:  # after the LoRA layers, as model.bf16_weights does (configure_model): they go bf16 too
        use_bf16_weights(unet)
    factory = optimizer_factory(opt_name)
    if bf16_weights:
        factory = functools.partial(StochasticRoundingOptimizer, factory=factory)
    optimizer = OptimizerInBackward(params, factory) if in_backward else factory(params=params)
    z, context, y = unet_inputs(unet, batch, size, device)
    times = []
    for _ in range(steps):
        start = _clock()
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.mse_loss(unet(z, t, context, y).float(), z)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(_since(start))
    return _result(variant, times, params, device)


def unet_inputs(unet, batch: int, size: int, device: str):
    """Random latents [B, C, size, size], cached text context [B, 77, context_dim] and, for a UNet with a
    label embedding (SDXL), the vector y [B, adm_in_channels]; else y is None."""
    import torch

    z = torch.randn(batch, unet.in_channels, size, size, device=device)
    context = torch.randn(batch, 77, unet.context_dim, device=device)
    adm = getattr(unet, "adm_in_channels", None)
    y = None if adm is None else torch.randn(batch, adm, device=device)
    return z, context, y


def _sample_times(unet, batch: int, size: int, steps: int, device: str) -> list[float]:
    import torch

    unet.eval().requires_grad_(False)
    z, context, y = unet_inputs(unet, batch, size, device)
    times = []
    with torch.no_grad():
        for _ in range(steps):
            start = _clock()
            unet(z, torch.full((batch,), 500, device=device), context, y)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(_since(start))
    return times


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) since ``start``: on a shared CPU the wall time depends on the
    load, the CPU time much less."""
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def _result(variant: str, times: list[tuple[float, float]], params: list, device: str) -> dict:

    import torch

    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    trainable = sum(p.numel() for p in params)
    return {
        "variant": variant,
        "peak_gib": round(peak, 2),
        "step_s": round(sorted(t[0] for t in times)[len(times) // 2], 2),
        "step_cpu_s": round(sorted(t[1] for t in times)[len(times) // 2], 2),
        "trainable_m": round(trainable / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--unet", default="sd15", help="conf/model/unet preset (sd15, sd21, small, tiny)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (latents: / 8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[*VARIANTS, SAMPLE],
        help="default: every training variant; for an sdxl* UNet: " + " ".join(SDXL_VARIANTS),
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(
            json.dumps(
                run_variant(args.child, args.unet, args.resolution, args.batch, args.steps, args.device)
            )
        )
        return
    if args.variants is None:
        args.variants = SDXL_VARIANTS if args.unet.startswith("sdxl") else list(VARIANTS)
    rows = []
    for variant in args.variants:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--unet",
            args.unet,
            "--resolution",
            str(args.resolution),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--device",
            args.device,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise child_failure(variant, result.stderr)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(
            f"{variant:>14}  peak {rows[-1]['peak_gib']:6.2f} GiB  step {rows[-1]['step_s']:7.2f} s "
            f"(CPU {rows[-1]['step_cpu_s']:.1f} s)  "
            f"trainable {rows[-1]['trainable_m']:7.1f} M",
            flush=True,
        )
    base = rows[0]["peak_gib"] if rows and rows[0]["variant"] == "full" else None
    print(
        f"\n{args.unet} UNet, {args.resolution} px, batch {args.batch}, {args.device}: peak memory"
        + (" (ratio to full)" if base else "")
    )
    for row in rows:
        ratio = f"  {row['peak_gib'] / base:.2f}x" if base else ""
        print(f"| {row['variant']} | {row['peak_gib']:.2f} GiB{ratio} | {row['step_s']:.2f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    run_main(main)
