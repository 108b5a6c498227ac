"""mixbct-jax: backward-compatible representation training (MixBCT and baselines) in JAX/Flax."""

__version__ = "0.1.0"
