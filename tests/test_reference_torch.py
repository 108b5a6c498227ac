"""The JAX train step against an independent PyTorch statement of the reference's training step.

The PyTorch side is written from SPEC's description of the reference (IResNet §2.1; PartialFC and the distributed
cross-entropy with sample rate 1 §3.2; the combined/ArcFace margin §3.1; SGD with momentum 0.9, coupled weight
decay and a backbone-only global-norm clip §3.4; the poly schedule §3.5; MixBCT §4.6, L2 §4.1, BCT §4.2), not from
the JAX code. It simulates W ranks in one process the way the reference's processes interact:

* rank r runs the backbone on its own chunk of the batch (per-rank BatchNorm statistics) and, for MixBCT, replaces
  ``int(b * alpha)`` credible rows of its embeddings in place by the old embeddings (``random.sample`` over the
  credible rows; each rank gets exactly that many credible rows, so the choice is the whole set);
* the embeddings are all-gathered; rank r owns the class rows ``[start_r, start_r + C//W + (r < C%W))`` as its own
  parameter and computes logits against them; the softmax max and sum are reduced over ranks; the backward of the
  local logits is ``(p - onehot) / N`` (the reference's DistCrossEntropy);
* the all-gather backward sums each chunk's gradient over the ranks and multiplies it by W; each rank backpropagates
  its chunk (plus its local method loss) into its own copy of the backbone gradients, and DDP averages them;
* clip the backbone gradients to global norm 5, then one ``torch.optim.SGD`` step over two parameter groups.

Both sides start from the same weights (the JAX initial state exported with ``convert.flax_to_torch``), the same
batches and the same old embeddings; losses and every trainable parameter (backbone and class centres) are compared
after 1 and 3 steps, on 1 and 4 devices: the JAX step in float32 must be within relative 1e-4 of the reference.

The PyTorch reference runs in float64, so the tolerance measures the JAX step's error alone. (The same PyTorch code
in float32 drifts from its own float64 run by up to ~2e-4 after 3 steps here, since ArcFace's s = 64 on a fresh
model gives losses of 50-70 and clipped updates; the JAX float32 step stays within ~1e-5 of it.)
"""

from __future__ import annotations

import functools
import random

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from mixbct_jax import config as config_lib
from mixbct_jax import convert
from mixbct_jax import step as step_lib
from mixbct_jax.heads import sharded_fc

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

from test_convert import TorchIResNet  # noqa: E402  (the PyTorch IResNet written once for the tests)

C, D, SIZE, WIDTH, N = 10, 16, 32, 0.125, 32
STEPS, STEPS_PER_EPOCH, NUM_EPOCHS = 3, 4, 5
RTOL = 1e-4


def tiny_iresnet() -> tnn.Module:
    """The PyTorch IResNet of tests/test_convert.py (insightface module names), one strided block per stage."""
    return TorchIResNet((1, 1, 1, 1), D, widths=(8, 16, 32, 64), input_size=SIZE)


# ---------------------------------------------------------------------------------------------------------------
# The reference's step on W simulated ranks
# ---------------------------------------------------------------------------------------------------------------
def arcface(cos, target_col, s=64.0, m=0.5):
    """docs/methods.md (the margin head): target cosine -> cos(theta + m), or c - sin(pi - m) m past cos(pi - m).

    All logits x s.
    """
    rows = torch.nonzero(target_col >= 0).flatten()
    out = cos.clone()
    c = cos[rows, target_col[rows]]
    margined = torch.where(
        c > np.cos(np.pi - m), c * np.cos(m) - torch.sqrt(1 - c * c) * np.sin(m), c - np.sin(np.pi - m) * m
    )
    out[rows, target_col[rows]] = margined
    return out * s


def poly_lr(t, *, base=0.1, warmup, total, power=2):
    """docs/methods.md (schedules)'s PolyScheduler at counter t (a negative warm-up never takes the warm-up branch)."""
    if t < warmup:
        return base * t / warmup
    return base * (1 - (t - warmup) / (total - warmup)) ** power


class ReferenceTrainer:
    def __init__(
        self,
        state_dict,
        centres,
        *,
        world,
        method,
        warmup_epochs=0,
        prototypes=None,
        mix_ratio=0.3,
        l2_weight=10.0,
        l2_threshold=0.0,
        dtype=torch.float32,
    ):
        self.dtype = dtype
        self.model = tiny_iresnet()
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
        self.model.to(dtype).train()
        self.world, self.method = world, method
        self.mix_ratio, self.l2_weight, self.l2_threshold = mix_ratio, l2_weight, l2_threshold
        self.prototypes = None if prototypes is None else torch.from_numpy(prototypes).to(dtype)
        sizes = [C // world + (r < C % world) for r in range(world)]
        self.starts = np.cumsum([0] + sizes[:-1]).tolist()
        full = torch.from_numpy(np.array(centres[:C])).to(dtype)
        self.shards = [tnn.Parameter(full[s : s + n].clone()) for s, n in zip(self.starts, sizes)]
        self.backbone = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(
            [{"params": self.backbone}, {"params": self.shards}], lr=0.1, momentum=0.9, weight_decay=5e-4
        )
        self.warmup = STEPS_PER_EPOCH * warmup_epochs
        self.total = STEPS_PER_EPOCH * NUM_EPOCHS
        self.t = 0

    def step(self, batch):
        """One optimizer step on the global batch; returns the loss (classification term without the 1e-30 cap)."""
        for group in self.opt.param_groups:
            group["lr"] = poly_lr(self.t, warmup=self.warmup, total=self.total)
        w, n = self.world, len(batch["label"])
        b = n // w
        images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).to(self.dtype).div(255).sub(0.5).div(0.5)
        labels = torch.from_numpy(batch["label"]).long()
        old = F.normalize(torch.from_numpy(batch["old_raw"]).to(self.dtype))  # old_feature = n(np.load(...))

        # Per rank: forward on the local chunk, then the method's transformation and local loss.
        embs, mixed, extra = [], [], []
        for r in range(w):
            sl = slice(r * b, (r + 1) * b)
            e = self.model(images[sl])  # [b, D], BatchNorm statistics of this rank's chunk
            embs.append(e)
            if self.method == "mixbct":
                cand = np.flatnonzero(batch["credible"][sl]).tolist()
                chosen = random.Random(r).sample(cand, int(b * self.mix_ratio))
                e = e.clone()
                e[chosen] = old[sl][chosen]  # in place on the graph: no gradient reaches the backbone there
            mixed.append(e)
            if self.method == "l2":
                dist = torch.norm(F.normalize(old[sl]) - F.normalize(embs[r]), dim=1)
                extra.append(self.l2_weight * torch.clamp(dist - self.l2_threshold, min=0).mean())
            elif self.method == "bct":
                extra.append(F.cross_entropy(F.normalize(embs[r]) @ self.prototypes.T, labels[sl]))
            else:
                extra.append(torch.zeros((), dtype=self.dtype))

        # PartialFC: gathered embeddings, per-rank logits, the softmax reduced over ranks.
        gathered = torch.cat([e.detach() for e in mixed])  # [N, D]
        copies, logits, target_cols = [], [], []
        for r in range(w):
            g = gathered.clone().requires_grad_(True)  # rank r's output of the all-gather
            local = labels - self.starts[r]
            target_col = torch.where((local >= 0) & (local < len(self.shards[r])), local, -1)
            cos = torch.clamp(F.linear(F.normalize(g), F.normalize(self.shards[r])), -1, 1)
            copies.append(g)
            logits.append(arcface(cos, target_col))
            target_cols.append(target_col)
        with torch.no_grad():
            top = torch.stack([x.max(dim=1).values for x in logits]).max(dim=0).values[:, None]  # all-reduce MAX
            total = sum(torch.exp(x - top).sum(dim=1, keepdim=True) for x in logits)  # all-reduce SUM
            probs = [torch.exp(x - top) / total for x in logits]
            p_target = torch.zeros(n, dtype=self.dtype)
            for p, tc in zip(probs, target_cols):
                rows = tc >= 0
                p_target[rows] += p[rows, tc[rows]]  # all-reduce SUM of each row's owning shard
            self.capped_loss = float(torch.mean(-torch.log(torch.clamp(p_target, min=1e-30))))  # what it logs
            # The same without the 1e-30 floor (docs/deviations.md 2(a)): log-sum-exp minus the target logit.
            target_logit = sum(
                torch.where(tc >= 0, x[torch.arange(n), tc.clamp(min=0)], torch.zeros((), dtype=self.dtype))
                for x, tc in zip(logits, target_cols)
            )
            cls_loss = torch.mean(torch.log(total[:, 0]) + top[:, 0] - target_logit)
        for x, p, tc in zip(logits, probs, target_cols):
            onehot = F.one_hot(torch.clamp(tc, min=0), p.shape[1]).to(p.dtype) * (tc >= 0).to(p.dtype)[:, None]
            x.backward((p - onehot) / n)  # DistCrossEntropy's backward on the local logits

        # All-gather backward (sum over ranks, x W), per-rank backbone gradients, DDP average.
        per_rank = []
        for r in range(w):
            sl = slice(r * b, (r + 1) * b)
            chunk_grad = sum(g.grad[sl] for g in copies) * w
            outputs, grads = [mixed[r]], [chunk_grad]
            if extra[r].requires_grad:
                outputs, grads = outputs + [extra[r]], grads + [torch.ones((), dtype=self.dtype)]
            per_rank.append(torch.autograd.grad(outputs, self.backbone, grads))
        for i, p in enumerate(self.backbone):
            p.grad = sum(g[i] for g in per_rank) / w
        torch.nn.utils.clip_grad_norm_(self.backbone, max_norm=5.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.t += 1
        return float(cls_loss) + float(sum(x.detach() for x in extra) / w)

    def trainable(self):
        """Trainable parameters by state-dict key, plus the class centres [C, D]."""
        named = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        out = {k: p.detach().numpy().astype(np.float32) for k, p in named.items()}
        out["centres"] = torch.cat([s.detach() for s in self.shards]).numpy().astype(np.float32)
        return out


# ---------------------------------------------------------------------------------------------------------------
# The JAX side: the project's real step on a mesh of W devices
# ---------------------------------------------------------------------------------------------------------------
def jax_config(method, warmup_epochs):
    c = config_lib.default_config()
    c.model.arch, c.model.embedding_size, c.model.input_size, c.model.width = "r_tiny", D, SIZE, WIDTH
    c.data.global_batch = N
    c.bct.method = method
    c.optim.warmup_epochs = float(warmup_epochs)
    return c


def jax_trainable(state):
    variables = {"params": state["params"]["backbone"], "batch_stats": state["batch_stats"]}
    torch_keys = convert.flax_to_torch(jax.tree.map(np.asarray, variables), "r_tiny", D, SIZE, WIDTH)
    out = {
        k: v
        for k, v in torch_keys.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")) and k != "features.weight"
    }
    out["centres"] = np.asarray(state["params"]["head"]["centres"])[:C]
    return out


@functools.cache
def initial_state(method, world, warmup_epochs):
    """The project's initial train state, as host arrays (computed under jit: op-by-op it takes far longer)."""
    par = build_step(method, world, warmup_epochs)
    return jax.tree.map(np.array, jax.jit(par.init_fn)(jax.random.key(0)))


def build_step(method, world, warmup_epochs):
    return step_lib.build(
        jax_config(method, warmup_epochs),
        num_classes=C,
        steps_per_epoch=STEPS_PER_EPOCH,
        total_steps=STEPS_PER_EPOCH * NUM_EPOCHS,
        mesh=Mesh(np.array(jax.devices()[:world]), ("data",)),
    )


def run_jax(method, world, batches, consts, warmup_epochs):
    initial = initial_state(method, world, warmup_epochs)
    state = jax.tree.map(jax.numpy.asarray, initial)
    par = build_step(method, world, warmup_epochs)
    module = par.method
    st, device_consts = par.to_device(state), par.consts_to_device(consts)
    losses, after = [], {}
    for i, batch in enumerate(batches):
        fed = {k: batch[k] for k in ("image", "label", "index")}
        fed.update({k: batch[k] for k in module.per_example})
        st, metrics = par.step(st, par.put_batch(fed), jax.random.key(1), device_consts)
        losses.append(float(metrics["loss"]))
        after[i + 1] = jax_trainable(par.from_device(st))
    return initial, losses, after


# ---------------------------------------------------------------------------------------------------------------
# Inputs and the comparison
# ---------------------------------------------------------------------------------------------------------------
def make_batches(world, seed=0):
    """STEPS global batches with old embeddings; each device's chunk has exactly int(b * 0.3) credible rows."""
    rng = np.random.RandomState(seed)
    b = N // world
    k = int(b * 0.3)
    batches = []
    for _ in range(STEPS):
        raw = rng.normal(size=(N, D)).astype(np.float32)
        credible = np.zeros(N, bool)
        for r in range(world):
            credible[r * b + rng.choice(b, k, replace=False)] = True
        batches.append(
            {
                "image": rng.randint(0, 256, (N, SIZE, SIZE, 3)).astype(np.uint8),
                "label": rng.randint(0, C, N).astype(np.int32),
                "index": np.arange(N, dtype=np.int32),
                "old_raw": raw,
                # What the trainer feeds (data.old_embeddings.batch_arrays): row-L2-normalised old embeddings.
                "old_features": raw / np.linalg.norm(raw, axis=1, keepdims=True),
                "credible": credible,
            }
        )
    return batches


def class_prototypes(seed=1):
    """BCT's synthesised old classifier: row-normalised class means of random old embeddings, padded rows zero."""
    rng = np.random.RandomState(seed)
    feats, labels = rng.normal(size=(8 * C, D)), np.repeat(np.arange(C), 8)
    means = np.stack([feats[labels == c].mean(axis=0) for c in range(C)])
    return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)


def zero_gradient(key):
    """Biases whose output goes straight into a train-mode BatchNorm, which removes any per-channel constant.

    They are a block's ``bn3`` and shortcut BN biases (the sum feeds the next block's ``bn1`` or the head's ``bn2``) and
    the head's ``bn2`` bias (flatten -> fc -> BN1d). Their gradient is exactly zero; both sides hold rounding noise
    (~1e-9) there, so they are checked to stay at zero instead of relatively.
    """
    return key.endswith(("bn3.bias", "downsample.1.bias")) or key == "bn2.bias"


def max_relative(a, b):
    """Largest |a - b| over the largest |b| of the tensor (scale-relative, so near-zero entries do not dominate)."""
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


CASES = [  # (method, warm-up epochs as its reference configs)
    ("mixbct", 0),
    ("l2", 0),
    ("bct", -1),
]


@pytest.mark.parametrize("world", [1, 4])
@pytest.mark.parametrize("method,warmup_epochs", CASES)
def test_jax_step_matches_pytorch_reference(method, warmup_epochs, world):
    torch.set_num_threads(1)
    batches = make_batches(world)
    protos = class_prototypes()
    consts = {}
    if method == "bct":
        padded = np.zeros((sharded_fc.padded_rows(C, world), D), np.float32)
        padded[:C] = protos
        consts = {"prototypes": padded}
    initial, jax_losses, jax_after = run_jax(method, world, batches, consts, warmup_epochs)

    state_dict = convert.flax_to_torch(
        {"params": initial["params"]["backbone"], "batch_stats": initial["batch_stats"]}, "r_tiny", D, SIZE, WIDTH
    )
    ref = ReferenceTrainer(
        state_dict,
        initial["params"]["head"]["centres"],
        world=world,
        method=method,
        warmup_epochs=warmup_epochs,
        prototypes=protos,
        dtype=torch.float64,
    )
    worst = {}
    for i, batch in enumerate(batches, start=1):
        loss = ref.step(batch)
        np.testing.assert_allclose(jax_losses[i - 1], loss, rtol=RTOL, err_msg=f"{method} W={world} step {i} loss")
        if i in (1, STEPS):
            torch_params = ref.trainable()
            assert set(torch_params) == set(jax_after[i])
            for key, want in torch_params.items():
                if zero_gradient(key):
                    assert np.abs(want).max() < 1e-6 and np.abs(jax_after[i][key]).max() < 1e-6, key
                    continue
                rel = max_relative(jax_after[i][key], want)
                worst[(i, key)] = rel
                assert rel < RTOL, f"{method} W={world} step {i} {key}: max relative difference {rel:.2e}"
    print(
        f"\n{method} W={world}: losses JAX {jax_losses} torch-last {loss:.6f}; max relative parameter "
        f"difference after step 1 {max(v for (i, _), v in worst.items() if i == 1):.2e}, after step {STEPS} "
        f"{max(v for (i, _), v in worst.items() if i == STEPS):.2e}"
    )
