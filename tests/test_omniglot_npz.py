"""benchmarks/omniglot_npz.py rebuilds the Omniglot benchmarks' npz from Omniglot's zips, byte for byte."""

import importlib.util
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_rebuilds_the_shared_npz_exactly(omniglot_dir):
    spec = importlib.util.spec_from_file_location("omniglot_npz", ROOT / "benchmarks" / "omniglot_npz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build([omniglot_dir / "images_background_small1.zip", omniglot_dir / "images_background_small2.zip"])
    with np.load(omniglot_dir / "omniglot_small_28.npz") as shared:
        for key in ("images", "label", "class_names"):
            np.testing.assert_array_equal(built[key], shared[key], err_msg=key)
