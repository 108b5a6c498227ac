"""Every field a run reads, with the reference's defaults. Config files start from ``default_config()``.

Configs are data: ``configs/<name>.py`` defines ``get_config(arg=None)``, overrides what its recipe changes and
returns the config locked, so a misspelt ``--config.optim.lrr=...`` is an error. Epochs are resolved into steps
once by the trainer and never written back.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    from mixbct_jax import bct

    c = ml_collections.ConfigDict()
    c.seed = 0  # initialisation, data order, flips and every random choice of the step
    c.parallel = "shard_map"  # or "pmap": the same per-device body under jax.pmap
    c.num_devices = -1  # -1: every device; N: the first N (one process only)
    c.total_steps = -1  # > 0 overrides optim.num_epochs
    c.resume_allow = ""  # fields a resume may change on purpose, comma-separated ("*": all); docs/reliability.md
    c.max_consecutive_nonfinite = 20  # stop after this many skipped (non-finite) steps in a row, before any save

    c.model = ml_collections.ConfigDict()
    c.model.arch = "r50"  # r18 r34 r50 r100 r200 mbf mbf_large vit_t vit_s vit_b vit_l (models.ARCHS)
    c.model.embedding_size = 512  # D, the embedding size (old and new models must agree for every method)
    c.model.input_size = 112  # image side in pixels; the source's images must have it (or add ',size=N')
    c.model.width = 1.0  # stage-width multiplier (tiny test models)
    c.model.dtype = "float32"  # "bfloat16": bf16 compute, fp32 parameters
    c.model.patch_size = 0  # ViTs: patch side; 0 = the variant's own (9 on 112x112 -> 144 tokens)
    c.model.remat = "auto"  # ViTs: jax.checkpoint per block; auto = on for the 24-block variants | on | off
    c.model.num_classes = -1  # -1: the training subset's class count

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # rec:<prefix> | tfds:<name>[:split] | folder:<dir> | npz:<file> | synthetic[:k=v,..]
    c.data.scenario = "full"  # full | opclass | opdata | exclass | exdata (docs/data.md (scenarios))
    c.data.role = "old"  # which side of the scenario this run trains on: old | new
    c.data.split_ratio = 0.3  # the old side's share of the classes (opclass/exclass) or images (opdata/exdata)
    c.data.global_batch = 1024  # 128 per GPU x 8 in the reference
    c.data.flip = True  # random horizontal flip with p = 0.5 (stateless: a hash of seed, epoch and example)
    c.data.threads = -1  # input worker processes (Grain); 0 = decode in the trainer; -1 = auto (docs/data.md)

    c.head = ml_collections.ConfigDict()
    c.head.type = "arcface"  # arcface | cosface | combined | softmax
    c.head.scale = 64.0  # s, the logit scale of the margin heads
    c.head.margins = (1.0, 0.5, 0.0)  # (m1, m2, m3): ArcFace uses m2, CosFace m3
    c.head.sample_rate = 1.0  # PartialFC sampling of the class centres
    c.head.interclass_filtering_threshold = 0.0  # > 0: drop negative logits above this cosine (PartialFC)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 0.1  # peak learning rate of SGD
    c.optim.momentum = 0.9  # SGD momentum
    c.optim.weight_decay = 5e-4  # coupled weight decay (added to the gradient, as torch.optim.SGD)
    c.optim.clip_norm = 5.0  # global-norm gradient clip of the backbone only (0: off)
    c.optim.num_epochs = 35  # training length in epochs (total_steps > 0 overrides it)
    c.optim.schedule = "poly"  # poly | step
    c.optim.power = 2.0  # exponent of the polynomial decay
    c.optim.warmup_epochs = 0.0  # linear warm-up; -1 reproduces BCT's off-by-one quirk (docs/methods.md)
    c.optim.decay_epochs = (20, 26, 32)  # for schedule == "step" (UniBCT)

    c.bct = ml_collections.ConfigDict()  # docs/methods.md explains every field and each reference quirk
    c.bct.method = "none"  # the method, a module of mixbct_jax/bct/: none mixbct l2 bct unibct nccl advbct ...
    for field in bct.config_fields():  # each method's own fields, declared in its module (bct.api.Field)
        c.bct[field.name] = field.default

    c.old = ml_collections.ConfigDict()  # precomputed arrays of the old model (python -m mixbct_jax.extract/prepare)
    c.old.features = ""  # features.npy [N, D], row i = example index i of this run's training subset
    c.old.labels = ""  # labels.npy written by extract; checked against the source when given
    c.old.credible = ""  # credible.npy bool [N] (MixBCT)
    c.old.workdir = ""  # the old model's run directory (UniBCT refinement, periodic cross evaluation)
    c.old.finite_check = "full"  # NaN/Inf check of old.features: "full" (every row, streamed) | "sampled"
    for class_file in bct.class_files():  # per-class files a method reads (bct.api.ClassFile)
        c.old[class_file.field] = ""

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000  # save every N steps (and at the end)
    c.checkpoint.keep = 3  # how many recent checkpoints to keep
    c.checkpoint.asynchronous = True  # write checkpoints in the background while training goes on

    c.log_every_steps = 50  # progress line and metrics.jsonl record every N steps
    c.tensorboard = True  # also write TensorBoard event files to <workdir>/tensorboard (tensorboardX, no TF)
    c.evals = ml_collections.ConfigDict()
    c.evals.every_steps = 0  # 0: only at the end when any protocol is set
    c.evals.retrieval = ""  # a source spec whose held-out part is used for retrieval (empty: off)
    c.evals.bin = ""  # comma-separated .bin verification files
    c.evals.batch_size = 256  # embedding batch size of the evaluations
    return c


def apply_method(c: ml_collections.ConfigDict, method: str) -> None:
    """Sets ``c.bct.method`` and the method's preset (its ``bct.api.Method.presets``).

    The preset holds the reference's settings for the method (docs/methods.md (settings per method)).

    ``method`` is a preset name: a method's name, or another preset of a method (``weakened_l2``: the L2 method
    with threshold 0.2). BCT keeps the reference's ``warmup_epoch = -1`` quirk (its learning rate starts at
    0.1 * (35/36)^2); UniBCT uses StepLR at epochs 20/26/32.
    """
    from mixbct_jax import bct

    presets = bct.presets()
    if method not in presets:
        raise ValueError(f"method={method!r}: choose one of {tuple(presets)}")
    c.bct.method = presets[method].name
    for dotted, value in presets[method].presets[method].items():
        section, field = dotted.rsplit(".", 1)
        _get(c, section)[field] = value


def configs_dir() -> pathlib.Path:
    """The folder of the shipped config files: the checkout's ``configs/``, or the installed package's copy."""
    checkout = pathlib.Path(__file__).resolve().parents[1] / "configs"
    if (checkout / "quickstart.py").is_file():
        return checkout
    try:  # a wheel install: pyproject.toml maps configs/ to the package mixbct_jax.configs
        from importlib import resources

        return pathlib.Path(str(resources.files("mixbct_jax.configs")))
    except ModuleNotFoundError:  # pragma: no cover - a broken install
        return checkout


def shipped_configs() -> list[str]:
    """Names of the shipped configs (``quickstart``, ``ms1mv3_r18_old``, ...), usable wherever a path is."""
    return sorted(p.stem for p in configs_dir().glob("*.py") if not p.name.startswith("_"))


def resolve(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A config file path from a path, or from the name of a shipped config (``quickstart``, ``quickstart.py``).

    Raises:
      FileNotFoundError: neither an existing file nor a shipped config's name; the message lists the names.
    """
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    if len(path.parts) == 1 or path.parent.name == "configs":
        shipped = configs_dir() / (path.name if path.suffix == ".py" else f"{path.name}.py")
        if shipped.is_file():
            return shipped
    raise FileNotFoundError(
        f"config {str(name_or_path)!r} is neither a file nor a shipped config; use a path to a "
        f"configs/<name>.py file or one of the names {shipped_configs()}"
    )


def resolve_argv(argv: list[str], flag: str = "config") -> list[str]:
    """Rewrites ``--config NAME[:arg]`` in a command line to the shipped config's path, so absl can load it.

    A value that is already a file path is left alone; an unknown name raises the error of :func:`resolve`.
    """
    out = list(argv)
    for i, item in enumerate(out):
        if item in (f"--{flag}", f"-{flag}") and i + 1 < len(out):
            j, value, prefix = i + 1, out[i + 1], ""
        elif item.startswith((f"--{flag}=", f"-{flag}=")):
            j, (prefix, value) = i, item.split("=", 1)
            prefix += "="
        else:
            continue
        name, colon, arg = value.partition(":")
        out[j] = prefix + str(resolve(name)) + colon + arg
        break
    return out


def load(
    path: str | os.PathLike, arg: str | None = None, overrides: dict[str, object] | None = None
) -> ml_collections.ConfigDict:
    """Loads ``get_config(arg)`` from a config file and applies dotted ``overrides`` (``{"optim.lr": 0.05}``).

    What ``--config path:arg --config.optim.lr=0.05`` does on the command line, for notebooks, tests and the demo.
    ``path`` may also name a shipped config (``"quickstart"``).
    """
    path = resolve(path)
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


class ConfigError(ValueError):
    """A config value that cannot run; the message names the field, the value and the fix."""


_CHOICES = {
    "parallel": ("shard_map", "pmap"),
    "model.dtype": ("float32", "bfloat16"),
    "data.scenario": ("full", "opclass", "opdata", "exclass", "exdata"),
    "data.role": ("old", "new"),
    "head.type": ("arcface", "cosface", "combined", "softmax"),
    "optim.schedule": ("poly", "step"),
    "old.finite_check": ("full", "sampled"),
}
# (field, low, high, low inclusive, high inclusive); None = unbounded.
_RANGES = (
    ("model.embedding_size", 1, None, True, None),
    ("model.input_size", 8, None, True, None),
    ("model.width", 0, None, False, None),
    ("data.split_ratio", 0, 1, False, False),
    ("data.global_batch", 1, None, True, None),
    ("head.scale", 0, None, False, None),
    ("head.sample_rate", 0, 1, False, True),
    ("head.interclass_filtering_threshold", 0, 1, True, True),
    ("optim.lr", 0, None, False, None),
    ("optim.momentum", 0, 1, True, False),
    ("optim.weight_decay", 0, None, True, None),
    ("optim.clip_norm", 0, None, True, None),
    ("optim.power", 0, None, True, None),
    ("checkpoint.every_steps", 1, None, True, None),
    ("checkpoint.keep", 1, None, True, None),
    ("log_every_steps", 1, None, True, None),
    ("evals.every_steps", 0, None, True, None),
    ("evals.batch_size", 1, None, True, None),
    ("max_consecutive_nonfinite", 1, None, True, None),
)


def _get(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for name in dotted.split("."):
        node = node[name]
    return node


def _interval(low, high, low_in, high_in) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every value the trainer reads before anything is built or compiled.

    Raises:
      ConfigError: one line, ``config.<field>=<value>: <what is wrong>; <the fix>``.
    """
    import math

    from mixbct_jax import bct, models

    def fail(field: str, why: str) -> None:
        raise ConfigError(f"config.{field}={_get(config, field)!r}: {why}; set --config.{field}=... accordingly")

    fields = bct.config_fields()
    choices_of = {**_CHOICES, **{f"bct.{f.name}": f.choices for f in fields if f.choices}}
    for field, choices in choices_of.items():
        if _get(config, field) not in choices:
            fail(field, f"choose one of {choices}")
    if config.model.arch not in models.ARCHS:
        fail("model.arch", f"choose one of {sorted(models.ARCHS)}")
    if config.bct.method not in bct.METHODS:
        fail("bct.method", f"choose one of {bct.METHODS}")
    for field, low, high, low_in, high_in in _RANGES + tuple(
        (f"bct.{f.name}", *f.interval) for f in fields if f.interval is not None
    ):
        value = _get(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(field, "must be a finite number")
        if (
            value < low
            or (value == low and not low_in)
            or (high is not None and (value > high or (value == high and not high_in)))
        ):
            fail(field, f"must be {_interval(low, high, low_in, high_in)}")
    for field in ("seed", "total_steps", "num_devices", "model.num_classes"):
        if isinstance(_get(config, field), bool) or not isinstance(_get(config, field), int):
            fail(field, "must be an integer")
    if config.total_steps == 0 or config.total_steps < -1:
        fail("total_steps", "must be > 0, or -1 to train optim.num_epochs")
    if config.total_steps == -1 and not config.optim.num_epochs > 0:
        fail("optim.num_epochs", "must be > 0 when total_steps is -1")
    if config.num_devices == 0 or config.num_devices < -1:
        fail("num_devices", "must be >= 1, or -1 for every device")
    if config.model.num_classes == 0 or config.model.num_classes < -1:
        fail("model.num_classes", "must be >= 1, or -1 for the training subset's class count")
    if len(tuple(config.head.margins)) != 3:
        fail("head.margins", "must be three numbers (m1, m2, m3)")
    epochs = list(config.optim.decay_epochs)
    if config.optim.schedule == "step" and (not epochs or epochs != sorted(epochs)):
        fail("optim.decay_epochs", "must be increasing epochs for the step schedule")
    if config.num_devices > 0 and config.data.global_batch % config.num_devices:
        fail("data.global_batch", f"must be divisible by config.num_devices={config.num_devices}")
    method = bct.get(config.bct.method)
    for field, why in method.check(config) if method.check is not None else ():
        fail(field, why)
    if not isinstance(config.resume_allow, str):
        fail("resume_allow", "must be a comma-separated list of config fields")


_FIELD_LINE = re.compile(r"^\s*c\.([\w.]+)\s*=\s*(.*?)\s*#\s*(.*)$")


def field_docs() -> dict[str, str]:
    """One line of meaning per field.

    Read from the comments of :func:`default_config` (the single place they are written) and, for a method's
    fields, from its module (``bct.api.Field``).
    """
    import inspect

    from mixbct_jax import bct

    docs: dict[str, str] = {}
    for line in inspect.getsource(default_config).splitlines():
        match = _FIELD_LINE.match(line)
        if match and "ConfigDict()" not in match.group(2):
            docs[match.group(1)] = match.group(3)
    docs.update({f"bct.{f.name}": f.doc for f in bct.config_fields()})  # declared in the methods' modules
    docs.update({f"old.{f.field}": f.doc for f in bct.class_files()})
    return docs


def describe(config: ml_collections.ConfigDict) -> str:
    """Every field of ``config`` (sorted) as ``name = value  # meaning``."""
    docs = field_docs()
    flat: list[tuple[str, object]] = []

    def walk(node, prefix: str) -> None:
        for key in node.keys():
            value = node[key]
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}{key}.")
            else:
                flat.append((f"{prefix}{key}", value))

    walk(config, "")
    width = min(48, max(len(f"{k} = {v!r}") for k, v in flat))
    return "\n".join(f"{k} = {v!r}".ljust(width) + (f"  # {docs[k]}" if k in docs else "") for k, v in flat)


def main(argv: list[str] | None = None) -> None:
    """``python -m mixbct_jax.config --show quickstart[:arg]``: a config's arguments, then every field."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m mixbct_jax.config",
        description="Show a config: its file's documentation (the command, its arguments, the data and hardware) "
        f"and every field with its value and meaning. Shipped configs: {', '.join(shipped_configs())}.",
    )
    parser.add_argument(
        "--show",
        metavar="CONFIG[:ARG]",
        required=True,
        help="a shipped config's name or a configs/<name>.py path, with its argument after ':'",
    )
    args = parser.parse_args(argv)
    name, _, arg = args.show.partition(":")
    try:
        path = resolve(name)
        config = load(path, arg or None)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: --show {args.show}: {e}", file=sys.stderr)
        sys.exit(2)
    spec = importlib.util.spec_from_file_location(f"mixbct_config_doc_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(f"# {path}{':' + arg if arg else ''}\n")
    print((module.__doc__ or "").strip() + "\n")
    print("# Fields (override any with --config.<field>=<value> on the train command line)")
    print(describe(config))


if __name__ == "__main__":
    main()
