"""Frozen model configs: validation, derived dims, parameter and FLOP counts.

`ModelConfig` is the only thing the model and its layers see (never the run
config). It validates itself once, in `__post_init__`, and raises a
`ConfigError` that names the bad value and what would be valid.

Counting conventions (used by the report, MFU and the dense twins):
  * parameters: every `nnx.Param` of the built model (embedding and unembedding
    are separate matrices; the aux-loss-free balance bias is state, not a
    parameter).
  * active parameters: parameters that touch one token: the k routed experts
    and the shared experts of each MoE layer instead of all E experts.
  * training FLOPs per token: 6 x (active matmul parameters, i.e. without the
    input embedding lookup) + 6 x the attention score/value matmuls
    (2 x 2 x T x H x Dh per layer forward, averaged over causal positions as
    in PaLM's 6N + 12 L H Dh T, halved for causality:
    6 x L x H x Dh x T). Router and dispatch overhead are not model FLOPs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from moe.user_error import UserError

ROUTERS = ('tokens_choose', 'experts_choose')
BALANCE_SCOPES = ('group', 'batch')
PRIORITIES = ('choice', 'position')
DISPATCHES = ('einsum', 'gather', 'dropless')
DTYPES = ('float32', 'bfloat16')
ATTENTIONS = ('auto', 'xla', 'cudnn')


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names it and what is valid."""


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    raise ConfigError(
        f'{name}={value!r} is not valid; choose one of {choices}.{hint}')


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """One MoE feed-forward layer (router, capacity, experts, losses)."""
  num_experts: int = 8
  top_k: int = 1                      # experts per token (tokens_choose)
  expert_dim: int = 512               # hidden width F of each expert's SwiGLU
  router: str = 'tokens_choose'       # or 'experts_choose' (not causal)
  priority: str = 'choice'            # capacity priority: 'choice' or 'position'
  renormalize_gates: bool = False     # top-k gates divided by their sum
  dispatch: str = 'gather'            # or 'einsum' (one-hot reference) or 'dropless'
  group_size: int = 256               # tokens per routing group (whole sequences)
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  jitter_eps: float = 0.0             # Switch jitter: inputs x U(1-eps, 1+eps)
  logit_noise_std: float = 0.0        # Gaussian noise on router logits
  aux_loss_coef: float = 0.01         # unit-normalized: aux == 1.0 at uniform
  balance_scope: str = 'group'        # aux loss's f_e, P_e per 'group' or over the 'batch'
  z_loss_coef: float = 1e-3
  num_shared_experts: int = 0         # always-active experts of width expert_dim
  balance_bias_rate: float = 0.0      # DeepSeek-V3 aux-loss-free bias step; 0 = off
  # Adaptive compute (moe.routing, "Adaptive compute"): cheap experts in the
  # router's choice set and threshold routing.
  num_zero_experts: int = 0           # choices that output nothing
  num_copy_experts: int = 0           # choices that output their input
  num_const_experts: int = 0          # choices that output a learned vector
  top_p: float = 0.0                  # > 0: take choices until their probs reach p (k_max = top_k)
  compute_target: float = 0.0         # FFN experts per token to steer to (0: none)
  compute_loss_coef: float = 0.0      # weight of the compute regularizer

  def __post_init__(self):
    _check(self.num_experts >= 1,
           f'moe.num_experts={self.num_experts} must be >= 1.')
    _check_choice('moe.router', self.router, ROUTERS)
    _check_choice('moe.dispatch', self.dispatch, DISPATCHES)
    _check_choice('moe.priority', self.priority, PRIORITIES)
    _check_choice('moe.balance_scope', self.balance_scope, BALANCE_SCOPES)
    if self.num_cheap_experts > 0:
      _check(1 <= self.top_k <= self.num_choices,
             f'moe.top_k={self.top_k} must be between 1 and the router\'s '
             f'{self.num_choices} choices (experts and cheap experts).')
    else:
      _check(1 <= self.top_k <= self.num_experts,
             f'moe.top_k={self.top_k} must be between 1 and '
             f'moe.num_experts={self.num_experts}.')
    _check(self.expert_dim >= 1, f'moe.expert_dim={self.expert_dim} must be >= 1.')
    _check(self.group_size >= 1, f'moe.group_size={self.group_size} must be >= 1.')
    for name in ('train_capacity_factor', 'eval_capacity_factor'):
      cf = getattr(self, name)
      _check(cf > 0, f'moe.{name}={cf} must be > 0 (1.0 = exactly balanced '
             'capacity; 1.25 is the Switch default).')
    _check(self.min_capacity >= 1,
           f'moe.min_capacity={self.min_capacity} must be >= 1.')
    _check(0.0 <= self.jitter_eps < 1.0,
           f'moe.jitter_eps={self.jitter_eps} must be in [0, 1).')
    for name in ('logit_noise_std', 'aux_loss_coef', 'z_loss_coef',
                 'balance_bias_rate'):
      _check(getattr(self, name) >= 0,
             f'moe.{name}={getattr(self, name)} must be >= 0.')
    _check(self.num_shared_experts >= 0,
           f'moe.num_shared_experts={self.num_shared_experts} must be >= 0.')
    for name in ('num_zero_experts', 'num_copy_experts', 'num_const_experts'):
      _check(getattr(self, name) >= 0, f'moe.{name}={getattr(self, name)} must be >= 0.')
    _check(0.0 <= self.top_p <= 1.0,
           f'moe.top_p={self.top_p} must be in [0, 1] (0: fixed top-k; p: each '
           'token takes choices until their probabilities sum to p, at most top_k).')
    _check(self.compute_target >= 0 and self.compute_loss_coef >= 0,
           f'moe.compute_target={self.compute_target} and moe.compute_loss_coef='
           f'{self.compute_loss_coef} must be >= 0.')
    if self.router == 'experts_choose':
      _check(not self.adaptive and not self.compute_target,
             "moe.router='experts_choose' takes no cheap experts, top_p or "
             "compute_target (experts pick tokens); use 'tokens_choose'.")
    if self.compute_target:
      _check(self.adaptive and self.compute_target <= self.top_k,
             f'moe.compute_target={self.compute_target} needs adaptive routing '
             '(moe.num_zero/copy/const_experts > 0 or moe.top_p > 0) and must be '
             f'at most moe.top_k={self.top_k}.')
    _check(not self.compute_loss_coef or self.compute_target,
           f'moe.compute_loss_coef={self.compute_loss_coef} steers the FFN experts '
           'per token to moe.compute_target; set compute_target > 0.')

  @property
  def num_cheap_experts(self) -> int:
    """Zero, copy and constant experts: choices with no FFN."""
    return self.num_zero_experts + self.num_copy_experts + self.num_const_experts

  @property
  def num_choices(self) -> int:
    """The router's outputs: FFN experts [0, E), then zero, copy and
    constant experts, in that order."""
    return self.num_experts + self.num_cheap_experts

  @property
  def adaptive(self) -> bool:
    """Whether a token's number of FFN experts varies (cheap experts or
    threshold routing) instead of being exactly top_k."""
    return self.num_cheap_experts > 0 or self.top_p > 0

  @property
  def ffn_choices(self) -> float:
    """Expected FFN experts per token: top_k for fixed routing; with
    adaptive routing compute_target where set (the regularizer steers the
    mean there), else top_k x E / (E + cheap experts), a uniform spread
    over the choice set. Capacity, active parameters and nominal FLOPs use
    it."""
    if self.compute_target:
      return self.compute_target
    if self.num_cheap_experts:
      return self.top_k * self.num_experts / self.num_choices
    return self.top_k

  def seqs_per_group(self, batch: int, seq_len: int) -> int:
    """Sequences per routing group: group_size // seq_len, at least 1 and at
    most the batch; refuses a batch that does not split into such groups."""
    spg = min(max(self.group_size // seq_len, 1), batch)
    _check(batch % spg == 0,
           f'batch of {batch} sequences does not split into routing groups of '
           f'{spg} sequences (moe.group_size={self.group_size}, seq_len='
           f'{seq_len}); use a batch that is a multiple of {spg}.')
    return spg

  def capacity(self, group_size: int, train: bool,
               factor: float | str | None = None) -> int:
    """C = max(ceil(cf * k * S / E), min_capacity) for a group of S tokens,
    k the expected FFN choices per token (`ffn_choices`).

    `factor` overrides the train/eval factor (eval's capacity what-if);
    'dropless' gives C = S, room for every token of the group, and so does
    the dropless dispatch unless a factor is given."""
    if factor == 'dropless' or (factor is None and self.dispatch == 'dropless'):
      return group_size
    if factor is None:
      factor = self.train_capacity_factor if train else self.eval_capacity_factor
    _check(factor > 0, f'capacity factor {factor} must be > 0 or \'dropless\'.')
    return capacity(group_size, self.num_experts, self.ffn_choices, factor,
                    self.min_capacity)


def capacity(group_size: int, num_experts: int, top_k: float,
             capacity_factor: float, min_capacity: int) -> int:
  """Expert buffer slots per routing group: max(ceil(cf*k*S/E), min_capacity),
  k the FFN choices per token (fractional with adaptive routing).

  Never more than S: a token's k choices are distinct experts, so one expert
  receives at most S tokens of a group. The 1e-9 keeps float error from
  rounding an exact integer up (1.1 * 100 / 11 = 10.000000000000002)."""
  c = max(math.ceil(capacity_factor * top_k * group_size / num_experts - 1e-9),
          min_capacity)
  return min(c, group_size)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only Transformer LM; `moe=None` makes it dense."""
  vocab_size: int                     # the tokenizer's (run config: 0)
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 512                  # hidden width of the dense SwiGLU layers
  max_seq_len: int = 128
  rope_theta: float = 10_000.0
  dtype: str = 'float32'              # compute dtype; params and router stay f32
  moe: MoeConfig | None = None
  moe_every: int = 2                  # every n-th layer is MoE: layer i when (i + 1) % n == 0
  remat: bool = False                 # recompute each block in the backward pass
  attention: str = 'auto'             # kernel: 'xla', 'cudnn' or 'auto' (attention_kernel)

  def __post_init__(self):
    for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads',
                 'head_dim', 'mlp_dim', 'max_seq_len', 'moe_every'):
      _check(getattr(self, name) >= 1,
             f'model.{name}={getattr(self, name)} must be >= 1.')
    _check(self.head_dim % 2 == 0,
           f'model.head_dim={self.head_dim} must be even (RoPE rotates pairs).')
    _check_choice('model.dtype', self.dtype, DTYPES)
    _check_choice('model.attention', self.attention, ATTENTIONS)
    if self.moe is not None:
      _check(self.moe_every <= self.num_layers,
             f'model.moe_every={self.moe_every} exceeds model.num_layers='
             f'{self.num_layers}: the model would have no MoE layer.')

  # --- Derived structure -----------------------------------------------------
  @property
  def is_moe(self) -> bool:
    return self.moe is not None

  def is_moe_layer(self, i: int) -> bool:
    return self.moe is not None and (i + 1) % self.moe_every == 0

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.num_layers))

  def attention_kernel(self, platform: str) -> str:
    """The attention kernel this model runs on `platform` (a jax backend's
    platform: 'cpu', 'cuda', 'rocm', 'tpu'): 'xla' (layers.causal_attention,
    everywhere) or 'cudnn' (cuDNN flash attention: CUDA GPUs, bfloat16, head_dim
    a multiple of 8 up to 128; it skips the masked half instead of computing
    T x T logits). 'auto' takes cudnn where it applies, else xla; an explicit
    'cudnn' where it cannot run is refused."""
    fits = (platform == 'cuda' and self.dtype == 'bfloat16'
            and self.head_dim % 8 == 0 and self.head_dim <= 128)
    if self.attention == 'auto':
      return 'cudnn' if fits else 'xla'
    _check(self.attention == 'xla' or fits,
           f"model.attention='cudnn' needs a CUDA GPU, model.dtype='bfloat16' "
           f'and model.head_dim a multiple of 8 up to 128; here the platform is '
           f'{platform!r}, dtype {self.dtype!r}, head_dim {self.head_dim}. Use '
           "'auto' (cudnn where it applies) or 'xla'.")
    return self.attention

  def check_sequence(self, seq_len: int) -> None:
    """Refuses a sequence the model cannot take (before any compilation)."""
    _check(1 <= seq_len <= self.max_seq_len,
           f'sequence length {seq_len} exceeds model.max_seq_len='
           f'{self.max_seq_len}; use seq_len <= {self.max_seq_len} or raise '
           'max_seq_len.')
    if self.moe is not None:
      g = self.moe.group_size
      _check(g % seq_len == 0,
             f'moe.group_size={g} must be a multiple of seq_len={seq_len} '
             '(routing groups hold whole sequences); for example '
             f'{seq_len * max(1, g // seq_len)}.')

  # --- Counting --------------------------------------------------------------
  def _attn_params(self) -> int:
    return 4 * self.d_model * self.num_heads * self.head_dim

  def _moe_params(self, active: bool) -> int:
    """Router + experts (active: the expected FFN choices, `ffn_choices`;
    the constant experts' vectors count in the total only: no matmul)."""
    m = self.moe
    experts = m.ffn_choices if active else m.num_experts
    router = self.d_model * m.num_choices
    consts = 0 if active else m.num_const_experts * self.d_model
    return round(router + consts + (experts + m.num_shared_experts) * 3 * self.d_model
                 * m.expert_dim)

  def _ffn_params(self, i: int, active: bool) -> int:
    if self.is_moe_layer(i):
      return self._moe_params(active)
    return 3 * self.d_model * self.mlp_dim

  def _param_count(self, active: bool) -> int:
    d = self.d_model
    per_layer = sum(self._attn_params() + self._ffn_params(i, active) + 2 * d
                    for i in range(self.num_layers))
    return 2 * self.vocab_size * d + per_layer + d  # embed, unembed, final norm

  @property
  def num_params(self) -> int:
    """Total parameters of the built model."""
    return self._param_count(active=False)

  @property
  def num_active_params(self) -> int:
    """Parameters used by one token (k routed + shared experts per MoE layer)."""
    return self._param_count(active=True)

  def flops_per_token(self, seq_len: int, ffn_per_token=None) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward).

    ffn_per_token: the FFN experts per token each MoE layer actually took
    (router statistics, [L]); by default the expected `moe.ffn_choices`."""
    matmul_params = self.num_active_params - self.vocab_size * self.d_model
    attention = self.num_layers * self.num_heads * self.head_dim * seq_len
    flops = 6.0 * matmul_params + 6.0 * attention
    if ffn_per_token is not None:
      m = self.moe
      spent = sum(float(n) - m.ffn_choices for n in ffn_per_token)
      flops += 6.0 * spent * 3 * self.d_model * m.expert_dim
    return flops

  # --- Dense twins -------------------------------------------------------------
  def _dense_with_ffn_params(self, ffn_params_per_model: int) -> ModelConfig:
    mlp_dim = max(1, round(ffn_params_per_model / (3 * self.d_model * self.num_layers)))
    return dataclasses.replace(self, moe=None, mlp_dim=mlp_dim)

  def dense_twin_total(self) -> ModelConfig:
    """Dense model with the same total parameters (uniform, wider SwiGLU)."""
    ffn = sum(self._ffn_params(i, active=False) for i in range(self.num_layers))
    return self._dense_with_ffn_params(ffn)

  def dense_twin_active(self) -> ModelConfig:
    """Dense model with the same active FLOPs per token."""
    ffn = sum(self._ffn_params(i, active=True) for i in range(self.num_layers))
    return self._dense_with_ffn_params(ffn)
