"""The paper's new models: IResNet-50 trained with MixBCT against an r18 old model (SPEC §4.6, §7.3).

  python -m mixbct_jax.train --config configs/ms1mv3_r18_to_r50_mixbct.py:scenario=opclass,old=arc,dim=512 \
      --workdir runs/OPclass_r18_to_r50_mixbct_arc_to_arc_f512 \
      --config.data.source=rec:/data/ms1m-retinaface-t1/train \
      --config.old.features=runs/f512_r18_arc_class30/emb_class70/features.npy \
      --config.old.credible=runs/f512_r18_arc_class30/emb_class70/credible.npy

Arguments: scenario=opclass|opdata|exclass|exdata (the new model trains on class70/data70/full/full, SPEC §1.6);
old=arc|softmax (the old model's loss; only the file paths differ); dim=128|256|512; method=mixbct by default,
method=none gives the new model's upper bound without compatibility ("f*_r50_arc_data100" with scenario=exdata).

The old embeddings: `python -m mixbct_jax.extract --workdir <old run> --data <source> --scenario <scenario>
--role new --out <dir>` then `python -m mixbct_jax.prepare denoise --keep 0.9` (docs/data.md).
Recipe: global batch 1024, ArcFace s=64 m=0.5 with sharded centres, SGD 0.1, poly^2 over 35 epochs, mix ratio
0.3 (38 of every 128 local rows), fp32 backbone. Deviation: OPclass uses the 65,402 class70 classes, not the
reference's 93,431 (docs/deviations.md). Hardware: 8 GPUs; not run by this project yet — no result to report.
"""

from mixbct_jax import config as config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, scenario="opclass", old="arc", dim=512, method="mixbct")
    if args.scenario not in ("opclass", "opdata", "exclass", "exdata") or args.old not in ("arc", "softmax"):
        raise ValueError(f"ms1mv3_r18_to_r50_mixbct: bad argument {arg!r}")
    c = config_lib.default_config()
    c.model.arch = "r50"
    c.model.embedding_size = args.dim
    c.data.source = "rec:/data/ms1m-retinaface-t1/train"
    c.data.scenario = args.scenario
    c.data.role = "new"
    c.bct.method = args.method
    c.bct.mix_ratio = 0.3
    split = {"opclass": "class30", "opdata": "data30", "exclass": "class30", "exdata": "data30"}[args.scenario]
    c.old.workdir = f"runs/f{args.dim}_r18_{args.old}_{split}"
    c.checkpoint.every_steps = 5000
    return c.lock()
