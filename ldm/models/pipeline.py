"""Sampling as a library: load a model ready to ``generate`` (with LoRA files, embeddings, a hypernetwork) and
run the batched generate loop. ``sample.py`` is the command line around it (arguments, output folder, PNGs);
the benchmarks and ``scripts/convert.py`` use these functions directly.

    model = load_for_sampling("v1-5-pruned-emaonly.safetensors", loras=["style.safetensors:0.8"])
    for batch in generate_batches(model, sampler, prompts=["a cat"], n=4, guidance=7.5):
        ...  # batch.images: [b, 3, R, R] in [-1, 1]; batch.seeds, batch.prompts, batch.negatives

Errors a user makes (``--ckpt last`` without a run, a resolution the VAE cannot take, a single file without a
tokenizer) stop with ``SystemExit`` and one line naming the flag, as the command line reports them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.models.checkpoint import load_lightning_model
from ldm.utils.runs import latest_checkpoint


def parse_lora(spec: str) -> tuple[str, float]:
    """``file.safetensors`` or ``file.safetensors:0.8`` -> (path, multiplier); hypernetworks'
    ``file:strength`` too."""
    path, sep, scale = spec.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def resolve_last(ckpt: str, log_dir: str) -> str:
    """``last`` -> the newest txt2img run's ``last.ckpt`` under ``log_dir``; anything else unchanged."""
    if ckpt != "last":
        return ckpt
    found = latest_checkpoint(log_dir, "txt2img")
    if found is None:
        raise SystemExit(
            f"--ckpt last: no {log_dir}/txt2img/runs/*/checkpoints/last.ckpt; train one first "
            "(python train.py experiment=txt2img) or pass a path"
        )
    return str(found)


def load_model(
    ckpt: str,
    use_ema: bool = True,
    tokenizer: str | None = None,
    sampler=None,
    resolution: int | None = None,
    vae: str | None = None,
):
    """(LatentDiffusion, image resolution) from our Lightning checkpoint or any base ``load_base_model`` reads
    (a Stable Diffusion single file, a diffusers folder or a hub id). ``vae``: a replacement VAE
    (``ldm.io.vae_file``)."""
    from ldm.io.sources import is_lightning_checkpoint
    from ldm.io.vae_file import load_replacement_vae
    from ldm.models.base_loader import latent_diffusion_from_components, load_base_model

    if is_lightning_checkpoint(ckpt):
        model = load_lightning_model(ckpt)
        if vae:
            model.vae = load_replacement_vae(vae, model.vae)
        return model, resolution or int(model.model_config.get("vae", {}).get("resolution", 32))
    tokenizer = tokenizer or tokenizer_before_loading(ckpt)
    components = load_base_model(
        str(ckpt), use_ema=use_ema, vae_path=vae, **({"tokenizer": tokenizer} if tokenizer else {})
    )
    return latent_diffusion_from_components(components, sampler), resolution or components.resolution


def load_for_sampling(
    ckpt: str,
    device: str = "cpu",
    use_ema: bool = True,
    tokenizer: str | None = None,
    loras: Sequence[str] = (),
    sampler=None,
    resolution: int | None = None,
    log_dir: str = "logs",
    embeddings: Sequence[str] = (),
    hypernetwork: str | None = None,
    vae: str | None = None,
):
    """A LatentDiffusion ready to ``generate``: our checkpoint ('last' = newest txt2img run) or any base
    ``load_base_model`` reads, with LoRA files (kohya or PEFT) merged in (``path[:multiplier]``),
    textual-inversion embeddings added (``path[:token]``) and an AUTOMATIC1111 hypernetwork applied
    (``path[:strength]``). ``model.image_resolution`` is the size to sample at (``resolution``, else the
    model's training size)."""
    model, resolution = load_model(resolve_last(ckpt, log_dir), use_ema, tokenizer, sampler, resolution, vae)
    unet = model.unet_ema.module if use_ema and model.unet_ema is not None else model.unet
    apply_adapters(model, unet, loras, embeddings, hypernetwork)
    model.image_resolution = resolution
    return model.to(device).eval()


def apply_adapters(
    model, unet, loras: Sequence[str] = (), embeddings: Sequence[str] = (), hypernetwork: str | None = None
) -> None:
    """Prompt-side additions, in this order: LoRA files merged (stacked: each adds to the weights the last one
    left), textual-inversion tokens added to the text encoder, a hypernetwork attached to ``unet``."""
    from ldm.io.lora_any import load_lora
    from ldm.io.sdxl_embeddings import apply_any_embedding

    for spec in loras:
        path, multiplier = parse_lora(spec)
        texts = model.conditioner.text_embedders  # SDXL: two
        summary = load_lora(path, unet=unet, text_encoders=texts, multiplier=multiplier, merge=True)
        print(
            f"merged {summary['format']} LoRA {path} x{multiplier} ({summary['modules']} modules, "
            f"rank {summary['rank']})"
        )
        add_bundled_tokens(texts, path)
    for spec in embeddings:
        loaded = apply_any_embedding(model.conditioner.text_embedders, spec)
        print(f"added embedding {loaded.source} as {loaded.token} ({loaded.vectors.shape[0]} vector(s))")
    if hypernetwork:
        apply_hypernetwork(model, unet, hypernetwork)


def add_bundled_tokens(text_encoders, path: str) -> None:
    """The textual-inversion tokens a LoRA file bundles (pivotal tuning: ``bundle_emb.<token>.*``; SDXL: one
    vector set per text encoder) then work in prompts."""
    from ldm.io.bundled_embeddings import apply_bundled_embeddings

    for token, n in apply_bundled_embeddings(text_encoders, path).items():
        print(f"added embedding {token} bundled in {path} ({n} vector(s))")


def apply_hypernetwork(model, unet, spec: str) -> None:
    """Attach the hypernetwork ``file[:strength]`` to ``unet``; ``model`` owns it (moves with ``.to``)."""
    from ldm.io.hypernetwork_file import load_hypernetwork
    from ldm.modules.adapters.hypernetwork import attach_hypernetwork

    path, strength = parse_lora(spec)
    net, file = load_hypernetwork(path)
    net.strength = strength
    model.add_module("hypernetwork", net)
    names = attach_hypernetwork(unet, net, self_attention=file.self_attention)
    print(f"hypernetwork {path} x{strength} (widths {net.widths}, {len(names)} attention layers)")


def tokenizer_before_loading(ckpt: str):
    """For a ``.safetensors`` single file without a tokenizer: CLIP's (cache or open_clip_torch), found before
    any weights load; none at all stops here, naming ``--tokenizer``."""
    from ldm.io.sd_tokenizer import single_file_tokenizer

    if not (str(ckpt).endswith(".safetensors") and Path(ckpt).is_file()):
        return None
    try:
        return single_file_tokenizer(ckpt)
    except LookupError as err:
        raise SystemExit(str(err)) from None


def vae_factor(model) -> int:
    return int(getattr(model.vae, "downsample_factor", 8))


def check_resolution(model, resolution: int) -> None:
    factor = vae_factor(model)
    if resolution % factor:
        low = max(factor, resolution // factor * factor)
        raise SystemExit(
            f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}; "
            f"use {low} or {low + factor}"
        )


def load_init_image(path: str, resolution: int) -> torch.Tensor:
    """An image file -> [1, 3, R, R] in [-1, 1] (RGB, resized to ``resolution``)."""
    image = Image.open(path).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with its seed: the image's initial latents, then each step's noise,
    all from that one stream -- what diffusers' ``generator=torch.manual_seed(seed)`` draws for one image (and
    ``generator=[torch.manual_seed(s) for s in seeds]`` for a batch), so image i depends on its seed alone."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def pair_negatives(prompts: Sequence[str], negatives: Sequence[str] | None) -> list[str]:
    """One negative prompt per prompt: none -> ``""``; one -> the same for all; else one each, in order."""
    negatives = list(negatives or [""])
    if len(negatives) == 1:
        return negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(
            f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one for all, "
            "or one per prompt"
        )
    return negatives


@dataclass
class GeneratedBatch:
    """One forward batch of ``generate_batches``: image ``start + j`` has ``prompts[j]``, ``negatives[j]``,
    ``seeds[j]``; ``images`` is [b, 3, R, R] in [-1, 1]."""

    start: int
    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    images: torch.Tensor


def generate_batches(
    model,
    sampler,
    prompts: Sequence[str],
    negatives: Sequence[str] | None = None,
    n: int = 1,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    use_ema: bool = True,
    init_image: torch.Tensor | None = None,
    strength: float = 1.0,
    progress: bool = True,
    sizes: dict | None = None,
) -> Iterator[GeneratedBatch]:
    """``n`` images per prompt (prompt-major order), ``batch_size`` per forward pass. Image ``i`` draws its
    initial latents and then its per-step noise from one generator seeded ``seed + i`` (``image_generators``),
    so it is the same image whatever the batching, for every sampler, and diffusers' image for
    ``generator=torch.manual_seed(seed + i)``; ``init_image`` ([1, 3, R, R]) makes it img2img at
    ``strength``. ``guidance`` None: the model's own scale. ``sizes``: SDXL's size conditions
    (``LatentDiffusion.generate``)."""
    resolution = model.image_resolution
    guidance = model.hparams.guidance_scale if guidance is None else guidance
    jobs = [(p, neg) for p, neg in zip(prompts, pair_negatives(prompts, negatives)) for _ in range(n)]
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        seeds = [seed + start + j for j in range(len(batch))]
        images = model.generate(
            [p for p, _ in batch],
            guidance_scale=guidance,
            sampler=sampler,
            negative_prompt=[n for _, n in batch],
            use_ema=use_ema,
            progress=progress,
            latent_size=resolution // vae_factor(model),
            generator=image_generators(seeds),
            strength=strength if init_image is not None else 1.0,
            init_images=init_image.expand(len(batch), -1, -1, -1) if init_image is not None else None,
            sizes=sizes,
        )
        yield GeneratedBatch(start, [p for p, _ in batch], [n for _, n in batch], seeds, images)
