"""BreastMNIST as a folder of PNG files and a CSV manifest with a confounder column and concept
columns built from image statistics, for the encoder audit's shortcuts and concepts sections on
real images.

BreastMNIST records no site or scanner, so the columns are measured on the pixels, each cut at
thresholds of the training images alone:

- `brightness`: the image's mean intensity in training tertiles (dark, medium, bright), a stand-in
  for a scanner's gain: the confounder;
- `dark_area`: the share of pixels darker than 0.25 above the training median (a large
  hypoechoic region); `textured`: the standard deviation of the intensities above the training
  median; `dark_centre`: the mean of the central 10 x 10 pixels below the training median (where
  the finding usually lies): the concepts.

    python benchmarks/breastmnist_manifest.py --out breast-csv
    medlatent audit --dataset csv:breast-csv/labels.csv --split-column split --size 64 \\
        --confounder-column brightness --concept-column dark_area --concept-column textured \\
        --concept-column dark_centre --sections shortcuts,concepts
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

BREASTMNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist" / "breastmnist.npz"
PARTS = ("train", "val", "test")


def statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: mean and standard deviation of the intensities, the share of pixels darker than
    0.25 and the mean of the central 10 x 10."""
    x = images.astype(np.float64) / 255.0
    lo = (x.shape[1] - 10) // 2
    return {
        "mean": x.mean((1, 2)),
        "std": x.std((1, 2)),
        "dark": (x < 0.25).mean((1, 2)),
        "centre": x[:, lo : lo + 10, lo : lo + 10].mean((1, 2)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", default=str(BREASTMNIST), help="the official breastmnist.npz")
    parser.add_argument("--out", required=True, help="folder for the PNG files and labels.csv")
    args = parser.parse_args(argv)
    data = np.load(args.npz)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    train = statistics(data["train_images"])
    tertiles = np.quantile(train["mean"], [1 / 3, 2 / 3])
    medians = {k: float(np.median(v)) for k, v in train.items()}
    rows = ["path,label,split,brightness,dark_area,textured,dark_centre"]
    for part in PARTS:
        images, labels = data[f"{part}_images"], data[f"{part}_labels"][:, 0]
        stats = statistics(images)
        brightness = np.array(["dark", "medium", "bright"])[np.searchsorted(tertiles, stats["mean"])]
        for i, image in enumerate(images):
            name = f"images/{part}-{i:04d}.png"
            Image.fromarray(image).save(out / name)
            flags = (
                stats["dark"][i] > medians["dark"],
                stats["std"][i] > medians["std"],
                stats["centre"][i] < medians["centre"],
            )
            rows.append(f"{name},{labels[i]},{part},{brightness[i]},{','.join(str(int(f)) for f in flags)}")
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    print(f"{len(rows) - 1} images and {out / 'labels.csv'}")


if __name__ == "__main__":
    main()
