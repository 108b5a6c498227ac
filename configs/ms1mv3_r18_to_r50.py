r"""The paper's new models: IResNet-50 trained against an r18 old model with MixBCT or a baseline (docs/methods.md).

  python -m mixbct_jax.train \
      --config configs/ms1mv3_r18_to_r50.py:method=mixbct,scenario=opclass,old=arc,dim=512 \
      --workdir runs/OPclass_r18_to_r50_mixbct_arc_to_arc_f512 \
      --config.data.source=rec:/data/ms1m-retinaface-t1/train \
      --config.old.features=runs/f512_r18_arc_class30/emb_class70/features.npy \
      --config.old.credible=runs/f512_r18_arc_class30/emb_class70/credible.npy

  # The same with a ViT-S new model in bf16 (TPU or GPU):
  python -m mixbct_jax.train \
      --config configs/ms1mv3_r18_to_r50.py:method=mixbct,scenario=opclass,new_arch=vit_s \
      --config.model.dtype=bfloat16 --workdir runs/OPclass_r18_to_vit_s_mixbct_arc_to_arc_f512 ...

Arguments (comma-separated k=v):
  method=mixbct (default) | none (the new model's upper bound without compatibility; with scenario=exdata it
         is the reference's f*_r50_arc_data100) | l2 | weakened_l2 | bct | unibct | nccl | advbct;
  scenario=opclass|opdata|exclass|exdata (the new model trains on class70/data70/full/full, docs/data.md (scenarios));
  old=arc|softmax (the old model's loss; only the suggested old run directory differs); dim=128|256|512.

Per method, the arrays it needs (docs/methods.md; all from `python -m mixbct_jax.extract` on the new model's
training set, then `python -m mixbct_jax.prepare`):
  mixbct: --config.old.features, --config.old.credible (prepare denoise --keep 0.9)
  l2 / weakened_l2 / nccl: --config.old.features
  bct / unibct: --config.old.features and --config.old.prototypes (prepare class-means)
  advbct: --config.old.features and --config.old.advbct_meta (prepare advbct-meta)

New backbone: new_arch=r50 (default, the paper's) or any backbone of mixbct_jax.models.ARCHS, e.g. a ViT
(new_arch=vit_s; vit_t, vit_b, vit_l): insightface's ViT (the reference MixBCT code's backbones/vit.py: patch 9 on
112x112, token masking and drop path in training only), embedding size D as the old model's. TPU/GPU settings for a ViT
new model (override on the command line): --config.model.dtype=bfloat16 (bf16 matmuls, fp32 parameters, attention
softmax, LayerNorms and head in fp32); --config.model.remat=on|off|auto (jax.checkpoint per block; auto = on for the
24-block vit_b/vit_l, trading about 1/3 more compute for activation memory); --config.data.global_batch (a multiple of
the device count; by our estimate, not a measurement, vit_s keeps ~50 MB of bf16 activations per 112x112 image, so 128
per device fits a 16 GiB TPU core or GPU without remat, while vit_b/vit_l need remat or a smaller batch). The optimizer
stays the paper's SGD recipe below (insightface trains its ViTs with AdamW, which this project does not implement), so a
ViT new model is an experiment, not a reproduced result.

Recipe (as the reference): global batch 1024 (128 x 8), ArcFace s=64 m=0.5 with sharded centres, SGD 0.1
momentum 0.9 wd 5e-4, clip 5, poly^2 over 35 epochs (BCT: warm-up -1 quirk, start lr 0.0945; UniBCT: StepLR at
epochs 20/26/32), mix ratio 0.3 (38 of every 128 local rows), fp32 backbone. Deviation: OPclass uses the 65,402
class70 classes, not the reference's 93,431 (docs/deviations.md). Hardware: 8 GPUs; not run by this project at
this scale yet — no result to report.
"""

from mixbct_jax import config as config_lib

_OLD_SPLIT = {"opclass": "class30", "opdata": "data30", "exclass": "class30", "exdata": "data30"}


def get_config(arg=None):
    args = config_lib.parse_arg(arg, scenario="opclass", old="arc", dim=512, method="mixbct", new_arch="r50")
    if args.scenario not in _OLD_SPLIT or args.old not in ("arc", "softmax"):
        raise ValueError(
            f"ms1mv3_r18_to_r50: scenario must be one of {sorted(_OLD_SPLIT)} and old arc|softmax, got {arg!r}"
        )
    c = config_lib.default_config()
    c.model.arch = args.new_arch
    c.model.embedding_size = args.dim
    c.data.source = "rec:/data/ms1m-retinaface-t1/train"
    c.data.scenario = args.scenario
    c.data.role = "new"
    c.bct.mix_ratio = 0.3
    config_lib.apply_method(c, args.method)
    c.old.workdir = f"runs/f{args.dim}_r18_{args.old}_{_OLD_SPLIT[args.scenario]}"
    c.checkpoint.every_steps = 5000
    return c.lock()
