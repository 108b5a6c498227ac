"""No compatibility term: the old model, or the new model's upper bound ("new-only")."""

from mixbct_jax.bct import api

METHOD = api.Method(name="none", presets={"none": {}})
