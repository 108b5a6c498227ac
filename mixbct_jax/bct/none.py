"""No compatibility term: the old model, or the new model's upper bound ("new-only")."""

NEEDS: tuple[str, ...] = ()
