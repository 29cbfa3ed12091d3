"""What a fine-tune learned, measured as the DreamBooth paper does (Ruiz et al. 2022, Tables 1 and 3), with
models the user points at (local folders; nothing is downloaded):

- CLIP-T: cosine between a sample's CLIP image embedding and its prompt's text embedding (prompt fidelity);
  torchmetrics' ``CLIPScore`` / 100.
- CLIP-I: mean cosine between the CLIP image embeddings of every (sample, reference image) pair (subject
  fidelity).
- DINO: the same pairing on the CLS embeddings of a self-supervised ViT (DINO / DINOv2), which tell
  subjects of one class apart better than CLIP does.
- PRES: DINO between class-prompt samples ("a square") and the subject's reference images: high means the
  class collapsed onto the subject (prior preservation failed; lower is better).
- DIV: mean LPIPS distance between samples of one prompt (diversity; higher is better).

Images are [B, 3, H, W] in [-1, 1]. CLIP is a ``transformers`` ``CLIPModel`` folder with its processor
(``save_pretrained`` of both, or a hub snapshot); DINO a ``ViTModel`` / ``Dinov2Model`` folder with its image
processor.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torchmetrics.functional import pairwise_cosine_similarity
from torchmetrics.multimodal.clip_score import CLIPScore

from ldm.utils.images import to_uint8


class MetricModelError(ValueError):
    """A CLIP / DINO folder is absent or not the model it should be; the message names the flag or key."""


def _check_folder(path: str | Path | None, what: str, flag: str) -> Path:
    if not path:
        raise MetricModelError(f"{flag} is not set: give a local {what} folder (docs/evaluation.md)")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise MetricModelError(
            f"{flag}={path}: no {what} there (a folder with config.json from save_pretrained or a hub "
            "snapshot is needed; nothing is downloaded; docs/evaluation.md)"
        )
    return folder


def load_clip(path: str | Path | None, flag: str = "--clip"):
    """(CLIPModel, CLIPProcessor) from a local folder, frozen; a ``MetricModelError`` naming ``flag`` else."""
    from transformers import CLIPModel, CLIPProcessor

    folder = _check_folder(path, "CLIP model (CLIPModel + CLIPProcessor)", flag)
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise MetricModelError(f"{flag}={path}: not a CLIPModel folder with its processor ({err})") from None
    return model.eval().requires_grad_(False), processor


def load_dino(path: str | Path | None, flag: str = "--dino"):
    """(ViT model, image processor) of a local DINO / DINOv2 folder (``ViTModel``, ``Dinov2Model``)."""
    from transformers import AutoImageProcessor, AutoModel

    folder = _check_folder(path, "DINO ViT (ViTModel / Dinov2Model + image processor)", flag)
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise MetricModelError(
            f"{flag}={path}: not a ViT / DINOv2 folder with its processor ({err})"
        ) from None
    if model.config.model_type not in ("vit", "dinov2", "dinov2_with_registers"):
        raise MetricModelError(f"{flag}={path}: a {model.config.model_type} model, not a DINO ViT")
    return model.eval().requires_grad_(False), processor


class _TensorFeatures(nn.Module):
    """``CLIPModel`` whose ``get_*_features`` return the projected embeddings as tensors (transformers 5
    returns an output object, which torchmetrics' ``CLIPScore`` cannot normalise)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over every (row of ``a``, row of ``b``) pair: [N, D], [M, D] -> a number."""
    return pairwise_cosine_similarity(a.float(), b.float()).mean().item()


class SubjectMetrics(nn.Module):
    """CLIP-T, CLIP-I, DINO, PRES and DIV (module docstring). ``clip`` / ``dino``: (model, processor) pairs
    from ``load_clip`` / ``load_dino`` (either may be None: its metrics are then left out); ``lpips``: a
    distance d(x, y) -> [B] for DIV (``ldm.modules.lpips.LPIPS``), optional."""

    def __init__(self, clip=None, dino=None, lpips: Callable | None = None):
        super().__init__()
        self.clip_model, self.clip_processor = clip or (None, None)
        self.dino_model, self.dino_processor = dino or (None, None)
        self.lpips = lpips

    @classmethod
    def from_paths(cls, clip: str | None = None, dino: str | None = None, flags=("--clip", "--dino")):
        return cls(load_clip(clip, flags[0]) if clip else None, load_dino(dino, flags[1]) if dino else None)

    @property
    def names(self) -> list[str]:
        return (["clip_t", "clip_i"] if self.clip_model is not None else []) + (
            ["dino"] if self.dino_model is not None else []
        )

    def _device(self, model: nn.Module) -> torch.device:
        return next(model.parameters()).device

    @torch.no_grad()
    def clip_t(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        """Mean image-prompt cosine: torchmetrics ``CLIPScore`` (100 x max(mean cosine, 0)) / 100."""
        score = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(self.clip_model), self.clip_processor))
        pixels = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)  # CLIPScore takes uint8 [N, 3, H, W]
        score.update(
            pixels.to(self._device(self.clip_model)), list(prompts)
        )  # (and moves CLIP to their device)
        return score.compute().item() / 100

    @torch.no_grad()
    def clip_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> CLIP image embeddings [B, D]."""
        pixels = self.clip_processor(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"]
        wrapped = _TensorFeatures(self.clip_model)
        return wrapped.get_image_features(pixels.to(self._device(self.clip_model)))

    @torch.no_grad()
    def clip_text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts -> CLIP text embeddings [N, D]."""
        tokens = self.clip_processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
        device = self._device(self.clip_model)
        wrapped = _TensorFeatures(self.clip_model)
        return wrapped.get_text_features(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))

    @torch.no_grad()
    def dino_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> the ViT's CLS embedding [B, D] (what DINO's paper compares)."""
        pixels = self.dino_processor(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"]
        output = self.dino_model(pixel_values=pixels.to(self._device(self.dino_model)))
        return output.last_hidden_state[:, 0]

    def clip_i(self, samples: torch.Tensor, references: torch.Tensor) -> float:
        return mean_pairwise_cosine(self.clip_image_features(samples), self.clip_image_features(references))

    def dino(self, samples: torch.Tensor, references: torch.Tensor) -> float:
        return mean_pairwise_cosine(self.dino_features(samples), self.dino_features(references))

    def pres(self, class_samples: torch.Tensor, references: torch.Tensor) -> float:
        """DINO between samples of the class prompt and the subject's images (lower: prior kept)."""
        return self.dino(class_samples, references)

    @torch.no_grad()
    def div(self, samples: torch.Tensor) -> float:
        """Mean LPIPS distance over the pairs of ``samples`` (all of one prompt; higher: more diverse)."""
        if self.lpips is None:
            raise MetricModelError("DIV needs LPIPS weights: pass --lpips-vgg and --lpips-lin")
        pairs = list(itertools.combinations(range(len(samples)), 2))
        if not pairs:
            raise ValueError("DIV needs at least two samples of the prompt")
        first, second = zip(*pairs)
        return self.lpips(samples[list(first)], samples[list(second)]).mean().item()

    def subject(self, samples: torch.Tensor, prompts: Sequence[str], references: torch.Tensor | None) -> dict:
        """{clip_t, clip_i, dino} of samples of ``prompts`` against the subject's ``references`` (the
        image metrics only with references)."""
        values = {}
        if self.clip_model is not None:
            values["clip_t"] = self.clip_t(samples, prompts)
            if references is not None:
                values["clip_i"] = self.clip_i(samples, references)
        if self.dino_model is not None and references is not None:
            values["dino"] = self.dino(samples, references)
        return values
