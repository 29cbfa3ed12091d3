"""``SDComponents``: the parts of a text-to-image latent diffusion model, as every base-model loader
returns them."""

from __future__ import annotations

import dataclasses

import torch

from ldm.diffusion import DiffusionSchedule
from ldm.modules.conditioner import Conditioner, embedder
from ldm.modules.size_embedding import SizeEmbedding
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL

__all__ = [
    "REFINER_SIZE_KEYS",
    "SDXL_SIZE_KEYS",
    "VAE_FP32_NOTE",
    "SDComponents",
    "as_dtype",
    "finalize",
    "vae_dtype",
]

# the batch keys of SDXL's three size embedders, in sgm's order
SDXL_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
# the SDXL refiner's (sgm's sd_xl_refiner.yaml): (h, w), (top, left) and one number, the aesthetic score
REFINER_SIZE_KEYS = {"original_size_as_tuple": 2, "crop_coords_top_left": 2, "aesthetic_score": 1}


@dataclasses.dataclass
class SDComponents:
    """The parts of a text-to-image latent diffusion model, ready to use or fine-tune.

    All modules are in eval mode; the UNet's parameters require grad, the VAE's and the text encoder's
    do not. ``version``: ``"v1"``, ``"v2"``, ``"sdxl"``, ``"sdxl_refiner"`` or ``"custom"`` (any other
    architecture, e.g. our own models). ``resolution``: the native image size (512 for v1 / v2-base, 768 for
    v2-v, 1024 for SDXL).
    ``text_encoder_2``: SDXL's second, pooled text encoder (OpenCLIP bigG); None for SD 1.x / 2.x. With it,
    ``text_encoder`` is SDXL's CLIP-L and ``conditioner()`` adds the three size embedders. ``refiner``: the
    SDXL refiner (``version`` ``"sdxl_refiner"`` at released size): ``text_encoder`` is its one pooled text
    encoder (OpenCLIP bigG) and ``conditioner()`` adds original size, crop and aesthetic score embedders.
    """

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    schedule: DiffusionSchedule
    parameterization: str
    scale_factor: float
    version: str
    resolution: int = 512
    text_encoder_2: CLIPTextEncoder | None = None
    refiner: bool = False

    @property
    def text_encoders(self) -> list[CLIPTextEncoder]:
        """The text encoders in order (one for SD 1.x / 2.x, two for SDXL)."""
        return [self.text_encoder] + ([] if self.text_encoder_2 is None else [self.text_encoder_2])

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> SDComponents:
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(device=device, dtype=dtype)
        return self

    def conditioner(self) -> Conditioner:
        """The model's conditioner: the text encoder (SD 1.x / 2.x), or SDXL's two text embedders, the three
        size embedders (``SizeEmbedding`` of width (``adm_in_channels`` - pooled width) / 6; 256 for SDXL)
        and ``force_zeros_for_empty_prompt``, as ``conf/model/conditioner/sdxl.yaml`` builds it; the refiner's
        one text embedder and ``REFINER_SIZE_KEYS`` embedders (no zeroed empty prompt, as sgm's refiner)."""
        if self.refiner:
            return self._refiner_conditioner()
        if self.text_encoder_2 is None:
            return Conditioner([self.text_encoder])
        pooled = int(self.text_encoder_2.transformer.text_projection.out_features)
        extra = int(self.unet.adm_in_channels or 0) - pooled
        if extra <= 0 or extra % (2 * len(SDXL_SIZE_KEYS)):
            raise ValueError(
                f"the UNet's adm_in_channels {self.unet.adm_in_channels} is not the pooled text width "
                f"{pooled} plus {len(SDXL_SIZE_KEYS)} x 2 size features: not an SDXL base UNet for these "
                "text encoders"
            )
        sizes = [
            embedder(SizeEmbedding(extra // (2 * len(SDXL_SIZE_KEYS))), input_key=key, ucg_rate=0.0)
            for key in SDXL_SIZE_KEYS
        ]
        texts = [embedder(self.text_encoder), embedder(self.text_encoder_2)]
        return Conditioner([*texts, *sizes], force_zeros_for_empty_prompt=True)

    def _refiner_conditioner(self) -> Conditioner:
        """bigG (context + pooled) and the Fourier features of original size, crop and aesthetic score."""
        pooled = int(self.text_encoder.transformer.text_projection.out_features)
        extra, numbers = int(self.unet.adm_in_channels or 0) - pooled, sum(REFINER_SIZE_KEYS.values())
        if extra <= 0 or extra % numbers:
            raise ValueError(
                f"the UNet's adm_in_channels {self.unet.adm_in_channels} is not the pooled text width "
                f"{pooled} plus {numbers} size/aesthetic features: not an SDXL refiner UNet for this text "
                "encoder"
            )
        sizes = [
            embedder(SizeEmbedding(extra // numbers), input_key=key, ucg_rate=0.0)
            for key in REFINER_SIZE_KEYS
        ]
        return Conditioner([embedder(self.text_encoder), *sizes], force_zeros_for_empty_prompt=False)


def as_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """``torch.float16`` | ``"fp16"`` | ``"float16"`` | ``"bf16"`` | ... -> torch.dtype (None -> default)."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    name = names.get(str(dtype).lower().removeprefix("torch."), str(dtype).lower().removeprefix("torch."))
    result = getattr(torch, name, None)
    if not isinstance(result, torch.dtype) or not result.is_floating_point:
        raise ValueError(f"not a floating point dtype: {dtype!r}")
    return result


VAE_FP32_NOTE = (
    "SDXL's VAE overflows in float16 (inf/NaN latents and black images), as diffusers' force_upcast notes; "
    "it is kept at float32 while the UNet and text encoders take float16"
)


def vae_dtype(components: SDComponents, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype for weights of ``dtype``: float32 for SDXL (base or refiner) under float16."""
    xl = components.text_encoder_2 is not None or components.refiner
    return torch.float32 if xl and dtype == torch.float16 else dtype


def finalize(components: SDComponents, dtype: torch.dtype | str | None) -> SDComponents:
    """Cast to ``dtype`` (default float32), eval mode, UNet trainable, VAE and text encoder frozen. SDXL's VAE
    stays float32 when ``dtype`` is float16 (it overflows in fp16: ``VAE_FP32_NOTE``)."""
    target = as_dtype(dtype)
    components.unet.to(dtype=target).eval().requires_grad_(True)
    components.vae.to(dtype=vae_dtype(components, target)).eval().requires_grad_(False)
    for text_encoder in components.text_encoders:
        text_encoder.to(dtype=target)
        if hasattr(text_encoder, "freeze"):
            text_encoder.freeze()
        else:
            text_encoder.eval().requires_grad_(False)
        if hasattr(text_encoder, "clear_cache"):
            text_encoder.clear_cache()
    return components
