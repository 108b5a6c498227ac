"""Every field a run reads, with the reference's defaults. Config files start from ``default_config()``.

Configs are data: ``configs/<name>.py`` defines ``get_config(arg=None)``, overrides what its recipe changes and
returns the config locked, so a misspelt ``--config.optim.lrr=...`` is an error. Epochs are resolved into steps
once by the trainer and never written back.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.parallel = "shard_map"  # or "pmap": the same per-device body under jax.pmap
    c.num_devices = -1  # -1: every device; N: the first N (one process only)
    c.total_steps = -1  # > 0 overrides optim.num_epochs

    c.model = ml_collections.ConfigDict()
    c.model.arch = "r50"  # r18 r34 r50 r100 r200 mbf mbf_large
    c.model.embedding_size = 512
    c.model.input_size = 112
    c.model.width = 1.0  # stage-width multiplier (tiny test models)
    c.model.dtype = "float32"  # "bfloat16": bf16 compute, fp32 parameters
    c.model.num_classes = -1  # -1: the training subset's class count

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # rec:<prefix> | tfds:<name>[:split] | folder:<dir> | npz:<file> | synthetic[:k=v,..]
    c.data.scenario = "full"  # full | opclass | opdata | exclass | exdata (SPEC §1.6)
    c.data.role = "old"  # which side of the scenario this run trains on: old | new
    c.data.split_ratio = 0.3
    c.data.global_batch = 1024  # 128 per GPU x 8 in the reference
    c.data.flip = True
    c.data.threads = -1  # input worker processes (Grain); 0 = decode in the trainer; -1 = auto (docs/data.md)

    c.head = ml_collections.ConfigDict()
    c.head.type = "arcface"  # arcface | cosface | combined | softmax
    c.head.scale = 64.0
    c.head.margins = (1.0, 0.5, 0.0)  # (m1, m2, m3): ArcFace uses m2, CosFace m3
    c.head.sample_rate = 1.0  # PartialFC sampling of the class centres
    c.head.interclass_filtering_threshold = 0.0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.clip_norm = 5.0
    c.optim.num_epochs = 35
    c.optim.schedule = "poly"  # poly | step
    c.optim.power = 2.0
    c.optim.warmup_epochs = 0.0
    c.optim.decay_epochs = (20, 26, 32)  # for schedule == "step" (UniBCT)

    c.bct = ml_collections.ConfigDict()  # docs/methods.md explains every field and each reference quirk
    c.bct.method = "none"  # none | mixbct | l2 | bct | unibct | nccl | advbct
    c.bct.mix_ratio = 0.3  # MixBCT
    # L2 / weakened L2 (SPEC §4.1): weight x mean hinge of ||n(o) - n(e)|| above the threshold.
    c.bct.l2_weight = 10.0
    c.bct.l2_threshold = 0.0  # 0: "L2"; 0.2: "weakened L2"
    # BCT / UniBCT influence loss (SPEC §4.2): CE of n(e) . prototypes (no scale, no margin).
    c.bct.influence_weight = 1.0
    # UniBCT (SPEC §4.3)
    c.bct.unibct_start_epoch = 10  # influence loss weight 0 before this epoch
    c.bct.unibct_refine_epochs = (10, 20)  # prototype refinement at the start of these epochs
    c.bct.unibct_affinity = "row"  # "row": row-stochastic affinity (paper); "column": reference (= class mean)
    c.bct.unibct_lambda = 0.9  # propagation weight of (1 - lam)(I - lam A)^-1
    c.bct.unibct_temperature = 0.05  # affinity temperature on cosines of the new features
    c.bct.unibct_normalize_prototypes = False  # reference: refined prototypes stay unnormalised
    # NCCL (SPEC §4.4)
    c.bct.nccl_queue_size = 8192  # Q, >= the global batch
    c.bct.nccl_alpha = 1.0  # embedding-level loss weight
    c.bct.nccl_beta = 0.01  # logit-level loss weight
    c.bct.nccl_temperature = 1.0
    c.bct.nccl_logit_grad = True  # reference: False (its logit loss is built on a non-differentiable gather)
    c.bct.nccl_normalize_logits = True  # cosine of logit vectors; reference: False (raw dot products)
    c.bct.nccl_clamp_logits = False  # reference: True (clamps the x s logits to [-1, 1], an fp16-branch artefact)
    c.bct.nccl_amplify_grad = False  # reference: True (the embedding-level gradient arrives x #devices)
    c.bct.nccl_count_empty_slots = False  # reference: True (empty queue slots enter the softmax denominators)
    # AdvBCT (SPEC §4.5)
    c.bct.advbct_threshold = 0.4  # radius threshold of the boundary loss
    c.bct.advbct_p2s_weight = 4.0  # point-to-set boundary loss weight
    c.bct.advbct_adv_weight = 4.0  # adversarial loss weight, decayed by (E - e + 1) / E
    c.bct.advbct_hidden = 100  # discriminator hidden width

    c.old = ml_collections.ConfigDict()  # precomputed arrays of the old model (python -m mixbct_jax.extract/prepare)
    c.old.features = ""  # features.npy [N, D], row i = example index i of this run's training subset
    c.old.labels = ""  # labels.npy written by extract; checked against the source when given
    c.old.credible = ""  # credible.npy bool [N] (MixBCT)
    c.old.prototypes = ""  # class means [C, D] (BCT, UniBCT)
    c.old.advbct_meta = ""  # advbct meta .npz (AdvBCT)
    c.old.workdir = ""  # the old model's run directory (UniBCT refinement, periodic cross evaluation)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.asynchronous = True

    c.log_every_steps = 50
    c.evals = ml_collections.ConfigDict()
    c.evals.every_steps = 0  # 0: only at the end when any protocol is set
    c.evals.retrieval = ""  # a source spec whose held-out part is used for retrieval (empty: off)
    c.evals.bin = ""  # comma-separated .bin verification files
    c.evals.batch_size = 256
    return c


METHOD_PRESETS = ("mixbct", "none", "l2", "weakened_l2", "bct", "unibct", "nccl", "advbct")


def apply_method(c: ml_collections.ConfigDict, method: str) -> None:
    """Sets ``c.bct`` and the schedule for ``method`` as the reference's configs do (SPEC §7.3).

    ``weakened_l2`` is the L2 method with threshold 0.2; BCT keeps the reference's ``warmup_epoch = -1`` quirk
    (its learning rate starts at 0.1 * (35/36)^2); UniBCT uses StepLR at epochs 20/26/32.
    """
    if method not in METHOD_PRESETS:
        raise ValueError(f"method={method!r}: choose one of {METHOD_PRESETS}")
    c.bct.method = "l2" if method == "weakened_l2" else method
    if method in ("l2", "weakened_l2"):
        c.bct.l2_weight = 10.0
        c.bct.l2_threshold = 0.2 if method == "weakened_l2" else 0.0
    if method == "bct":
        c.optim.warmup_epochs = -1.0
    if method == "unibct":
        c.optim.schedule = "step"
        c.optim.decay_epochs = (20, 26, 32)


def load(path: str | os.PathLike, arg: str | None = None,
         overrides: dict[str, object] | None = None) -> ml_collections.ConfigDict:
    """Loads ``get_config(arg)`` from a config file and applies dotted ``overrides`` (``{"optim.lr": 0.05}``).

    What ``--config path:arg --config.optim.lr=0.05`` does on the command line, for notebooks, tests and the demo.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist (configs live in the repository's configs/)")
    spec = importlib.util.spec_from_file_location(f"mixbct_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    with config.unlocked():
        for dotted, value in (overrides or {}).items():
            *parents, leaf = dotted.split(".")
            node = config
            for name in parents:
                node = node[name]
            if leaf not in node:
                raise KeyError(f"override {dotted!r}: {leaf!r} is not a field of {path.name}'s config")
            node[leaf] = value
    return config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses a config argument ``"k1=v1,k2=v2"`` (or bare flags ``"runlocal"`` = True) over ``defaults``."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in out:
            raise ValueError(f"config argument {key!r} is unknown; known: {sorted(out.keys())}")
        if not _:
            out[key] = True
            continue
        kind = type(out[key])
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out
