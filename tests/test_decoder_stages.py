"""Decoder stages: each autoencoder's decoder as named stages from the latent to the unclamped
reconstruction, their features (`decode_to`) and the FLOPs of each decoder prefix (`stage_flops`)."""

from __future__ import annotations

import pytest
import torch

from medlatent.autoencoders import load_autoencoder
from medlatent.errors import MedlatentInputError

from .conftest import shared_or_skip, tiny_dc, tiny_flux2
from .test_taesd_layouts import PUBLISHED, save_pair

TAESD_STAGES = ["latent", "blocks", "up1", "up2", "up3", "reconstruction"]


def check_stages(ae, images: torch.Tensor, names: list[str], *, convs_in_every_stage: bool = True) -> list:
    """The properties every decoder's stages share; returns the features after each stage."""
    assert ae.decoder_stages() == names
    with torch.no_grad():
        z = ae.encode(images)
        features = [ae.decode_to(z, index) for index in range(len(names))]
        assert [ae.stage_index(name) for name in names] == list(range(len(names)))
        assert torch.equal(ae.decode_to(z, "reconstruction"), features[-1])
        assert torch.equal(ae.decode_to(z, -1), features[-1])
        assert features[0] is z
        assert all(f.ndim == 4 and f.shape[0] == images.shape[0] for f in features)
        sizes = [tuple(f.shape[-2:]) for f in features]
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(sizes, sizes[1:], strict=False))
        assert features[-1].shape == images.shape
        # The last stage is `decode` before its clamp: the raw decoder output mapped to [0, 1].
        lo, hi = ae.input_range
        raw = ae.decode_raw(z / ae.scaling_factor + ae.shift_factor)
        assert torch.allclose(features[-1], (raw - lo) / (hi - lo), atol=1e-5)
        assert torch.allclose(features[-1].clamp(0, 1), ae.decode(z), atol=1e-5)
    for bad in ("nope", len(names), -len(names) - 1, True):
        with pytest.raises(MedlatentInputError, match="not a decoder stage; use one of latent, ") as err:
            ae.decode_to(z, bad)
        assert "\n" not in str(err.value)
    flops = [ae.stage_flops(tuple(z.shape[1:]), name) for name in names]
    assert flops[0] == 0 and all(a <= b for a, b in zip(flops, flops[1:], strict=False))
    if convs_in_every_stage:
        assert all(a < b for a, b in zip(flops, flops[1:], strict=False))
    assert ae.stage_flops(tuple(z.shape[1:]), -1) == flops[-1]
    return features


def capture_outputs(modules, run) -> list[torch.Tensor]:
    """The outputs of `modules` (in the order given) during `run()`, through forward hooks."""
    outputs = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, i=i: outputs.setdefault(i, out)) for i, m in enumerate(modules)
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return [outputs[i] for i in range(len(modules))]


@pytest.mark.parametrize("name, channels, pooled, enc_kw, dec_kw, factor", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_taesd_stages_cut_before_each_upsampling(tmp_path, name, channels, pooled, enc_kw, dec_kw, factor):
    ae = load_autoencoder(f"taesd:{save_pair(tmp_path, name, channels, pooled, enc_kw, dec_kw)}")
    ups = sum(isinstance(m, torch.nn.Upsample) for m in ae.decoder)
    names = ["latent", "blocks", *(f"up{i}" for i in range(1, ups + 1)), "reconstruction"]
    images = torch.rand(2, 3, 2 * factor, 2 * factor)
    features = check_stages(ae, images, names)
    assert [f.shape[-1] for f in features[1:-1]] == [2 * 2**i for i in range(ups + 1)]
    # Each intermediate stage is the decoder's own activation before an upsampling or the final conv.
    cuts = [i - 1 for i, m in enumerate(ae.decoder) if isinstance(m, torch.nn.Upsample)] + [len(ae.decoder) - 2]
    with torch.no_grad():
        z = ae.encode(images)
    expected = capture_outputs([ae.decoder[i] for i in cuts], lambda: ae.decode(z))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(features[1:-1], expected, strict=True))


def test_diffusers_kl_stages_follow_its_decoder(tiny_kl_folder):
    ae = load_autoencoder(f"hf:{tiny_kl_folder}")
    images = torch.rand(2, 3, 16, 16)
    features = check_stages(ae, images, ["latent", "mid", "up0", "up1", "reconstruction"])
    assert [tuple(f.shape[1:]) for f in features[1:-1]] == [(16, 8, 8), (16, 16, 16), (8, 16, 16)]
    decoder = ae.vae.decoder
    with torch.no_grad():
        z = ae.encode(images)
    expected = capture_outputs([decoder.mid_block, *decoder.up_blocks], lambda: ae.decode(z))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(features[1:-1], expected, strict=True))


def test_builtin_stages(tiny_builtin_folder):
    ae = load_autoencoder(f"builtin:{tiny_builtin_folder}")
    check_stages(ae, torch.rand(2, 1, 16, 16), ["latent", "mid", "up0", "up1", "up2", "reconstruction"])


def test_diffusers_tiny_flux2_and_dc_stages(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).save_pretrained(tmp_path / "tiny")
    check_stages(
        load_autoencoder(f"hf:{tmp_path / 'tiny'}"), torch.rand(2, 3, 16, 16), TAESD_STAGES[:3] + ["reconstruction"]
    )

    tiny_flux2().save_pretrained(tmp_path / "flux2")
    ae = load_autoencoder(f"hf:{tmp_path / 'flux2'}")
    check_stages(ae, torch.rand(2, 3, 16, 16), ["latent", "mid", "up0", "up1", "reconstruction"])

    # A class without intermediate stages here falls back to the latent and the reconstruction.
    tiny_dc().save_pretrained(tmp_path / "dc")
    check_stages(load_autoencoder(f"hf:{tmp_path / 'dc'}"), torch.rand(2, 3, 16, 16), ["latent", "reconstruction"])


@pytest.mark.parametrize(
    "spec, channels", [("reference:identity", 1), ("reference:blur", 1), ("reference:identity:3", 3)]
)
def test_reference_stages(spec, channels):
    ae = load_autoencoder(spec)
    features = check_stages(
        ae, torch.rand(2, channels, 16, 16), ["latent", "reconstruction"], convs_in_every_stage=False
    )
    if spec.startswith("reference:identity"):
        with torch.no_grad():
            assert torch.equal(features[-1], ae.decode(ae.encode(features[-1])))


@pytest.mark.parametrize("spec", ["encoder:reference:identity", "encoder:taesd"])
def test_an_encoder_only_space_has_the_latent_stage_alone(tmp_path, spec):
    if spec == "encoder:taesd":
        spec += f":{save_pair(tmp_path, 'taesd', 4, False, {}, {})}"
    ae = load_autoencoder(spec)
    assert ae.decoder_stages() == ["latent"]
    images = torch.rand(1, ae.image_channels, 16, 16)
    with torch.no_grad():
        z = ae.encode(images)
    assert ae.decode_to(z, 0) is z and ae.decode_to(z, "latent") is z and ae.decode_to(z, -1) is z
    assert ae.stage_flops(tuple(z.shape[1:]), 0) == 0
    for stage in (1, "reconstruction", "up1"):
        with pytest.raises(MedlatentInputError, match="encoder-only latent space has only the stage 'latent'") as err:
            ae.decode_to(z, stage)
        assert "\n" not in str(err.value)
    with pytest.raises(MedlatentInputError, match="encoder-only"):
        ae.stage_flops(tuple(z.shape[1:]), "reconstruction")


def test_real_taef2_stages():
    encoder = shared_or_skip("weights", "taef2", "taef2_encoder.pth")
    ae = load_autoencoder(f"taesd:{encoder}")
    assert ae.decoder_stages() == TAESD_STAGES
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    x = torch.stack([0.5 + 0.4 * torch.sin(6 * xx) * torch.cos(4 * yy)] * 3)[None]
    with torch.no_grad():
        z = ae.encode(x)
        last = ae.decode_to(z, "reconstruction")
        assert torch.allclose(last, ae.decoder(z), atol=1e-6)  # TAESD works in [0, 1]: no range mapping
        assert torch.allclose(last.clamp(0, 1), ae.decode(z), atol=1e-6)
        assert [tuple(ae.decode_to(z, s).shape[-2:]) for s in TAESD_STAGES] == [
            (4, 4),
            (4, 4),
            (8, 8),
            (16, 16),
            (32, 32),
            (32, 32),
        ]
