"""Test setup: fake 4 CPU devices before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow (used only for the input pipeline) must not grab the GPU or print banners.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def omniglot_dir() -> pathlib.Path:
    path = SHARED / "data" / "omniglot"
    if not (path / "omniglot_small_28.npz").exists():
        pytest.skip(f"{path} is absent (it lies beside the checkout in development and CI)")
    return path
