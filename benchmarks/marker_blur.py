"""How learnable the synthetic corner marker is from the image and from `reference:blur`'s spaces.

The shortcuts section's out-of-fold linear probe (`audits.shortcuts.confounder_auroc`) predicts the
marker from 256 test images of `synthetic:marker=corner,marker_rate=0.9` at each marker contrast;
printed: AUROC, its 95% interval and the V-information (nats) per space.

    python benchmarks/marker_blur.py
"""

from __future__ import annotations

import torch

from medlatent.audits.config import EncoderAuditConfig
from medlatent.audits.shortcuts import confounder_auroc
from medlatent.autoencoders import load_autoencoder
from medlatent.data import load_dataset
from medlatent.data.spaces import encode_images

CONTRASTS = (0.3, 0.1, 0.03, 0.01)


def main() -> None:
    config = EncoderAuditConfig()
    ae = load_autoencoder("reference:blur", device="cpu", progress=False)
    for contrast in CONTRASTS:
        ds = load_dataset(f"synthetic:marker=corner,marker_rate=0.9,marker_contrast={contrast}", 64)
        test = ds.partitions["test"][:256]
        images = ds.load(test)
        latents, reconstructions = encode_images(ae, images, torch.device("cpu"), ds)
        codes = ds.confounder.codes[test]
        spaces = {"image": images, "latent": latents, "reconstruction": reconstructions}
        for space, x in spaces.items():
            probe = confounder_auroc(space, x, codes, 2, config)
            low, high = probe["ci95"]
            print(
                f"contrast {contrast:g}  {space:14s} AUROC {probe['value']:.3f} [{low:.3f}, {high:.3f}]  "
                f"V-information {probe['v_information']:+.3f} nats",
                flush=True,
            )


if __name__ == "__main__":
    main()
