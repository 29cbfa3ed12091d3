"""A replacement VAE for a loaded base model (``model.vae_path=...``, ``sample.py --vae ...``).

Fine-tunes and fixes of the SDXL VAE (and of SD 1.x's: ``vae-ft-mse-840000``) ship as

* a single VAE file (``.safetensors`` or a weights-only ``.ckpt``) in the LDM names of the VAE
  (``encoder.down.0.block.0.conv1.weight``; also with the ``first_stage_model.`` prefix of a full checkpoint)
  or in diffusers' names (``encoder.down_blocks.0.resnets.0.conv1.weight``), or
* a diffusers ``AutoencoderKL`` folder (``config.json`` + weights), or a diffusers model folder holding one in
  ``vae/``.

A file carries no architecture: it must fit the base model's VAE exactly (every key, every shape; a mismatch
names them). A folder's ``config.json`` gives its architecture, which must equal the base's too. The latent
scale factor stays the base model's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ldm.io.describe import describe_vae
from ldm.io.diffusers_config import vae_config_from_diffusers
from ldm.io.diffusers_folder import read_component_weights
from ldm.io.diffusers_names import diffusers_vae_to_ldm
from ldm.io.safe_load import read_checkpoint
from ldm.io.sd_keys import VAE_PREFIX
from ldm.io.strict_load import build_on_meta, load_strict
from ldm.modules.vae import AutoencoderKL

__all__ = ["load_replacement_vae", "vae_state_from_file"]

_LOSS_PREFIX = "loss."  # the VAE training loss (LPIPS, discriminator) some VAE files keep


def vae_state_from_file(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The LDM-named VAE state dict of a single VAE file (LDM or diffusers names; prefix and loss removed)."""
    state, _ = read_checkpoint(path, dtype)
    if any(k.startswith(VAE_PREFIX) for k in state):
        state = {k[len(VAE_PREFIX) :]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(_LOSS_PREFIX)}
    if any(".down_blocks." in k or ".mid_block." in k or ".up_blocks." in k for k in state):
        try:
            state = diffusers_vae_to_ldm(state)
        except KeyError as err:
            raise ValueError(f"{path}: not a diffusers AutoencoderKL file ({err.args[0]})") from None
    for key, value in list(state.items()):  # some converted files store the VAE attention as Linear [C, C]
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            state[key] = value[:, :, None, None]
    return state


def _folder_vae(folder: Path, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(LDM-named state, our VAE config) of a diffusers ``AutoencoderKL`` folder (or a model folder's
    ``vae/``)."""
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json (nor vae/config.json): not a diffusers AutoencoderKL folder"
        )
    config = vae_config_from_diffusers(json.loads(config_file.read_text(encoding="utf-8")))
    state = read_component_weights(folder)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        return diffusers_vae_to_ldm(state), config
    except KeyError as err:
        raise ValueError(f"{folder}: {err.args[0]}") from None


def load_replacement_vae(path: str | os.PathLike, base_vae: AutoencoderKL) -> AutoencoderKL:
    """The VAE of ``path`` (see the module docstring), built like ``base_vae`` and at its dtype; any key or
    shape that does not fit ``base_vae``'s architecture raises ``ValueError`` naming it."""
    source = Path(path).expanduser()
    dtype = next(base_vae.parameters()).dtype
    expected = describe_vae(base_vae)
    hint = (
        f"A replacement VAE must have the base model's VAE architecture (ch={expected['ch']}, "
        f"ch_mult={expected['ch_mult']}, z_channels={expected['z_channels']}); pass the VAE made for this "
        "model family (SDXL VAEs for SDXL, SD 1.x/2.x VAEs for those)."
    )
    if source.is_dir():
        state, config = _folder_vae(source, dtype)
        fields = ("embed_dim", "ch", "ch_mult", "num_res_blocks", "z_channels")
        mismatched = {k: (config[k], expected[k]) for k in fields if k in config and config[k] != expected[k]}
        if mismatched:
            raise ValueError(
                f"{source}: the VAE's config does not fit the base model's VAE "
                f"({', '.join(f'{k} {a} vs {b}' for k, (a, b) in mismatched.items())}). {hint}"
            )
    elif source.is_file():
        state = vae_state_from_file(source, dtype)
    else:
        raise FileNotFoundError(
            f"VAE {str(path)!r} does not exist (a VAE .safetensors file or a diffusers folder)"
        )
    vae = load_strict(build_on_meta(AutoencoderKL, expected), state, "VAE", str(source), hint)
    return vae.to(dtype).eval().requires_grad_(False)
