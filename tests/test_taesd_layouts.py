"""The TAESD loader reads each family member's layout off its state dict (madebyollin/taesd's taesd.py:
Encoder/Decoder, with the pooled blocks of FLUX.2, and F32Encoder/F32Decoder for SANA's DC-AE)."""

from __future__ import annotations

import pytest
import torch

from medlatent.autoencoders import TAESD, load_autoencoder
from medlatent.autoencoders.taesd import (
    decoder_layout,
    encoder_layout,
    infer_decoder_layout,
    infer_encoder_layout,
    make_decoder,
    make_encoder,
)
from medlatent.errors import MedlatentInputError

from .conftest import SHARED, shared_or_skip

SANA_DECODER = {"widths": (256, 128, 64, 64, 64, 64), "blocks": (3, 3, 3, 3, 3, 1)}

# name, latent channels, pooled blocks, encoder and decoder layout options, downsampling factor
PUBLISHED = [
    ("taesd", 4, False, {}, {}, 8),
    ("taesdxl", 4, False, {}, {}, 8),
    ("taesd3", 16, False, {}, {}, 8),
    ("taef1", 16, False, {}, {}, 8),
    ("taef2", 32, True, {}, {}, 8),
    ("taesana", 32, False, {"stem_downsamples": 2}, SANA_DECODER, 32),
]


def save(module: torch.nn.Module, path):
    """Random weights as the published files hold them: an fp16 state dict, .pth or .safetensors."""
    state = {k: v.half().contiguous() for k, v in module.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def save_pair(folder, name, channels, pooled, enc_kw, dec_kw, suffix=".pth"):
    torch.manual_seed(0)
    encoder = save(make_encoder(channels, pooled, **enc_kw), folder / f"{name}_encoder{suffix}")
    save(make_decoder(channels, pooled, **dec_kw), folder / f"{name}_decoder{suffix}")
    return encoder


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("name, channels, pooled, enc_kw, dec_kw, factor", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_every_published_layout_loads_strictly_with_its_channels_and_factor(
    tmp_path, suffix, name, channels, pooled, enc_kw, dec_kw, factor
):
    encoder = save_pair(tmp_path, name, channels, pooled, enc_kw, dec_kw, suffix)
    ae = load_autoencoder(f"taesd:{encoder}")  # TAESD loads with strict=True, or raises
    assert isinstance(ae, TAESD) and ae.has_decoder
    assert (ae.latent_channels, ae.downsampling_factor) == (channels, factor)
    assert ae.describe()["downsampling_factor"] == factor
    assert TAESD.__dict__.get("downsampling_factor") is None  # a per-instance value, not the class's
    with torch.no_grad():
        z = ae.encode(torch.rand(1, 3, 2 * factor, 2 * factor))
        assert z.shape == (1, channels, 2, 2)
        assert ae.decode(z).shape == (1, 3, 2 * factor, 2 * factor)
    with pytest.raises(MedlatentInputError, match=f"not a multiple of {factor}"):
        ae.encode(torch.rand(1, 3, factor + 4, factor + 4))


@pytest.mark.parametrize("name, channels, pooled, enc_kw, dec_kw, factor", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_inferred_layouts_equal_the_published_descriptions(name, channels, pooled, enc_kw, dec_kw, factor):
    enc, dec = encoder_layout(channels, pooled, **enc_kw), decoder_layout(channels, pooled, **dec_kw)
    assert infer_encoder_layout(make_encoder(channels, pooled, **enc_kw).state_dict()) == enc
    assert infer_decoder_layout(make_decoder(channels, pooled, **dec_kw).state_dict()) == dec
    assert sum(layer.pooled for layer in enc) == sum(layer.pooled for layer in dec) == (3 if pooled else 0)


def test_taesana_encoder_strides_twice_in_its_stem_and_ends_at_index_17():
    state = make_encoder(32, stem_downsamples=2).state_dict()
    assert max(int(key.split(".")[0]) for key in state) == 17 and "1.weight" not in state and "3.weight" not in state
    stem = infer_encoder_layout(state)[:4]
    assert [(layer.kind, layer.n_in, layer.n_out, layer.stride) for layer in stem] == [
        ("conv", 3, 32, 2),
        ("relu", 0, 0, 1),
        ("conv", 32, 64, 2),
        ("relu", 0, 0, 1),
    ]


def test_a_taesana_like_encoder_loads_encoder_only_without_a_decoder_file(tmp_path):
    torch.manual_seed(0)
    path = save(make_encoder(32, stem_downsamples=2), tmp_path / "taesana_encoder.pth")
    with pytest.raises(MedlatentInputError, match="not found"):
        load_autoencoder(f"taesd:{path}")  # the full autoencoder looks for taesana_decoder.pth
    ae = load_autoencoder(f"encoder:taesd:{path}")
    assert not ae.has_decoder and ae.describe()["has_decoder"] is False
    assert (ae.latent_channels, ae.downsampling_factor) == (32, 32)
    with torch.no_grad():
        assert ae.encode(torch.rand(1, 3, 64, 64)).shape == (1, 32, 2, 2)
    with pytest.raises(MedlatentInputError, match="no decoder"):
        ae.decode(torch.zeros(1, 32, 2, 2))


@pytest.mark.parametrize(
    "layout, factor",
    [
        ({"stages": 5}, 32),
        ({"stages": 5, "blocks": 1}, 32),
        ({"stages": 2, "blocks": 2}, 4),
        ({"stem_downsamples": 1}, 16),
    ],
)
def test_an_encoder_with_other_stage_counts_loads_with_the_factor_its_strides_give(tmp_path, layout, factor):
    torch.manual_seed(0)
    path = save(make_encoder(16, **layout), tmp_path / "other_encoder.safetensors")
    ae = load_autoencoder(f"encoder:taesd:{path}")
    assert (ae.latent_channels, ae.downsampling_factor, ae.has_decoder) == (16, factor, False)
    with torch.no_grad():
        assert ae.encode(torch.rand(1, 3, 2 * factor, 2 * factor)).shape == (1, 16, 2, 2)


def test_an_encoder_with_five_downsampling_stages_loads_encoder_only(tmp_path):
    torch.manual_seed(0)
    path = save(make_encoder(32, stages=5, blocks=3), tmp_path / "five_encoder.pth")
    ae = load_autoencoder(f"encoder:taesd:{path}")
    assert not ae.has_decoder and (ae.latent_channels, ae.downsampling_factor) == (32, 32)


def test_a_decoder_with_another_upsampling_count_than_its_encoder_is_refused(tmp_path):
    torch.manual_seed(0)
    encoder = save(make_encoder(32, True), tmp_path / "mixed_encoder.pth")  # taef2-like: 8x
    decoder = save(make_decoder(32, **SANA_DECODER), tmp_path / "mixed_decoder.pth")  # taesana-like: 32x
    with pytest.raises(MedlatentInputError, match="at 1/8 of the image size.*upsamples 32x") as err:
        load_autoencoder(f"taesd:{encoder},{decoder}")
    assert str(decoder) in str(err.value) and "\n" not in str(err.value)
    save(make_decoder(4), decoder)  # 8x, but 4 latent channels for the encoder's 32
    with pytest.raises(MedlatentInputError, match="gives 32 latent channels.*takes 4"):
        load_autoencoder(f"taesd:{encoder},{decoder}")


def shifted(state: dict, start: int) -> dict:
    """The same weights with every index from `start` on moved up by one, leaving a gap at `start`."""
    moved = {}
    for key, value in state.items():
        index, _, name = key.partition(".")
        moved[f"{int(index) + (int(index) >= start)}.{name}"] = value
    return moved


GARBAGE = {
    "foreign keys": {"encoder.conv_in.weight": torch.zeros(64, 3, 3, 3)},
    "empty": {},
    "not a dict": [torch.zeros(1)],
    "a linear layer": {"0.weight": torch.zeros(8, 3), "0.bias": torch.zeros(8)},
    "no blocks": {
        "0.weight": torch.zeros(64, 3, 3, 3),
        "0.bias": torch.zeros(64),
        "1.weight": torch.zeros(4, 64, 3, 3),
    },
    "a decoder": make_decoder(4).state_dict(),
    "a gap after a block": shifted(make_encoder(4).state_dict(), 2),
    "a half block": {k: v for k, v in make_encoder(4).state_dict().items() if k != "5.conv.4.weight"},
}


@pytest.mark.parametrize("name", GARBAGE)
def test_a_state_dict_of_no_taesd_layout_is_refused_in_one_line_naming_the_file(tmp_path, name):
    path = tmp_path / "garbage_encoder.pth"
    torch.save(GARBAGE[name], path)
    with pytest.raises(MedlatentInputError, match="do not match a TAESD-family model") as err:
        load_autoencoder(f"encoder:taesd:{path}")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_garbage_decoder_is_refused_naming_the_decoder(tmp_path):
    encoder = save(make_encoder(4), tmp_path / "taesd_encoder.pth")
    decoder = save(make_encoder(4), tmp_path / "taesd_decoder.pth")  # an encoder where the decoder should be
    with pytest.raises(MedlatentInputError, match="do not match a TAESD-family model .*Clamp, conv, ReLU") as err:
        load_autoencoder(f"taesd:{encoder}")
    assert str(decoder) in str(err.value)


def test_the_real_taef2_files_load_with_their_pooled_blocks():
    encoder = shared_or_skip("weights", "taef2", "taef2_encoder.pth")
    decoder = encoder.with_name("taef2_decoder.pth")
    ae = load_autoencoder(f"taesd:{encoder},{decoder}")
    assert (ae.latent_channels, ae.downsampling_factor) == (32, 8)
    state = torch.load(encoder, map_location="cpu", weights_only=True)
    assert [i for i, layer in enumerate(infer_encoder_layout(state)) if layer.pooled] == [11, 12, 13]
    state = torch.load(decoder, map_location="cpu", weights_only=True)
    assert [i for i, layer in enumerate(infer_decoder_layout(state)) if layer.pooled] == [3, 4, 5]
    with torch.no_grad():
        assert ae.decode(ae.encode(torch.rand(1, 3, 16, 16))).shape == (1, 3, 16, 16)


def test_the_real_taesana_encoder_loads_encoder_only_at_32x():
    encoder = SHARED / "weights" / "taesana" / "taesana_encoder.pth"  # from github.com/madebyollin/taesd
    if not encoder.is_file():
        pytest.skip(f"optional asset {encoder} not present (the real TAESANA encoder is not in ../shared)")
    ae = load_autoencoder(f"encoder:taesd:{encoder}")
    assert not ae.has_decoder and (ae.latent_channels, ae.downsampling_factor) == (32, 32)
    with torch.no_grad():
        assert ae.encode(torch.rand(1, 3, 64, 64)).shape == (1, 32, 2, 2)
