"""Optimizer and learning-rate schedules (docs/methods.md (optimiser)-3.5).

SGD with momentum 0.9 (PyTorch semantics: ``buf = 0.9 buf + g``, ``p -= lr buf``), coupled weight decay added to
the gradient before momentum, and a global-norm clip that covers the backbone's parameter group only and is
computed before weight decay. The class centres form the second group: same decay and momentum, never clipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mixbct_jax.aliases import PyTree
from mixbct_jax.heads.sharded_fc import is_centres


def poly_schedule(*, base_lr: float, total_steps: int, warmup_steps: int, power: float = 2.0) -> optax.Schedule:
    """The reference's PolyScheduler: linear warm-up, then ``base * (1 - (t - w) / (T - w)) ** power``.

    A negative ``warmup_steps`` (BCT's ``warmup_epoch = -1``) never takes the warm-up branch and shifts the decay
    by ``-warmup_steps``: ``lr(0) = base * (T / (T - w)) ** power``, e.g. 0.1 * (35/36)^2 = 0.0945.
    """

    def schedule(t):
        t = jnp.asarray(t, jnp.float32)
        warm = base_lr * t / max(warmup_steps, 1)
        frac = jnp.clip(1.0 - (t - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        decay = base_lr * frac**power
        return jnp.where(t < warmup_steps, warm, decay) if warmup_steps > 0 else decay

    return schedule


def step_schedule(
    *, base_lr: float, steps_per_epoch: int, decay_epochs: tuple[int, ...], factor: float = 0.1
) -> optax.Schedule:
    """UniBCT's StepLR: ``base * factor ** #{e in decay_epochs : e <= epoch}``, constant within an epoch."""
    boundaries = {int(e) * steps_per_epoch: factor for e in decay_epochs}
    return optax.piecewise_constant_schedule(base_lr, boundaries)


def make_schedule(optim, *, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    if optim.schedule == "poly":
        return poly_schedule(
            base_lr=optim.lr,
            total_steps=total_steps,
            power=optim.power,
            warmup_steps=int(round(optim.warmup_epochs * steps_per_epoch)),
        )
    if optim.schedule == "step":
        return step_schedule(base_lr=optim.lr, steps_per_epoch=steps_per_epoch, decay_epochs=tuple(optim.decay_epochs))
    raise ValueError(f"config.optim.schedule={optim.schedule!r}: choose 'poly' or 'step'")


def param_groups(params: PyTree) -> PyTree:
    """'head' for the sharded class centres, 'backbone' for everything else (clipped)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "head" if is_centres(path) else "backbone", params)


def make_optimizer(optim, schedule: optax.Schedule) -> optax.GradientTransformation:
    """``optim`` is ``config.optim`` (lr, momentum, weight_decay, clip_norm, ...)."""

    def group(clip: bool) -> optax.GradientTransformation:
        parts = [optax.clip_by_global_norm(optim.clip_norm)] if clip and optim.clip_norm > 0 else []
        parts += [optax.add_decayed_weights(optim.weight_decay), optax.sgd(schedule, momentum=optim.momentum)]
        return optax.chain(*parts)

    return optax.multi_transform({"backbone": group(True), "head": group(False)}, param_groups)
