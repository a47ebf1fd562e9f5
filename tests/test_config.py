"""Config validation, capacity, parameter/FLOP counts and dense twins (pure
Python: no JAX compilation here; counts against built models are in
test_model.py)."""

import dataclasses

import pytest

from moe.config import ConfigError, ModelConfig, MoeConfig, capacity

# A small MoE LM whose counts are written out by hand below.
V, D, L, H, DH, FD = 64, 16, 2, 2, 8, 48
E, K, FE = 4, 2, 24


def _moe_model(**moe_kw):
  m = dict(num_experts=E, top_k=K, expert_dim=FE)
  m.update(moe_kw)
  return ModelConfig(vocab_size=V, d_model=D, num_layers=L, num_heads=H, head_dim=DH,
                     mlp_dim=FD, max_seq_len=32, moe=MoeConfig(**m), moe_every=2)


# --- Capacity ---------------------------------------------------------------------

@pytest.mark.parametrize('s,e,k,cf,min_c,want', [
    (1024, 8, 1, 1.25, 4, 160),     # Switch: 1.25 * 1024 / 8
    (1024, 8, 2, 1.25, 4, 320),     # GShard top-2: k multiplies
    (100, 8, 1, 1.0, 4, 13),        # ceil(12.5)
    (7, 3, 1, 1.0, 1, 3),           # ceil(2.33)
    (10, 3, 2, 0.75, 1, 5),
    (10, 8, 1, 1.0, 4, 4),          # ceil(1.25) = 2 < min_capacity
    (100, 11, 1, 1.1, 1, 10),       # exactly 10 (float gives 10.000000000000002)
    (64, 64, 1, 0.01, 1, 1),
])
def test_capacity_formula(s, e, k, cf, min_c, want):
  assert capacity(s, e, k, cf, min_c) == want


def test_capacity_never_exceeds_group_size():
  # One expert can receive at most S of a group's tokens (k choices are distinct).
  assert capacity(4, 2, 2, 1.25, 1) == 4
  assert capacity(8, 1, 1, 2.0, 1) == 8
  assert capacity(2, 8, 1, 1.0, 4) == 2


def test_train_and_eval_capacity_factors():
  m = MoeConfig(num_experts=8, top_k=2, train_capacity_factor=1.25,
                eval_capacity_factor=2.0, min_capacity=4)
  assert m.capacity(64, train=True) == 20     # ceil(1.25 * 2 * 64 / 8)
  assert m.capacity(64, train=False) == 32    # ceil(2.0 * 2 * 64 / 8)
  assert m.capacity(8, train=True) == 4       # min_capacity
  assert m.capacity(64, train=False, factor=0.5) == 8
  assert m.capacity(64, train=True, factor='dropless') == 64   # every token fits


# --- Validation ---------------------------------------------------------------------

@pytest.mark.parametrize('kw,match', [
    (dict(num_experts=4, top_k=5), r'top_k=5'),
    (dict(top_k=0), r'top_k=0'),
    (dict(num_experts=0), r'num_experts=0'),
    (dict(train_capacity_factor=0.0), r'train_capacity_factor=0.0 must be > 0'),
    (dict(eval_capacity_factor=-1.0), r'eval_capacity_factor=-1.0 must be > 0'),
    (dict(min_capacity=0), r'min_capacity'),
    (dict(jitter_eps=1.0), r'jitter_eps'),
    (dict(logit_noise_std=-0.1), r'logit_noise_std'),
    (dict(aux_loss_coef=-1.0), r'aux_loss_coef'),
    (dict(num_shared_experts=-1), r'num_shared_experts'),
    (dict(balance_bias_rate=-0.1), r'balance_bias_rate'),
    (dict(expert_dim=0), r'expert_dim'),
    (dict(group_size=0), r'group_size'),
])
def test_moe_config_rejects(kw, match):
  with pytest.raises(ConfigError, match=match):
    MoeConfig(**kw)


@pytest.mark.parametrize('field,bad,hint', [
    ('router', 'token_choose', 'tokens_choose'),
    ('router', 'expert_choice', 'experts_choose'),
    ('dispatch', 'gahter', 'gather'),
    ('dispatch', 'einsums', 'einsum'),
])
def test_unknown_names_suggest_the_close_match(field, bad, hint):
  with pytest.raises(ConfigError, match=f"Did you mean '{hint}'") as info:
    MoeConfig(**{field: bad})
  assert f'moe.{field}={bad!r}' in str(info.value)


def test_unknown_name_without_close_match_lists_choices():
  with pytest.raises(ConfigError) as info:
    MoeConfig(router='zzz')
  assert 'Did you mean' not in str(info.value)
  assert 'tokens_choose' in str(info.value) and 'experts_choose' in str(info.value)
  with pytest.raises(ConfigError, match="Did you mean 'bfloat16'"):
    ModelConfig(256, dtype='bfloat')


def test_config_error_is_a_value_error_and_configs_are_frozen():
  assert issubclass(ConfigError, ValueError)
  with pytest.raises(dataclasses.FrozenInstanceError):
    MoeConfig().top_k = 2
  with pytest.raises(dataclasses.FrozenInstanceError):
    ModelConfig(256).d_model = 2


@pytest.mark.parametrize('kw,match', [
    (dict(head_dim=7), 'head_dim=7 must be even'),
    (dict(d_model=0), 'd_model=0'),
    (dict(attention='flash'), "model.attention='flash' is not valid"),
    (dict(num_layers=2, moe_every=3, moe=MoeConfig()), 'moe_every=3'),
])
def test_model_config_rejects(kw, match):
  with pytest.raises(ConfigError, match=match):
    ModelConfig(256, **kw)


@pytest.mark.parametrize('attention,platform,dtype,head_dim,want', [
    ('auto', 'cpu', 'bfloat16', 64, 'xla'),
    ('auto', 'tpu', 'bfloat16', 64, 'xla'),
    ('auto', 'rocm', 'bfloat16', 64, 'xla'),
    ('auto', 'cuda', 'bfloat16', 64, 'cudnn'),
    ('auto', 'cuda', 'bfloat16', 128, 'cudnn'),
    ('auto', 'cuda', 'float32', 64, 'xla'),        # cuDNN flash: 16-bit only
    ('auto', 'cuda', 'bfloat16', 36, 'xla'),       # not a multiple of 8
    ('auto', 'cuda', 'bfloat16', 256, 'xla'),      # above 128
    ('xla', 'cuda', 'bfloat16', 64, 'xla'),
    ('cudnn', 'cuda', 'bfloat16', 64, 'cudnn'),
])
def test_attention_kernel(attention, platform, dtype, head_dim, want):
  cfg = ModelConfig(256, attention=attention, dtype=dtype, head_dim=head_dim)
  assert cfg.attention_kernel(platform) == want


@pytest.mark.parametrize('platform,dtype,head_dim', [
    ('cpu', 'bfloat16', 64), ('cuda', 'float32', 64), ('cuda', 'bfloat16', 36)])
def test_cudnn_attention_refused_where_it_cannot_run(platform, dtype, head_dim):
  cfg = ModelConfig(256, attention='cudnn', dtype=dtype, head_dim=head_dim)
  with pytest.raises(ConfigError, match=f"needs a CUDA GPU.*platform is '{platform}', "
                     f"dtype '{dtype}', head_dim {head_dim}"):
    cfg.attention_kernel(platform)


def test_check_sequence():
  cfg = ModelConfig(256, max_seq_len=64, moe=MoeConfig(group_size=96))
  cfg.check_sequence(64 // 2 + 16)                     # 48 divides 96
  cfg.check_sequence(32)
  with pytest.raises(ConfigError, match='exceeds model.max_seq_len=64'):
    cfg.check_sequence(65)
  with pytest.raises(ConfigError, match='group_size=96 must be a multiple of seq_len=64'):
    cfg.check_sequence(64)
  with pytest.raises(ConfigError):
    cfg.check_sequence(0)
  # A dense model has no routing groups to check.
  dataclasses.replace(cfg, moe=None).check_sequence(64)


# --- Structure and counts ------------------------------------------------------------

def test_moe_layer_placement():
  cfg = dataclasses.replace(_moe_model(), num_layers=6, moe_every=2)
  assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True] * 3
  assert cfg.num_moe_layers == 3
  cfg1 = dataclasses.replace(cfg, moe_every=1)
  assert cfg1.num_moe_layers == 6
  assert dataclasses.replace(cfg, moe=None).num_moe_layers == 0


def test_param_counts_by_hand():
  cfg = _moe_model(num_shared_experts=1)
  embed = 2 * V * D + D                          # embed, unembed, final norm
  attn = 4 * D * H * DH + 2 * D                  # q k v o + two norms
  dense_ffn = 3 * D * FD
  router = D * E
  total = embed + L * attn + dense_ffn + router + (E + 1) * 3 * D * FE
  active = embed + L * attn + dense_ffn + router + (K + 1) * 3 * D * FE
  assert (cfg.num_params, cfg.num_active_params) == (total, active)
  assert (total, active) == (12304, 10000)
  dense = dataclasses.replace(cfg, moe=None)
  assert dense.num_params == dense.num_active_params == embed + L * (attn + dense_ffn)


def test_flops_per_token_by_hand():
  cfg = _moe_model()
  t = 32
  matmul = cfg.num_active_params - V * D         # no FLOPs for the embedding lookup
  assert cfg.flops_per_token(t) == 6 * matmul + 6 * L * H * DH * t
  # Experts that a token does not use cost nothing: E changes FLOPs by at most
  # the router matmul (6 D dE)...
  more = _moe_model(num_experts=16)
  assert more.flops_per_token(t) - cfg.flops_per_token(t) == 6 * D * (16 - E)
  # ...k does: each extra choice adds one expert's 3*D*FE matmul parameters.
  k1 = _moe_model(top_k=1)
  assert cfg.flops_per_token(t) - k1.flops_per_token(t) == 6 * 3 * D * FE


@pytest.mark.parametrize('moe_kw,moe_every', [
    (dict(), 2), (dict(), 1), (dict(num_shared_experts=1), 1),
    (dict(num_experts=16, top_k=1), 2)])
def test_dense_twins_match_within_one_percent(moe_kw, moe_every):
  cfg = dataclasses.replace(_moe_model(**moe_kw), moe_every=moe_every)
  total, active = cfg.dense_twin_total(), cfg.dense_twin_active()
  for twin in (total, active):
    assert twin.moe is None
    assert (twin.d_model, twin.num_layers, twin.num_heads, twin.vocab_size) == (D, L, H, V)
  assert total.num_params > cfg.num_active_params
  assert abs(total.num_params / cfg.num_params - 1) < 0.01
  assert abs(active.num_active_params / cfg.num_active_params - 1) < 0.01
  assert abs(active.flops_per_token(32) / cfg.flops_per_token(32) - 1) < 0.01
