"""The shipped config files.

Installed as ``mixbct_jax.configs`` (see pyproject.toml), so ``--config quickstart`` works from a wheel as well as
``--config configs/quickstart.py`` in a checkout.
"""
