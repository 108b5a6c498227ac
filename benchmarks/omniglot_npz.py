r"""Builds ``omniglot_small_28.npz``, the small real image set of the Omniglot benchmarks, from Omniglot's own zips.

The comparisons in ``benchmarks/compat_table.py`` and ``benchmarks/fidelity.py`` read ``omniglot_small_28.npz``:
``images`` uint8 [4840, 28, 28] (ink = 255), ``label`` int32 [4840] (0..241), ``class_names`` [242]
(``Alphabet/characterNN``), 242 classes x 20 drawers. Make it from the two "small background" zips of the
Omniglot repository by Brenden Lake (github.com/brendenlake/omniglot, ``python/images_background_small1.zip`` and
``python/images_background_small2.zip``; MIT licence):

    python benchmarks/omniglot_npz.py images_background_small1.zip images_background_small2.zip \
        --out data/omniglot_small_28.npz
    python benchmarks/fidelity.py run --data data/omniglot_small_28.npz ...

Classes are the sorted ``Alphabet/characterNN`` names (Greek and Latin are in both zips with identical files and
count once), images the sorted file names of a class; each 105 x 105 PNG is box-resized to 28 x 28 and inverted so
that ink is 255. The result is byte-identical to the copy this project's benchmarks were run on.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import zipfile

import numpy as np


def build(zips: list[str | pathlib.Path], size: int = 28) -> dict[str, np.ndarray]:
    """The arrays of the npz from Omniglot's background zips (see the module docstring)."""
    from PIL import Image

    files: dict[str, dict[str, tuple[zipfile.ZipFile, str]]] = {}
    archives = [zipfile.ZipFile(z) for z in zips]
    for archive in archives:
        for name in archive.namelist():
            parts = name.split("/")
            if name.endswith(".png") and len(parts) >= 3:
                files.setdefault(f"{parts[-3]}/{parts[-2]}", {})[parts[-1]] = (archive, name)
    if not files:
        raise ValueError(
            f"{[str(z) for z in zips]}: no <Alphabet>/<character>/<file>.png inside; pass Omniglot's "
            "images_background_small{1,2}.zip"
        )
    class_names = sorted(files)
    images, labels = [], []
    for label, key in enumerate(class_names):
        for file_name in sorted(files[key]):
            archive, member = files[key][file_name]
            with Image.open(io.BytesIO(archive.read(member))) as im:
                small = im.convert("L").resize((size, size), Image.BOX)
            images.append(255 - np.asarray(small, np.uint8))
            labels.append(label)
    for archive in archives:
        archive.close()
    return {"images": np.stack(images), "label": np.asarray(labels, np.int32), "class_names": np.asarray(class_names)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("zips", nargs="+", help="images_background_small1.zip images_background_small2.zip")
    p.add_argument("--out", default="omniglot_small_28.npz")
    args = p.parse_args(argv)
    arrays = build(args.zips)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}: {arrays['images'].shape[0]} images, {len(arrays['class_names'])} classes")


if __name__ == "__main__":
    main()
