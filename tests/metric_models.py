"""Tiny CLIP and DINO folders built locally (``save_pretrained`` into a temporary folder; no downloads), for
the tests of ``ldm.modules.subject_metrics``, the metrics callback and ``scripts/evaluate.py``."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.modules.tiny_clip import tiny_clip_tokenizer

COLOURS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "white": (1, 1, 1)}


def solid(colour: str, size: int = 32) -> torch.Tensor:
    """[3, size, size] in [-1, 1] of one colour."""
    return torch.tensor(COLOURS[colour], dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone()


def tiny_clip(seed: int = 0):
    """(CLIPModel, CLIPProcessor): 2-layer towers of width 32, 32-pixel images, the tiny shapes tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer, _ = tiny_clip_tokenizer(None, 16)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {
        **tower,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 16,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {**tower, "image_size": 32, "patch_size": 8}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    return CLIPModel(config), processor


def train_clip_on_colours(model, processor, steps: int = 20) -> None:
    """A few contrastive steps on solid images and "a <colour> background" captions: a CLIP for which the
    right caption scores above a shuffled one."""
    images = torch.stack([solid(c) for c in COLOURS])
    pixels = processor(images=[((i + 1) * 127.5).byte() for i in images], return_tensors="pt")["pixel_values"]
    text = processor(text=[f"a {c} background" for c in COLOURS], return_tensors="pt", padding=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**text, pixel_values=pixels, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def save_clip(folder: Path, trained: bool = False) -> Path:
    model, processor = tiny_clip()
    if trained:
        train_clip_on_colours(model, processor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_dino(folder: Path, seed: int = 0) -> Path:
    """A tiny random ``ViTModel`` (DINO's architecture) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
