"""Which --alpha background keeps transparent icons apart: extract + logreg per background, on generated icons.

Icons are glyphs (circle, square, triangle, cross, ring) drawn with anti-aliased edges on a fully transparent
canvas whose hidden colour is black (what most icon exporters store). Three glyph colours: black, white and
random colours. For each background, reports how many train rows are distinct and the logreg val/test accuracy.

    PYTHONPATH=. python -m benchmarks.alpha_icons [--per-class 16] [--base efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GLYPHS = ("circle", "square", "triangle", "cross", "ring")


def draw_icon(glyph: str, colour: tuple[int, int, int], rng: np.random.Generator, size: int = 48) -> Image.Image:
    """One RGBA icon: ``glyph`` in ``colour`` at a random place and size, transparent (stored black) elsewhere."""
    scale = 4  # drawn large and downsampled: soft, partly transparent edges like real icons
    big = size * scale
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    pen = ImageDraw.Draw(image)
    r = rng.uniform(0.2, 0.38) * big
    cx, cy = rng.uniform(r, big - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = (*colour, 255)
    width = max(2, int(r / 3))
    if glyph == "circle":
        pen.ellipse(box, fill=fill)
    elif glyph == "square":
        pen.rectangle(box, fill=fill)
    elif glyph == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif glyph == "cross":
        pen.line((cx - r, cy - r, cx + r, cy + r), fill=fill, width=width)
        pen.line((cx - r, cy + r, cx + r, cy - r), fill=fill, width=width)
    else:
        pen.ellipse(box, outline=fill, width=width)
    return image.resize((size, size), Image.LANCZOS)


def make_icon_folder(root: Path, *, glyph_colour: str, per_class: dict[str, int], seed: int = 0) -> Path:
    """ROOT/{train,val,test}/<glyph>/<i>.png: RGBA icons; ``glyph_colour`` is black, white or random."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for glyph in GLYPHS:
            folder = root / split / glyph
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour = {"black": (0, 0, 0), "white": (255, 255, 255)}.get(glyph_colour)
                colour = colour or tuple(int(c) for c in rng.integers(0, 256, 3))
                draw_icon(glyph, colour, rng).save(folder / f"{i:03d}.png")
    return root


def main() -> None:
    from featurecache.config import Paths
    from featurecache.data import ALPHA_MODES
    from featurecache.extract import ExtractOptions, ExtractRequest, extract
    from featurecache.train import TrainOptions, train_heads

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--per-class", type=int, default=16, help="train images per glyph (val and test get a quarter)")
    p.add_argument("--base", default="efficientnet_lite0")
    p.add_argument("--layers", default="_blocks.14.add", help="one tap (a default tap of efficientnet_lite0)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    counts = {"train": args.per_class, "val": max(2, args.per_class // 4), "test": max(2, args.per_class // 4)}
    print(f"{'glyphs':7s} {'--alpha':7s} {'distinct train rows':>20s} {'val acc':>8s} {'test acc':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        for colour in ("black", "white", "random"):
            data = make_icon_folder(Path(tmp) / f"icons-{colour}", glyph_colour=colour, per_class=counts)
            for alpha in ALPHA_MODES:
                paths = Paths(Path(tmp) / f"home-{colour}-{alpha}")
                options = ExtractOptions(alpha=alpha, workers=0, progress=False, device="cpu")
                results = extract(
                    ExtractRequest(data, base=args.base, layers=args.layers), options=options, paths=paths
                )
                train = next(r for r in results if r.split == "train")
                distinct = train.num_samples - train.num_skipped - train.identical_rows
                (side,) = train_heads(dataset=data.name, base_tag=args.base, heads=["logreg"],
                                      options=TrainOptions(progress=False), paths=paths)  # fmt: skip
                print(f"{colour:7s} {alpha:7s} {distinct:>9d} of {train.num_samples:<8d} "
                      f"{side['selection_val_accuracy']:8.3f} {side['test']['accuracy']:8.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
