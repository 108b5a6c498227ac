"""Quickstart with a tiny Vision Transformer: configs/quickstart.py's workflow with ``model.arch=vit_tiny``.

  python -m mixbct_jax.train --config configs/quickstart_vit.py --workdir runs/quickstart_vit/old
  python -m mixbct_jax.extract --workdir runs/quickstart_vit/old --out runs/quickstart_vit/old/emb
  python -m mixbct_jax.evaluate --new runs/quickstart_vit/old --protocol retrieval \
      --data synthetic:num_classes=96,min_images=16,max_images=32,image_size=32,seed=0 --out runs/quickstart_vit/eval

The new model (MixBCT) is trained as in configs/quickstart.py, with this file and ``role=new,method=mixbct``.

Arguments (comma-separated k=v): those of configs/quickstart.py (role, method, scenario, steps, runlocal) and
  arch=vit_tiny (default; two blocks of width 64) or any ViT of models.ARCHS (vit_t, vit_s, ...: slow on a CPU),
  patch=4 (patch side; 32x32 inputs -> an 8x8 grid of 64 tokens; the insightface models use 9 on 112x112).

Data: the same 32x32 synthetic identities as configs/quickstart.py. Model: ViT (token masking 0.1 and drop path
0.1 in training only), D=64, float32, global batch 64, SGD as the reference's recipe (lr 0.1, clip 5).
Hardware and time: 2-core CPU, a few minutes for 300 steps (docs/benchmarks.md).
"""

import pathlib

from mixbct_jax import config as config_lib

_QUICKSTART = pathlib.Path(__file__).with_name("quickstart.py")


def get_config(arg=None):
    own = {"arch": "vit_tiny", "patch": 4}
    passed = []
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key in own:
            own[key] = type(own[key])(value)
        else:
            passed.append(item)
    if not own["arch"].startswith("vit"):
        raise ValueError(
            f"quickstart_vit: arch={own['arch']!r} is not a ViT; use configs/quickstart.py for the other backbones"
        )
    c = config_lib.load(_QUICKSTART, ",".join(passed))
    with c.unlocked():
        c.model.arch = own["arch"]
        c.model.width = 1.0
        c.model.patch_size = own["patch"]
    return c.lock()
