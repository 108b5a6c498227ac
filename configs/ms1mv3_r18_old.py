r"""The paper's old models: IResNet-18 on the old side of an MS1MV3 split (docs/methods.md (settings per method)).

  python -m mixbct_jax.train --config configs/ms1mv3_r18_old.py:loss=arc,dim=512,split=class30 \
      --workdir runs/f512_r18_arc_class30 --config.data.source=rec:/data/ms1m-retinaface-t1/train

Arguments: loss=arc (ArcFace s=64 m=0.5 on sharded centres) | softmax (plain linear + CE);
dim=128|256|512; split=class30 (28,029 classes, 1,581,241 images; scenarios OPclass/EXclass) | data30 (all
93,431 classes, 1,554,138 images; OPdata/EXdata). The reference recipes: f512 arc class30/data30, softmax
f128/f256 class30, f128/f512 data30.

Recipe (as the reference): global batch 1024 (128 x 8 GPUs), SGD 0.1 momentum 0.9, wd 5e-4, clip 5, poly^2
decay over 35 epochs, no warm-up, fp32 backbone. Data: insightface's MS1MV3 release (train.rec/.idx); see
docs/data.md. Hardware: 8 GPUs (or a TPU slice); not run by this project yet — no result to report.
"""

from mixbct_jax import config as config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, loss="arc", dim=512, split="class30")
    if args.loss not in ("arc", "softmax") or args.split not in ("class30", "data30"):
        raise ValueError(f"ms1mv3_r18_old: loss must be arc|softmax and split class30|data30, got {arg!r}")
    c = config_lib.default_config()
    c.model.arch = "r18"
    c.model.embedding_size = args.dim
    c.data.source = "rec:/data/ms1m-retinaface-t1/train"
    c.data.scenario = "opclass" if args.split == "class30" else "opdata"
    c.data.role = "old"
    c.head.type = "arcface" if args.loss == "arc" else "softmax"
    c.checkpoint.every_steps = 5000
    return c.lock()
