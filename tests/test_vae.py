import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.models.autoencoder import AutoencoderModule
from ldm.models.guards import NonFiniteLossError
from ldm.modules.autoencoder_loss import adaptive_gan_weight
from ldm.modules.discriminator import PatchDiscriminator
from ldm.modules.distributions import DiagonalGaussian
from ldm.modules.vae import AutoencoderKL


def tiny_vae(ch_mult=(1, 2, 2), embed_dim=4, resolution=32):
    return AutoencoderKL(
        embed_dim=embed_dim,
        ch=8,
        ch_mult=ch_mult,
        num_res_blocks=1,
        resolution=resolution,
        norm_groups=4,
        attn_resolutions=(resolution // 4,),
    )


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 2, 3, 3) * 0.7, torch.randn(2, 2, 3, 3) * 0.5
    q = DiagonalGaussian(torch.cat([mean, logvar], 1))
    z = torch.stack([q.sample() for _ in range(40000)])  # [N, B, C, H, W]
    log_q = -0.5 * (((z - mean) ** 2) / logvar.exp() + logvar + torch.log(torch.tensor(2 * torch.pi)))
    log_p = -0.5 * (z**2 + torch.log(torch.tensor(2 * torch.pi)))
    mc = (log_q - log_p).sum(dim=(2, 3, 4)).mean(0)
    torch.testing.assert_close(q.kl(), mc, rtol=0.03, atol=0.05)
    expected = -0.5 * torch.sum(1 + logvar - mean**2 - logvar.exp(), dim=(1, 2, 3))
    torch.testing.assert_close(q.kl(), expected)


def test_reparameterisation_gradients_flow_to_mean_and_logvar():
    moments = torch.randn(3, 8, 4, 4, requires_grad=True)
    q = DiagonalGaussian(moments)
    g = torch.Generator().manual_seed(1)
    q.sample(g).pow(2).sum().backward()
    grad_mean, grad_logvar = moments.grad.chunk(2, dim=1)
    assert grad_mean.abs().sum() > 0 and grad_logvar.abs().sum() > 0
    # d/dmean sum(z^2) = 2z exactly
    z = q.mean + q.std * torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(grad_mean, 2 * z.detach())


@pytest.mark.parametrize("ch_mult,factor", [((1, 2, 2), 4), ((1, 2, 2, 4), 8)])
@pytest.mark.parametrize("resolution", [32, 64])
def test_encode_decode_shapes(ch_mult, factor, resolution):
    vae = tiny_vae(ch_mult, embed_dim=3, resolution=resolution)
    assert vae.downsample_factor == factor
    x = torch.randn(2, 3, resolution, resolution)
    posterior = vae.encode(x)
    assert posterior.mean.shape == (2, 3, resolution // factor, resolution // factor)
    assert vae.decode(posterior.sample()).shape == x.shape


def test_sd_vae_key_names_match_ldm_layout():
    with torch.device("meta"):
        vae = AutoencoderKL(embed_dim=4, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, resolution=256)
    sd = vae.state_dict()
    expected_shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    # SD v1's first_stage_model holds 248 tensors (without the loss module)
    assert len(sd) == 248


def _batch(n=4, res=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, res, res)
    x[:, 0] = torch.rand(n, 1, 1, generator=g) * 2 - 1
    x[:, :, res // 4 : res // 2, res // 4 : 3 * res // 4] = 0.8
    return {"image": x, "caption": [""] * n}


class _Loader(L.LightningDataModule):
    def __init__(self, n_batches=6):
        super().__init__()
        self.batches = [_batch(seed=i) for i in range(n_batches)]

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)

    def val_dataloader(self):
        return DataLoader(self.batches[:1], batch_size=None)


def _module(**kw):
    return AutoencoderModule(vae=tiny_vae(), optimizer=lambda params: torch.optim.Adam(params, lr=2e-3), **kw)


def _trainer(steps):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        check_val_every_n_epoch=1,
    )


def test_training_reduces_reconstruction_loss():
    torch.manual_seed(0)
    module = _module()
    batch = _batch()
    with torch.no_grad():
        before = (module.vae(batch["image"], sample_posterior=False)[0] - batch["image"]).abs().mean()
    _trainer(30).fit(module, datamodule=_Loader())
    with torch.no_grad():
        after = (module.vae(batch["image"], sample_posterior=False)[0] - batch["image"]).abs().mean()
    assert after < 0.7 * before
    assert "val/psnr" in module.trainer.callback_metrics


def test_gan_path_updates_discriminator_with_manual_optimisation():
    torch.manual_seed(0)
    disc = PatchDiscriminator(ndf=8, n_layers=2)
    module = _module(
        discriminator=disc, disc_optimizer=lambda params: torch.optim.Adam(params, lr=1e-3), disc_start=0
    )
    before = [p.detach().clone() for p in disc.parameters()]
    _trainer(4).fit(module, datamodule=_Loader())
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))
    metrics = module.trainer.callback_metrics
    assert "train/d_loss" in metrics and "train/g_loss" in metrics


def test_adaptive_weight_balances_gradient_norms():
    w = torch.randn(4, 4, requires_grad=True)
    rec = (w * 3).sum()
    g = (w * 0.5).sum()
    lam = adaptive_gan_weight(rec, g, w)
    assert lam.item() == pytest.approx(6.0, rel=1e-3)


def test_non_finite_loss_stops_with_actionable_error():
    module = _module()
    batch = _batch()
    batch["image"][0, 0, 0, 0] = float("nan")

    class NaNData(_Loader):
        def train_dataloader(self):
            return DataLoader([batch], batch_size=None)

    with pytest.raises(NonFiniteLossError, match="ckpt_path"):
        _trainer(2).fit(module, datamodule=NaNData())


def test_perceptual_weight_without_lpips_is_a_clear_error():
    with pytest.raises(ValueError, match="lpips"):
        _module(perceptual_weight=1.0)


def test_lpips_from_local_files(tmp_path):
    from ldm.modules.lpips import LPIPS, _vgg16_features

    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # other torchvision keys are ignored
    torch.save(vgg, tmp_path / "vgg16.pth")
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin, tmp_path / "vgg.pth")
    lpips = LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    assert (lpips(x, x.flip(-1)) > 0).all()
    assert not any(p.requires_grad for p in lpips.parameters())
    module = _module(lpips=lpips, perceptual_weight=1.0)
    batch = _batch()
    loss, _, _ = module._generator_loss(
        batch["image"], batch["image"].flip(-1), module.vae.encode(batch["image"])
    )
    assert torch.isfinite(loss)
    with pytest.raises(FileNotFoundError, match="perceptual_weight=0"):
        LPIPS.from_files(tmp_path / "missing.pth", tmp_path / "vgg.pth")
