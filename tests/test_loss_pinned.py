"""Pins the training losses and sampled latents of every parameterisation and weighting to the numbers the
code gave before the loss became objects (``ldm/diffusion/parameterization.py``, ``loss_weighting.py``):
the refactor must be bit-identical on the same seeds. Computed on one thread so the sums are reproducible."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import DiffusionSchedule, build_sampler
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.tiny_unet import tiny_unet
from ldm.modules.vae import AutoencoderKL

# (parameterization, min_snr_gamma, offset_noise) -> losses of 3 AdamW steps, then the per-item losses of a
# 4th
LOSSES: dict = {
    ("eps", None, 0.0): [
        1.007135272026062,
        0.9342866539955139,
        0.9283332824707031,
        [0.9436540603637695, 0.8699837327003479, 1.0131183862686157],
    ],
    ("v", None, 0.0): [
        1.0443037748336792,
        1.039541244506836,
        1.0401724576950073,
        [1.0104050636291504, 1.0200062990188599, 1.03334379196167],
    ],
    ("x0", None, 0.0): [
        1.0675281286239624,
        1.0176503658294678,
        0.9665539860725403,
        [0.9801705479621887, 0.8542357087135315, 0.8280348777770996],
    ],
    ("eps", 5.0, 0.0): [
        1.007135272026062,
        0.9342866539955139,
        0.9283332824707031,
        [0.9436540603637695, 0.8699837327003479, 0.500704288482666],
    ],
    ("v", 5.0, 0.1): [
        0.14271214604377747,
        0.24367983639240265,
        0.44846591353416443,
        [0.2406577616930008, 0.6969397068023682, 0.46399497985839844],
    ],
    ("x0", 5.0, 0.0): [
        0.2524659335613251,
        0.34513652324676514,
        1.1241083145141602,
        [0.30041083693504333, 1.7002742290496826, 4.0654616355896],
    ],
}
# (sampler, parameterization) -> (sum of the latent, its first 3 values)
LATENTS: dict = {
    ("ddim", "eps"): (18.98832879285328, [-1.4089045524597168, 1.5490138530731201, -0.5662116408348083]),
    ("ddim", "v"): (0.7516782227903605, [-0.36095696687698364, 0.2309851050376892, 0.11472295969724655]),
    ("ddim", "x0"): (5.494047253392637, [-0.6271330714225769, 0.6487003564834595, 0.21347101032733917]),
    ("ddpm", "eps"): (21.18135453586001, [-2.6174023151397705, 2.2037649154663086, 0.643683671951294]),
    ("ddpm", "v"): (1.13715916313231, [-0.5123400688171387, 0.155611053109169, 0.2805931270122528]),
    ("ddpm", "x0"): (1.8336523286998272, [-0.7767847776412964, 0.563121497631073, 0.5045478940010071]),
    ("euler", "eps"): (15.678153842687607, [-0.27720093727111816, 0.5465209484100342, -3.176358938217163]),
    ("euler", "v"): (0.6114332478027791, [-0.02014729380607605, 0.05540413409471512, -0.1507444679737091]),
    ("euler", "x0"): (6.495514759793878, [-0.020318809896707535, 0.32896536588668823, -0.5095357298851013]),
    ("dpmpp_2m_karras", "eps"): (
        47.57901731878519,
        [0.11632189154624939, 0.41219237446784973, -2.240841865539551],
    ),
    ("dpmpp_2m_karras", "v"): (
        3.6633486615901347,
        [-0.03045506589114666, 0.17931997776031494, -0.36805129051208496],
    ),
    ("dpmpp_2m_karras", "x0"): (
        3.1144489273428917,
        [-0.01946854591369629, 0.21730554103851318, -0.33719202876091003],
    ),
    ("euler_a", "eps"): (21.128538373857737, [-2.6162567138671875, 2.2023892402648926, 0.6474921703338623]),
    ("euler_a", "v"): (1.1371710430830717, [-0.5123372673988342, 0.1556074321269989, 0.28061166405677795]),
    ("euler_a", "x0"): (1.8287224601954222, [-0.7767983675003052, 0.5630549788475037, 0.5046341419219971]),
    ("heun", "eps"): (28.00722413510084, [-0.12988995015621185, 0.3175288438796997, -1.8266870975494385]),
    ("heun", "v"): (1.719125658273697, [-0.028373874723911285, 0.1001565009355545, -0.24783989787101746]),
    ("heun", "x0"): (6.034721128642559, [-0.02530095726251602, 0.33498600125312805, -0.5188559889793396]),
    ("ddim_clip", "v"): (0.7516787014901638, [-0.36095696687698364, 0.2309851497411728, 0.11472295969724655]),
    ("euler_clip", "eps"): (-2.7682618752587587, [-0.2597648501396179, 0.5612672567367554, -1.0]),
}

LOSS_CASES = [
    ("eps", None, 0.0),
    ("v", None, 0.0),
    ("x0", None, 0.0),
    ("eps", 5.0, 0.0),
    ("v", 5.0, 0.1),
    ("x0", 5.0, 0.0),
]
SAMPLER_CASES = [
    (name, p)
    for name in ("ddim", "ddpm", "euler", "dpmpp_2m_karras", "euler_a", "heun")
    for p in ("eps", "v", "x0")
] + [("ddim_clip", "v"), ("euler_clip", "eps")]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(**kw) -> LatentDiffusion:
    torch.manual_seed(0)
    text = CLIPTextEncoder.tiny()
    unet = tiny_unet(num_heads=2, context_dim=text.hidden_size, use_linear_in_transformer=True)
    with torch.no_grad():  # the output layer starts at zero: perturb it so every weight gets a gradient
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae = AutoencoderKL(embed_dim=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, resolution=16, norm_groups=4)
    return LatentDiffusion(
        unet=unet,
        vae=vae,
        text_encoder=text,
        schedule=DiffusionSchedule.from_config(),
        sampler=build_sampler("ddim", steps=2),
        scale_factor=1.0,
        ema_decay=None,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        **kw,
    )


def training_losses(parameterization, gamma, offset) -> list:
    model = tiny_model(parameterization=parameterization, min_snr_gamma=gamma, offset_noise=offset)
    optimizer = model.configure_optimizers()
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        context = model.encode_text(["a red circle", "a blue square", ""])
    losses = []
    for step in range(3):
        loss = model.diffusion_step(z0, context, torch.Generator().manual_seed(10 + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        per_item = model.diffusion_step(z0, context, torch.Generator().manual_seed(20), reduction="none")
    return losses + [per_item.tolist()]


def denoiser(x, t):
    """A cheap nonlinear stand-in for a UNet that depends on the timestep."""
    return torch.tanh(0.7 * x) + 0.001 * t.float().reshape(-1, 1, 1, 1) * x.mean()


def sampled_latent(name, parameterization) -> tuple:
    clip = name.endswith("_clip")  # every x0 estimate clamped to [-1, 1]
    name = name.removesuffix("_clip")
    sampler = build_sampler(name, steps=4, clip_x0=clip, **({"eta": 0.5} if name == "ddim" else {}))
    z = sampler(
        denoiser,
        DiffusionSchedule.from_config(),
        (2, 4, 4, 4),
        parameterization,
        generator=torch.Generator().manual_seed(3),
    )
    return z.double().sum().item(), z.flatten()[:3].tolist()


@pytest.mark.parametrize("case", LOSS_CASES, ids=str)
def test_training_losses_are_pinned(case):
    assert training_losses(*case) == LOSSES[case]


@pytest.mark.parametrize("case", SAMPLER_CASES, ids=str)
def test_sampled_latents_are_pinned(case):
    assert sampled_latent(*case) == LATENTS[case]


if __name__ == "__main__":  # prints the tables above (run on the code the pins were taken from)
    torch.set_num_threads(1)
    print("LOSSES = {")
    for case in LOSS_CASES:
        print(f"    {case!r}: {training_losses(*case)!r},")
    print("}\nLATENTS = {")
    for case in SAMPLER_CASES:
        print(f"    {case!r}: {sampled_latent(*case)!r},")
    print("}")
