r"""Quickstart: the whole workflow on the embedded synthetic identities, on a laptop CPU in minutes.

Old model (no compatibility term) on the old side of the open-class split (30% of the identities):

  python -m mixbct_jax.train --config configs/quickstart.py --workdir runs/quickstart/old

New model with MixBCT on all the new side's identities, mixing in the old model's denoised embeddings
(extracted with python -m mixbct_jax.extract, denoised with python -m mixbct_jax.prepare denoise):

  python -m mixbct_jax.train --config configs/quickstart.py:role=new,method=mixbct \
      --workdir runs/quickstart/new --config.old.features=runs/quickstart/old/emb/features.npy \
      --config.old.credible=runs/quickstart/old/emb/credible.npy

`make demo` runs exactly these stages (see the Makefile). Arguments (comma-separated k=v):
  role=old|new, method=none|mixbct|l2|weakened_l2|bct|unibct|nccl|advbct (each with its preset,
  docs/methods.md (settings per method)), scenario=opclass|opdata|exclass|exdata|full, steps=N,
  runlocal (an even smaller run for tests: a few steps).

Data: `synthetic:num_classes=96,...` (mixbct_jax/data/synthetic.py), 32x32 RGB, nothing downloaded.
Model: IResNet with one block per stage ("r_tiny") at width 0.25, D=64, global batch 64.
Hardware and time: 2-core CPU, about a minute per model (see docs/benchmarks.md for the demo's figures).
"""

from mixbct_jax import config as config_lib

SYNTHETIC = "synthetic:num_classes=96,min_images=16,max_images=32,image_size=32,seed=0"


def get_config(arg=None):
    args = config_lib.parse_arg(arg, role="old", method="none", scenario="opclass", steps=300, runlocal=False)
    c = config_lib.default_config()
    c.seed = 0
    c.model.arch = "r_tiny"
    c.model.width = 0.25
    c.model.embedding_size = 64
    c.model.input_size = 32
    c.data.source = SYNTHETIC
    c.data.scenario = args.scenario
    c.data.role = args.role
    c.data.global_batch = 64
    c.optim.lr = 0.1
    c.total_steps = args.steps
    config_lib.apply_method(c, args.method)  # the method's preset, as in ms1mv3_r18_to_r50.py
    c.head.scale = 32.0  # 64 is tuned for 93k classes; with ~100 classes a smaller scale trains faster
    c.checkpoint.every_steps = 100
    c.log_every_steps = 25
    c.evals.batch_size = 128
    if args.runlocal:
        c.total_steps = 6
        c.data.global_batch = 32
        c.checkpoint.every_steps = 3
        c.log_every_steps = 2
    return c.lock()
