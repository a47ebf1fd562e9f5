"""Transformer building blocks (Flax NNX): RMSNorm, RoPE, causal
self-attention, SwiGLU MLP.

Shape letters: B batch, T length, D d_model, N heads, H head_dim, F mlp hidden.
Parameters are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.extend  # the backend's platform version (platform())
import jax.numpy as jnp
from flax import nnx

from moe import sharding
from moe.config import ModelConfig


def project(x, w, contract: int = 1):
  """x [..., *I] times w [*I, *O] -> [..., *O], contracting the last
  `contract` axes of x with the first of w, as one 2-D matmul
  [tokens, prod(I)] x [prod(I), prod(O)].

  One token axis: on XLA:CPU an einsum with several token axes ([B, T, F])
  gets a transposed copy of its activations for the weight gradient, the
  largest single cost in a profile of the dense twin (docs/performance.md).
  """
  lead, inner, outer = x.shape[:-contract], w.shape[:contract], w.shape[contract:]
  y = jnp.matmul(x.reshape(math.prod(lead), math.prod(inner)),
                 w.reshape(math.prod(inner), math.prod(outer)))
  return y.reshape(*lead, *outer)


def fan_in_init(fan_in_axes: int):
  """Truncated-normal init with variance 1/fan_in over the first axes."""
  return nnx.initializers.variance_scaling(
      1.0, 'fan_in', 'truncated_normal',
      in_axis=tuple(range(fan_in_axes)), out_axis=-1)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, computed in float32."""

  def __init__(self, dim: int):
    self.scale = sharding.param(nnx.initializers.ones, None, (dim,), ('embed',))

  def __call__(self, x):  # [..., D]
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (y * self.scale[...]).astype(x.dtype)


def rope(x, positions, theta: float):
  """Rotary position embedding (rotate-half form). x: [B, T, N, H]."""
  h = x.shape[-1]
  freq = theta ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2 / h)  # [H/2]
  angle = positions[..., None].astype(jnp.float32) * freq               # [B, T, H/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def platform() -> str:
  """The default backend's platform: 'cpu', 'tpu', 'cuda' or 'rocm'."""
  backend = jax.extend.backend.get_backend()
  if backend.platform == 'gpu':
    return 'cuda' if 'cuda' in backend.platform_version.lower() else 'rocm'
  return backend.platform


def causal_attention(q, k, v):
  """softmax(q k^T / sqrt(H), causal) v with float32 logits and softmax.

  q, k, v: [B, T, N, H] -> [B, T, N, H]. Heads-major inside ([B, N, T, H]):
  one batch of [T, H] matmuls per (sequence, head), faster fwd+bwd on
  XLA:CPU than jax.nn.dot_product_attention's XLA form (docs/performance.md),
  which is what that function runs everywhere unless asked for cuDNN.
  """
  t, h = q.shape[1], q.shape[-1]
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))          # [B, N, T, H]
  logits = jnp.einsum('BNTH,BNSH->BNTS', q, k,
                      preferred_element_type=jnp.float32) * h ** -0.5
  causal = jnp.tril(jnp.ones((t, t), bool))                       # [T, S]
  logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)         # [B, N, T, S]
  return jnp.einsum('BNTS,BNSH->BNTH', probs, v).transpose(0, 2, 1, 3)


class Attention(nnx.Module):
  """Causal multi-head self-attention with RoPE.

  The kernel is `cfg.attention_kernel(platform())`: `causal_attention` above,
  or cuDNN's flash attention (`jax.nn.dot_product_attention(...,
  implementation='cudnn')`), which never materializes the [B, N, T, T]
  logits and skips the masked half.
  """

  def __init__(self, cfg: ModelConfig, key: jax.Array):
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
    kq, kk, kv, ko = jax.random.split(key, 4)
    qkv_init = fan_in_init(1)
    self.wq = sharding.param(qkv_init, kq, (d, n, h), ('embed', 'heads', 'head_dim'))
    self.wk = sharding.param(qkv_init, kk, (d, n, h), ('embed', 'heads', 'head_dim'))
    self.wv = sharding.param(qkv_init, kv, (d, n, h), ('embed', 'heads', 'head_dim'))
    self.wo = sharding.param(fan_in_init(2), ko, (n, h, d), ('heads', 'head_dim', 'embed'))
    self.theta = cfg.rope_theta
    self.dtype = jnp.dtype(cfg.dtype)
    self.kernel = cfg.attention_kernel(platform())

  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    dt = self.dtype
    t = x.shape[1]
    positions = jnp.arange(t)[None, :]
    q = project(x, self.wq[...].astype(dt))                       # [B, T, N, H]
    k = project(x, self.wk[...].astype(dt))
    v = project(x, self.wv[...].astype(dt))
    q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
    q = sharding.constrain(q, ('batch', 'length', 'heads', 'head_dim'))
    if self.kernel == 'cudnn':
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                         implementation='cudnn')
    else:
      out = causal_attention(q, k, v)                              # [B, T, N, H]
    return project(out, self.wo[...].astype(dt), contract=2)        # [B, T, D]


def swiglu(x, w_gate, w_up, w_down, dt):
  """SwiGLU feed-forward: (silu(x Wg) * x Wu) Wd; x: [..., D]."""
  g = project(x, w_gate.astype(dt))                               # [..., F]
  u = project(x, w_up.astype(dt))                                 # [..., F]
  return project(jax.nn.silu(g) * u, w_down.astype(dt))           # [..., D]


class Mlp(nnx.Module):
  """Dense SwiGLU MLP."""

  def __init__(self, d_model: int, hidden: int, dtype: str, key: jax.Array):
    kg, ku, kd = jax.random.split(key, 3)
    init = fan_in_init(1)
    self.w_gate = sharding.param(init, kg, (d_model, hidden), ('embed', 'mlp'))
    self.w_up = sharding.param(init, ku, (d_model, hidden), ('embed', 'mlp'))
    self.w_down = sharding.param(init, kd, (hidden, d_model), ('mlp', 'embed'))
    self.dtype = jnp.dtype(dtype)

  def __call__(self, x):  # [B, T, D]
    x = swiglu(x, self.w_gate[...], self.w_up[...], self.w_down[...], self.dtype)
    return sharding.constrain(x, ('batch', 'length', 'act_embed'))
