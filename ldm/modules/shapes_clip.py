"""A small CLIP for the embedded shapes world (Radford et al. 2021): a text tower shaped like the embedded
text encoder (``conf/model/text_encoder/tiny.yaml``: its tokenizer, width, depth, heads, 20 positions, and
its seeded weights as the start) and a small ViT image tower, trained contrastively on the shapes images and
captions (``experiment=clip``). Saved as a ``transformers`` ``CLIPModel`` folder with its processor, so the
metrics (``ldm.modules.subject_metrics``) load it like any CLIP, and ``experiment=txt2img`` conditions on its
frozen text tower (``model/text_encoder=shapes_clip``: ``ldm.modules.clip_run``; its ``text_encoder/``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextModel

from ldm.modules.tiny_clip import tiny_clip_model, tiny_clip_tokenizer


class ShapesCLIP(nn.Module):
    """``model``: the ``CLIPModel``; ``tokenizer``: the embedded tiny CLIP tokenizer. Images [B, 3, R, R] in
    [-1, 1] go in as they are (the saved processor maps uint8 pixels to the same range: mean = std = 0.5)."""

    def __init__(
        self,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        max_length: int = 20,
        vision_hidden_size: int = 64,
        vision_layers: int = 2,
        vision_heads: int = 4,
        image_size: int = 32,
        patch_size: int = 4,
        projection_dim: int = 64,
        seed: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.tokenizer, _ = tiny_clip_tokenizer(None, max_length, cache_dir)
        text = tiny_clip_model(self.tokenizer, hidden_size, num_layers, num_heads, max_length, seed, None)
        vision = {
            "hidden_size": vision_hidden_size,
            "intermediate_size": 4 * vision_hidden_size,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
            "image_size": image_size,
            "patch_size": patch_size,
        }
        config = CLIPConfig(
            text_config=text.config.to_dict(), vision_config=vision, projection_dim=projection_dim
        )
        with torch.random.fork_rng(devices=[]):  # seeded, and the global RNG left alone
            torch.manual_seed(seed)
            self.model = CLIPModel(config)
        self.model.text_model.load_state_dict(text.state_dict())  # the embedded encoder's weights to start
        self.max_length = max_length
        self.image_size = image_size

    def tokens(self, captions: list[str], device) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return {
            "input_ids": encoded.input_ids.to(device),
            "attention_mask": encoded.attention_mask.to(device),
        }

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, R, R] in [-1, 1] -> unit embeddings [B, projection_dim]."""
        return F.normalize(self._tensor(self.model.get_image_features(pixel_values=images)), dim=-1)

    def text_features(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokens(captions, self.model.logit_scale.device)
        return F.normalize(self._tensor(self.model.get_text_features(**tokens)), dim=-1)

    def loss(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """CLIP's symmetric InfoNCE over the batch (``CLIPModel``'s own ``return_loss``)."""
        tokens = self.tokens(captions, images.device)
        return self.model(pixel_values=images, **tokens, return_loss=True).loss

    def processor(self) -> CLIPProcessor:
        size = self.image_size
        images = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        return CLIPProcessor(image_processor=images, tokenizer=self.tokenizer)

    def text_tower(self) -> CLIPTextModel:
        """The text tower as a plain ``CLIPTextModel`` (what ``CLIPTextEncoder.from_pretrained`` loads)."""
        text = CLIPTextModel(self.model.config.text_config)
        text.load_state_dict(self.model.text_model.state_dict())
        return text

    def save(self, folder: str | os.PathLike) -> Path:
        """The ``CLIPModel`` + processor folder, and its text tower + tokenizer in ``text_encoder/``; written
        to a temporary sibling and renamed into place."""
        folder = Path(folder)
        temporary = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.model.save_pretrained(temporary)
        self.processor().save_pretrained(temporary)
        self.text_tower().save_pretrained(temporary / "text_encoder")
        self.tokenizer.save_pretrained(temporary / "text_encoder")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temporary, folder)
        return folder


def retrieval_accuracy(image_features: torch.Tensor, captions: list[str], text_of) -> float:
    """Top-1 image -> caption retrieval among the distinct ``captions``: the fraction of images whose nearest
    caption (cosine; ``text_of(list) -> unit features``) is their own."""
    distinct = sorted(set(captions))
    nearest = (image_features @ text_of(distinct).T).argmax(dim=1)
    return sum(distinct[j] == c for j, c in zip(nearest.tolist(), captions)) / len(captions)
