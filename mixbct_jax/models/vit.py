"""insightface's face-recognition Vision Transformer in Flax linen, as the reference MixBCT code's backbones/vit.py.

Patch embedding (conv ``p x p`` stride ``p``, with bias; 9 on 112x112 gives a 12x12 grid = 144 tokens, the last
4 pixel rows and columns unused), a learned position embedding and no class token; pre-norm blocks
``x + DropPath(Attn(LN(x)))`` and ``x + DropPath(MLP(LN(x)))`` with qkv without bias, a softmax in float32 and an
MLP with ReLU6; a final LayerNorm; then flatten ``[B, L*E]`` -> Linear(no bias) -> BN1d -> Linear(no bias) ->
BN1d (eps 2e-5). The embedding is the last BN output, not L2-normalised.

Training only (``train=True``): each sample keeps ``int(L * (1 - mask_ratio))`` tokens chosen by argsort of
uniform noise; after the encoder and the final LayerNorm the dropped positions are filled with a learned
``mask_token`` and the tokens are put back in their original order. Drop path (stochastic depth) grows linearly
from 0 to ``drop_path`` over the depth, per sample, scaled by ``1 / keep``. Both draw from the ``'dropout'`` RNG
stream, which the train step derives from its per-device, per-step key; with ``train=False`` (extraction,
evaluation) the forward is deterministic and needs no RNG.

Precision: parameters are float32; with ``dtype=bfloat16`` the patch embedding, qkv, proj and the MLP compute in
bf16 (where the reference forces autocast), while the residual stream, the attention maths (q k^T, softmax,
attn v), every LayerNorm and the head (Linear, BN1d) stay float32, as in the reference.

``remat`` wraps each block in ``jax.checkpoint`` (the reference's ``using_checkpoint`` for its 24-block
variants): activations are recomputed in the backward pass instead of being stored, and the numbers do not change.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixbct_jax.aliases import Dtype
from mixbct_jax.initializers import torch_linear_uniform
from mixbct_jax.models.layers import BatchNorm

# Every nn.Linear and the position embedding: truncated normal, std 0.02
# (the reference MixBCT code's backbones/vit.py); biases 0.
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
# PyTorch's LayerNorm default epsilon (flax's default is 1e-6).
LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=jnp.float32)


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Per-block drop-path rates, linear from 0 to ``drop_path`` (``torch.linspace(0, drop_path, depth)``)."""
    if depth == 1:
        return [0.0]
    return [drop_path * i / (depth - 1) for i in range(depth)]


def num_kept_tokens(num_tokens: int, mask_ratio: float) -> int:
    """Tokens a training sample keeps: ``int(L * (1 - mask_ratio))``, as the reference truncates."""
    return int(num_tokens * (1 - mask_ratio))


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear without bias, scale head_dim^-0.5, q/k/v and softmax in float32."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, L, E]
        b, n, e = x.shape
        hd = e // self.num_heads
        qkv = nn.Dense(3 * e, use_bias=False, dtype=self.dtype, kernel_init=_trunc_normal, name="qkv")(x)
        # PyTorch reshapes to (B, L, 3, H, hd): the 3E outputs are [q | k | v], each head a contiguous hd slice.
        qkv = qkv.reshape(b, n, 3, self.num_heads, hd).astype(jnp.float32)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, hd]
        logits = jnp.einsum("blhd,bmhd->bhlm", q, k) * hd**-0.5  # [B, H, L, L]
        attn = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhlm,bmhd->blhd", attn, v).reshape(b, n, e)  # [B, L, E] float32
        return nn.Dense(e, dtype=self.dtype, kernel_init=_trunc_normal, name="proj")(out.astype(self.dtype))


class Mlp(nn.Module):
    """Linear(E -> hidden) -> ReLU6 -> Linear(hidden -> E)."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        e = x.shape[-1]
        x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_trunc_normal, name="fc1")(x)
        x = jnp.clip(x, 0, 6)  # ReLU6
        return nn.Dense(e, dtype=self.dtype, kernel_init=_trunc_normal, name="fc2")(x)


def stochastic_depth(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Zeroes whole samples of ``x`` [B, ...] with probability ``rate`` and scales the kept ones by 1/(1-rate)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))


class Block(nn.Module):
    """Pre-norm transformer block; the residual stream is float32, the branches compute in ``dtype``."""

    num_heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    train: bool = False
    dtype: Dtype = jnp.float32

    def _residual(self, x: jax.Array, branch: jax.Array) -> jax.Array:
        branch = branch.astype(jnp.float32)
        if self.train and self.drop_path > 0:
            branch = stochastic_depth(branch, self.drop_path, self.make_rng("dropout"))
        return x + branch

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, L, E] float32
        e = x.shape[-1]
        y = LayerNorm(name="norm1")(x).astype(self.dtype)
        x = self._residual(x, Attention(self.num_heads, dtype=self.dtype, name="attn")(y))
        y = LayerNorm(name="norm2")(x).astype(self.dtype)
        return self._residual(x, Mlp(int(e * self.mlp_ratio), dtype=self.dtype, name="mlp")(y))


class VisionTransformer(nn.Module):
    """insightface ViT backbone returning the raw embedding [B, embedding_size].

    Attributes:
      embed_dim: E, the token width.
      depth: number of blocks.
      num_heads: attention heads (E must be divisible by it).
      drop_path: the last block's drop-path rate (rates grow linearly from 0).
      mask_ratio: fraction of tokens dropped per training sample (0: no masking).
      embedding_size: D.
      input_size: H == W of the input (112 for the insightface models).
      patch_size: side of the square patches (9 for the insightface models); the grid is input_size // patch.
      mlp_ratio: MLP hidden width / E.
      remat: recompute each block in the backward pass (``jax.checkpoint``) instead of storing activations.
      dtype: compute dtype of the patch embedding, qkv/proj and the MLP; parameters stay float32.
    """

    embed_dim: int
    depth: int
    num_heads: int
    drop_path: float = 0.0
    mask_ratio: float = 0.0
    embedding_size: int = 512
    input_size: int = 112
    patch_size: int = 9
    mlp_ratio: float = 4.0
    remat: bool = False
    dtype: Dtype = jnp.float32

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    def _check(self, x: jax.Array) -> None:
        if x.shape[1] != self.input_size or x.shape[2] != self.input_size:
            raise ValueError(f"ViT built for {self.input_size}x{self.input_size} inputs, got {x.shape[1:3]}")
        if self.grid < 1:
            raise ValueError(
                f"config.model.patch_size={self.patch_size} is larger than "
                f"config.model.input_size={self.input_size}; choose a patch of at most the input side"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViT embed_dim {self.embed_dim} is not divisible by its {self.num_heads} heads")

    def _mask(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keeps a random subset of tokens per sample; returns them and the permutation that restores the order."""
        b, n = x.shape[:2]
        noise = jax.random.uniform(self.make_rng("dropout"), (b, n))
        ids_shuffle = jnp.argsort(noise, axis=1)  # ascending: the smallest noise values are kept
        ids_restore = jnp.argsort(ids_shuffle, axis=1)
        keep = ids_shuffle[:, : num_kept_tokens(n, self.mask_ratio)]
        return jnp.take_along_axis(x, keep[..., None], axis=1), ids_restore  # [B, L_keep, E], [B, L]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:  # x: [B, H, W, 3]
        self._check(x)
        p, e, n = self.patch_size, self.embed_dim, self.num_tokens
        # PyTorch registers these on the model itself; both exist even when masking is off.
        pos_embed = self.param("pos_embed", _trunc_normal, (1, n, e), jnp.float32)
        mask_token = self.param("mask_token", nn.initializers.normal(stddev=0.02), (1, 1, e), jnp.float32)
        # A stride-p conv ignores the trailing input_size % p rows and columns, as PyTorch's does.
        fan_in = 3 * p * p
        x = nn.Conv(
            e,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=torch_linear_uniform(fan_in),
            bias_init=torch_linear_uniform(fan_in),
            name="patch_embed",
        )(x.astype(self.dtype))  # [B, g, g, E]
        x = x.reshape(x.shape[0], n, e).astype(jnp.float32) + pos_embed  # tokens in row-major (h, w) order

        masking = train and self.mask_ratio > 0
        if masking:
            x, ids_restore = self._mask(x)
        block = nn.remat(Block) if self.remat else Block
        for i, rate in enumerate(drop_path_rates(self.drop_path, self.depth)):
            x = block(self.num_heads, self.mlp_ratio, rate, train, self.dtype, name=f"blocks_{i}")(x)
        x = LayerNorm(name="norm")(x)  # [B, L_keep, E] float32
        if masking:
            fill = jnp.broadcast_to(mask_token, (x.shape[0], n - x.shape[1], e))
            x = jnp.take_along_axis(jnp.concatenate([x, fill], axis=1), ids_restore[..., None], axis=1)

        x = x.reshape(x.shape[0], n * e)  # [B, L*E], token-major like PyTorch's reshape
        bn = functools.partial(BatchNorm, use_running_average=not train, epsilon=2e-5, dtype=jnp.float32)
        x = nn.Dense(e, use_bias=False, kernel_init=_trunc_normal, name="feature_fc1")(x)
        x = bn(name="feature_bn1")(x)
        x = nn.Dense(self.embedding_size, use_bias=False, kernel_init=_trunc_normal, name="feature_fc2")(x)
        return bn(name="features")(x)  # [B, D] float32, not normalised


# The registered variants (the reference MixBCT code's backbones/vit.py):
# (embed_dim, depth, heads, drop_path, mask_ratio, remat by default).
VARIANTS: dict[str, tuple[int, int, int, float, float, bool]] = {
    "vit_t": (256, 12, 8, 0.1, 0.1, False),
    "vit_t_dp005_mask0": (256, 12, 8, 0.05, 0.0, False),
    "vit_s": (512, 12, 8, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": (512, 12, 8, 0.05, 0.0, False),
    "vit_b": (512, 24, 8, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": (512, 24, 8, 0.05, 0.05, True),
    "vit_l_dp005_mask_005": (768, 24, 8, 0.05, 0.05, True),
    # insightface ships only the dp005_mask_005 ViT-L; "vit_l" is our short name for it.
    "vit_l": (768, 24, 8, 0.05, 0.05, True),
    # Two blocks of width 64: for tests and the CPU quickstart only (32x32 inputs, patch 4), not a published model.
    "vit_tiny": (64, 2, 4, 0.1, 0.1, False),
}
DEFAULT_PATCH = {"vit_tiny": 4}  # every other variant: 9 (112x112 -> 12x12 tokens)


def vit(arch: str, *, patch_size: int = 0, remat: bool | None = None, **kwargs) -> VisionTransformer:
    """The registered variant ``arch``; ``patch_size`` 0 and ``remat`` None keep the variant's own settings."""
    e, depth, heads, dp, mask, remat_default = VARIANTS[arch]
    return VisionTransformer(
        embed_dim=e,
        depth=depth,
        num_heads=heads,
        drop_path=dp,
        mask_ratio=mask,
        patch_size=patch_size or DEFAULT_PATCH.get(arch, 9),
        remat=remat_default if remat is None else remat,
        **kwargs,
    )
