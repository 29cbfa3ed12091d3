"""Training prompts for textual inversion: put the placeholder token into each item's caption.

``mode``:

* ``"caption"``: the item's own caption; ``concept_word`` (e.g. ``"star"``) is replaced by the placeholder
  ("a red star on a blue background" -> "a red <star> on a blue background"). Without ``concept_word`` the
  captions must already contain the placeholder (an image folder captioned for it).
* ``"object"`` / ``"style"``: a random template per item ("a photo of a {}", "a painting in the style of {}").

Applied by ``FineTuneDataModule`` each time an item is drawn (after latent caching), so templates vary per
epoch. The template comes from the ``rng`` the caller passes (``CaptionsRewritten`` seeds one per epoch and
item), never from the global RNG, so a resumed run draws the same templates as an uninterrupted one.
Regularisation items (``is_regularization``) keep their captions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}", "a rendering of a {}", "a picture of a {}", "an image of the {}", "a drawing of a {}",
    "a good photo of a {}", "a close up photo of the {}", "a cropped photo of a {}", "a photo of my {}",
    "a bright photo of the {}", "a dark photo of a {}", "a photo of a small {}", "a photo of one large {}",
    "a clean picture of this {}",
)  # fmt: skip
STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}", "a rendering in the style of {}", "a picture in the style of {}",
    "an image in the style of {}", "a drawing in the style of {}", "a good painting in the style of {}",
    "a small painting in the style of {}", "a large drawing in the style of {}", "a shape in the style of {}",
    "a cropped picture in the style of {}",
)  # fmt: skip
MODES = ("caption", "object", "style")


class PlaceholderCaptions:
    """item dict -> item dict with the placeholder in its caption (see the module docstring)."""

    def __init__(
        self,
        placeholder: str,
        mode: str = "caption",
        concept_word: str | None = None,
        templates: Sequence[str] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"caption mode must be one of {MODES}, got {mode!r}")
        self.placeholder, self.mode = placeholder, mode
        self.templates = tuple(templates or (OBJECT_TEMPLATES if mode == "object" else STYLE_TEMPLATES))
        if any("{}" not in t for t in self.templates):
            raise ValueError("every template must contain '{}' where the placeholder goes")
        self.concept = re.compile(rf"\b{re.escape(concept_word)}\b", re.IGNORECASE) if concept_word else None

    def caption(self, caption: str, rng: random.Random | None = None) -> str:
        if self.mode != "caption":
            return (rng or random.Random()).choice(self.templates).format(self.placeholder)
        if self.concept is not None:
            caption = self.concept.sub(self.placeholder, caption)
        if self.placeholder.lower() not in caption.lower():
            word = f"the concept word ({self.concept.pattern})" if self.concept else "the placeholder"
            raise ValueError(
                f"caption {caption!r} does not contain the placeholder {self.placeholder!r}: with "
                f"mode=caption every training caption must contain {word}. Fix the captions, set "
                "concept_word, or use mode=object / mode=style templates."
            )
        return caption

    def __call__(self, item: dict, rng: random.Random | None = None) -> dict:
        if bool(item.get("is_regularization", False)) or not item.get("caption", "x"):
            return item  # regularisation images, and captions dropped for classifier-free guidance
        return {**item, "caption": self.caption(str(item.get("caption", "")), rng)}
