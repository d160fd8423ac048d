"""Render docs/phantoms.png: six demo studies (three metastatic), anterior | posterior, NM display.

    python scripts/phantom_montage.py docs/phantoms.png [--seed 43] [--scale 0.6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonescan_core import pixelstore  # noqa: E402
from bonescan_core.phantom import make_study  # noqa: E402

CAPTION_HEIGHT = 30


def caption(study) -> str:
    kinds = sorted({f.kind.replace("_", " ") for f in study.findings if f.kind != "metastasis"})
    head = f"metastatic, {len(study.lesions) // 2} lesion(s)" if study.metastatic else "non-metastatic"
    return f"{head}  {study.sex}/{study.age} {study.primary_cancer}" + (f"\n+ {', '.join(kinds)}" if kinds else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=43)
    parser.add_argument("--scale", type=float, default=0.6, help="output scale (noise does not compress)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    studies = [make_study(rng, metastatic) for metastatic in (True, True, True, False, False, False)]
    height = round(1024 * args.scale)
    tiles = []
    for study in studies:
        upper = float(np.percentile(np.concatenate([study.anterior.ravel(), study.posterior.ravel()]), 99.5))
        views = [pixelstore.to_display(getattr(study, v), upper=upper, gamma=0.7) for v in ("anterior", "posterior")]
        pair = pixelstore.side_by_side(views, height, gap=8)
        tile = Image.new("L", (pair.shape[1] + 16, height + CAPTION_HEIGHT), 255)
        tile.paste(Image.fromarray(pair), (8, CAPTION_HEIGHT))
        ImageDraw.Draw(tile).multiline_text((8, 2), caption(study), fill=0)
        tiles.append(np.asarray(tile))
    Image.fromarray(np.concatenate(tiles, axis=1)).save(args.out, optimize=True)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
