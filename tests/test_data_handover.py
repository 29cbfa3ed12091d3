"""Data flows one way (ldm/utils/data_handover.py): the datamodule gets the model's services, never the model;
the model gets the data's facts, never the datamodule (it reads batches, nothing else)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from datamodules.dreambooth import DreamBoothDataModule
from datamodules.finetune import FineTuneDataModule
from datamodules.shapes import ShapesDataModule
from ldm.utils.data_handover import DataFacts, DataLink, DataServices, connect_data

ROOT = Path(__file__).resolve().parents[1]


def attribute_uses(folder: str, names: set[str], root: Path = ROOT) -> list[str]:
    """``"file:line .name"`` for every access ``x.<name>`` (or ``getattr/hasattr(x, "<name>")``) in the
    ``.py`` files under ``folder``."""
    found = []
    for path in sorted((root / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = node.attr if isinstance(node, ast.Attribute) else None
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) in ("getattr", "hasattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
            ):
                name = node.args[1].value
            if name in names:
                found.append(f"{path.relative_to(root)}:{node.lineno} .{name}")
    return found


def test_models_never_read_the_datamodule():
    assert attribute_uses("ldm", {"datamodule"}) == []


def test_datamodules_never_see_the_model():
    assert attribute_uses("datamodules", {"lightning_module", "model", "unet", "vae", "text_encoder"}) == []


def test_the_checker_sees_attribute_access(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(
        "def f(t):\n    return t.trainer.datamodule.resolution\n"
        "def g(t):\n    return hasattr(t, 'datamodule') and getattr(t, 'x')\n"
    )
    assert attribute_uses("pkg", {"datamodule"}, tmp_path) == [
        "pkg/a.py:2 .datamodule",
        "pkg/a.py:4 .datamodule",
    ]


class Recorder:
    """A model as connect_data sees it: something that takes a link (no datamodule attribute anywhere)."""

    def __init__(self):
        self.links: list[DataLink] = []

    def link_data(self, link: DataLink) -> None:
        self.links.append(link)


def shapes_finetune(tmp_path, **kwargs) -> FineTuneDataModule:
    source = ShapesDataModule(resolution=16, train_size=6, val_size=2, train_split="concept")
    return FineTuneDataModule(source, batch_size=2, cache_dir=str(tmp_path), **kwargs)


def test_connect_data_links_facts_and_the_preparation_step(tmp_path):
    plain, model = ShapesDataModule(resolution=16, train_size=4, val_size=2), Recorder()
    assert connect_data(model, plain) is not None
    assert model.links[-1] == DataLink(DataFacts(resolution=16), None)  # nothing to prepare with the model
    data = shapes_finetune(tmp_path)
    link = connect_data(model, data)
    assert link.facts == DataFacts(resolution=16) and link.prepare == data.prepare_training_data
    assert connect_data(object(), data) is None and connect_data(model, object()) is None


def test_the_latent_cache_is_built_from_services_alone(tmp_path):
    data = shapes_finetune(tmp_path)
    data.setup("fit")
    fingerprints = []

    def fingerprint() -> str:
        fingerprints.append(1)
        return "vae0"

    def encode(images: torch.Tensor):
        return images[:, :1, ::2, ::2], torch.ones_like(images[:, :1, ::2, ::2])

    facts = data.prepare_training_data(DataServices(encode=encode, vae_fingerprint=fingerprint))
    assert facts.resolution == 16 and len(facts.captions) == 6 and fingerprints == [1]
    assert facts.captions == tuple(data.cached.captions)
    assert list(tmp_path.glob("latents_*.pt"))  # keyed by the fingerprint the services gave


def test_dreambooth_class_images_come_from_a_generator_not_a_model(tmp_path):
    concepts = [
        {
            "identifier": "sks",
            "subject": {"shape": "square", "colors": ["yellow", "magenta"]},
            "instance_backgrounds": ["blue"],
            "num_instance_images": 2,
            "class_prompt": "a square",
            "num_class_images": 3,
        }
    ]
    data = DreamBoothDataModule(
        concepts,
        resolution=16,
        cache_latents=False,
        class_images={"steps": 2, "cache_dir": str(tmp_path / "class")},
    )
    calls = []

    def generate(prompts, seeds, *, sampler, steps, guidance_scale, resolution):
        calls.append((len(prompts), len(set(seeds)), sampler, steps, resolution))
        return torch.zeros(len(prompts), 3, resolution, resolution)

    services = DataServices(
        encode=None, vae_fingerprint=lambda: "", generate=generate, base_fingerprint=lambda: "base0"
    )
    data.prepare_training_data(services)
    assert calls == [(3, 3, "ddim", 2, 16)]
    assert sum(bool(data.data_train[i]["is_regularization"]) for i in range(len(data.data_train))) == 3


def test_dreambooth_without_a_generator_says_what_to_do(tmp_path):
    concepts = [
        {
            "identifier": "sks",
            "subject": {"shape": "square", "colors": ["yellow", "magenta"]},
            "instance_backgrounds": ["blue"],
            "num_instance_images": 2,
            "num_class_images": 2,
        }
    ]
    data = DreamBoothDataModule(
        concepts, resolution=16, cache_latents=False, class_images={"cache_dir": str(tmp_path)}
    )
    with pytest.raises(ValueError, match="needs the base model's image generator.*connect_data"):
        data.train_dataloader()
