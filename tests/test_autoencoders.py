from __future__ import annotations

import pytest
import torch

from medlatent.autoencoders import TAESD, load_autoencoder
from medlatent.autoencoders.taesd import make_decoder, make_encoder
from medlatent.errors import MedlatentInputError

from .conftest import shared_or_skip, tiny_dc, tiny_flux2, tiny_kl


def test_hf_autoencoder_kl_applies_scaling_and_shift(tiny_kl_folder):
    ae = load_autoencoder(f"hf:{tiny_kl_folder}")
    assert (ae.latent_channels, ae.downsampling_factor, ae.image_channels) == (4, 2, 3)
    assert (ae.scaling_factor, ae.shift_factor) == (0.5, 0.1)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        z = ae.encode(x)
        raw = ae.vae.encode(x * 2 - 1).latent_dist.mode()
        assert torch.allclose(z, (raw - 0.1) * 0.5, atol=1e-6)
        y = ae.decode(z)
        expected = ((ae.vae.decode(raw).sample + 1) / 2).clamp(0, 1)
        assert torch.allclose(y, expected, atol=1e-5)
    assert (
        ae.content_hash.startswith("sha256:")
        and ae.content_hash == load_autoencoder(f"hf:{tiny_kl_folder}").content_hash
    )


def test_hf_subfolder_and_other_classes(tmp_path):
    from diffusers import AutoencoderTiny

    tiny_kl().save_pretrained(tmp_path / "pipe" / "vae")
    ae = load_autoencoder(f"hf:{tmp_path / 'pipe'}:vae")
    assert ae.latent_channels == 4

    AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).save_pretrained(tmp_path / "tiny")
    tiny = load_autoencoder(f"hf:{tmp_path / 'tiny'}")
    assert tiny.downsampling_factor == 2
    with torch.no_grad():
        assert tiny.encode(torch.rand(1, 3, 16, 16)).shape == (1, 4, 8, 8)

    tiny_dc().save_pretrained(tmp_path / "dc")
    dc = load_autoencoder(f"hf:{tmp_path / 'dc'}")
    assert (dc.latent_channels, dc.downsampling_factor, dc.scaling_factor) == (8, 2, 0.4)
    with torch.no_grad():
        assert dc.decode(dc.encode(torch.rand(1, 3, 16, 16))).shape == (1, 3, 16, 16)

    tiny_flux2().save_pretrained(tmp_path / "flux2")
    ae = load_autoencoder(f"hf:{tmp_path / 'flux2'}")
    assert ae.size_multiple == 4
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        z = ae.encode(x)
        raw = ae.vae.encode(x * 2 - 1).latent_dist.mode()
        assert not torch.allclose(z, raw)  # batch-norm statistics applied
        assert torch.allclose(ae._flux2_normalise(z, inverse=True), raw, atol=1e-5)
    with pytest.raises(MedlatentInputError, match="not a multiple of 4"):
        ae.encode(torch.rand(1, 3, 18, 18))


def test_hf_errors(tmp_path):
    with pytest.raises(MedlatentInputError, match="cannot resolve 'no-such-org/no-such-vae'"):
        load_autoencoder("hf:no-such-org/no-such-vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedlatentInputError, match="has no config.json"):
        load_autoencoder(f"hf:{tmp_path / 'empty'}")
    tiny_kl().save_pretrained(tmp_path / "broken")
    from safetensors.torch import save_file

    save_file({"nonsense.weight": torch.zeros(1)}, str(tmp_path / "broken" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(MedlatentInputError, match="do not load into AutoencoderKL"):
        load_autoencoder(f"hf:{tmp_path / 'broken'}")
    with pytest.raises(MedlatentInputError, match="unknown kind"):
        load_autoencoder("nope:x")
    with pytest.raises(MedlatentInputError, match="the medvae package is not installed"):
        load_autoencoder("medvae:medvae_4_1_2d")


def _save_taesd(tmp_path, latent_channels, pooled, prefix="taesd"):
    torch.manual_seed(0)
    torch.save(make_encoder(latent_channels, pooled).half().state_dict(), tmp_path / f"{prefix}_encoder.pth")
    torch.save(make_decoder(latent_channels, pooled).half().state_dict(), tmp_path / f"{prefix}_decoder.pth")
    return tmp_path / f"{prefix}_encoder.pth"


@pytest.mark.parametrize("channels, pooled", [(4, False), (16, False), (32, True)])
def test_taesd_family_from_state_dicts(tmp_path, channels, pooled):
    encoder = _save_taesd(tmp_path, channels, pooled)
    ae = load_autoencoder(f"taesd:{encoder}")
    assert isinstance(ae, TAESD) and ae.latent_channels == channels and ae.input_range == (0.0, 1.0)
    with torch.no_grad():
        z = ae.encode(torch.rand(1, 3, 16, 16))
        assert z.shape == (1, channels, 2, 2)
        assert ae.decode(z).shape == (1, 3, 16, 16)
    explicit = load_autoencoder(f"taesd:{encoder},{tmp_path / 'taesd_decoder.pth'}")
    assert explicit.content_hash == ae.content_hash


def test_taesd_errors(tmp_path):
    encoder = _save_taesd(tmp_path, 4, False)
    with pytest.raises(MedlatentInputError, match="not found"):
        load_autoencoder(f"taesd:{tmp_path / 'missing_encoder.pth'}")
    torch.save({"14.weight": torch.zeros(4, 64, 3, 3), "extra": torch.zeros(1)}, tmp_path / "bad_encoder.pth")
    torch.save(make_decoder(4, False).state_dict(), tmp_path / "bad_decoder.pth")
    with pytest.raises(MedlatentInputError, match="do not match a TAESD-family model"):
        load_autoencoder(f"taesd:{tmp_path / 'bad_encoder.pth'}")
    # A pickled object (not a plain state dict) is refused by weights_only loading.
    torch.save({"14.weight": torch.nn.Conv2d(1, 1, 1)}, tmp_path / "pickle_encoder.pth")
    with pytest.raises(MedlatentInputError, match="cannot read"):
        load_autoencoder(f"taesd:{tmp_path / 'pickle_encoder.pth'},{tmp_path / 'bad_decoder.pth'}")
    ae = load_autoencoder(f"taesd:{encoder}")
    with pytest.raises(MedlatentInputError, match="not a multiple of 8"):
        ae.encode(torch.rand(1, 3, 12, 12))
    assert ae.prepare(torch.rand(1, 1, 12, 12)).shape == (1, 3, 16, 16)  # resized up to a multiple
    with pytest.raises(MedlatentInputError, match="--size 4 is smaller than 8"):
        ae.prepare(torch.rand(1, 1, 4, 4))


def test_real_taef2_reconstructs_well():
    encoder = shared_or_skip("weights", "taef2", "taef2_encoder.pth")
    ae = load_autoencoder(f"taesd:{encoder}")
    assert ae.latent_channels == 32 and ae.content_hash.startswith("sha256:10a4e1021e89d755")
    # A smooth test pattern: a good autoencoder keeps it closely.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    x = torch.stack([0.5 + 0.4 * torch.sin(6 * xx) * torch.cos(4 * yy)] * 3)[None]
    with torch.no_grad():
        y = ae.decode(ae.encode(x))
    psnr = -10 * torch.log10(((y - x) ** 2).mean())
    assert psnr > 25


def test_builtin_trains_saves_and_loads(tiny_builtin_folder):
    ae = load_autoencoder(f"builtin:{tiny_builtin_folder}")
    assert ae.image_channels == 1 and ae.downsampling_factor == 4
    assert ae.training_record["recipe"]["steps"] == 3
    assert ae.scaling_factor != 1.0  # set from training latents
    with torch.no_grad():
        assert ae.encode(torch.rand(2, 1, 32, 32)).shape == (2, 4, 8, 8)
    # Channel adaptation at the boundary: RGB in, grayscale autoencoder.
    assert ae.prepare(torch.rand(2, 3, 30, 30)).shape == (2, 1, 32, 32)
    with pytest.raises(MedlatentInputError, match="neither a built-in recipe"):
        load_autoencoder("builtin:does-not-exist")


def test_a_family_registered_by_name_loads_by_its_spec_and_names_itself():
    from medlatent.autoencoders import FAMILIES, ReferenceAutoencoder, display_name, register_family

    @register_family("mine", "mine:NAME, a test family", name=lambda target: f"my {target}")
    def load_mine(target, spec, *, device, progress, encoder_only):
        model = ReferenceAutoencoder("identity", 1)
        model.spec = spec
        return model

    try:
        ae = load_autoencoder("mine:thing")
        assert ae.spec == "mine:thing" and not ae.training and display_name("mine:thing") == "my thing"
        encoder = load_autoencoder("encoder:mine:thing")  # the encoder: kind wraps any registered family
        assert not encoder.has_decoder and display_name("encoder:mine:thing") == "my thing (encoder)"
        with pytest.raises(MedlatentInputError, match="use one of encoder, .*mine"):
            load_autoencoder("nosuch:thing")
    finally:
        del FAMILIES["mine"]
