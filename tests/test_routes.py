"""The routes analysis: token categories, statistics by hand, a model whose
router follows the category by construction, experts-choose choices.
(scripts/routes.py end to end: tests/test_train.py, on the recipe's run.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharded_setup
from moe import data, routes, sharding, steps
from moe import token_categories as tc
from moe.config import ConfigError, ModelConfig, MoeConfig
from moe.model import Transformer

EOS = data.ByteTokenizer.eos_id


def _eval_set(docs: list[bytes], seq_len: int, batch: int) -> data.EvalSet:
  """A whole-set EvalSet over byte-tokenized, EOS-terminated documents."""
  parts = [np.append(np.frombuffer(d, np.uint8).astype(np.uint16), EOS) for d in docs]
  starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
  stream = np.concatenate(parts)
  rows = len(stream) // (seq_len + 1)
  return data.EvalSet(stream, starts, np.arange(rows), seq_len + 1, True,
                      batch, 0, 1)


def test_python_categories_of_each_kind_of_byte():
  text = 'if x:\n    y = len("a b")  # c\n\tz = 1.5\n'.encode()
  got = [tc.PYTHON[i] for i in tc.python(text)]
  want = (['keyword'] * 2 + ['other whitespace'] + ['identifier']
          + ['operator/punctuation'] + ['indentation/newline'] * 5
          + ['identifier', 'other whitespace', 'operator/punctuation',
             'other whitespace'] + ['builtin name'] * 3
          + ['operator/punctuation'] + ['string'] * 5 + ['operator/punctuation']
          + ['other whitespace'] * 2 + ['comment'] * 3 + ['indentation/newline'] * 2
          + ['identifier', 'other whitespace', 'operator/punctuation',
             'other whitespace'] + ['number'] * 3 + ['indentation/newline'])
  assert got == want


def test_python_categories_survive_bad_source_and_utf8():
  # Non-ASCII identifiers keep byte offsets; an unterminated string stops
  # tokenize, and what came before keeps its labels.
  text = 'é = 1\ns = """open\n'.encode()
  got = [tc.PYTHON[i] for i in tc.python(text)]
  assert got[:3] == ['identifier'] * 2 + ['other whitespace']
  assert got[5] == 'number' and got[6] == 'indentation/newline'
  assert got[7] == 'identifier' and len(got) == len(text)


def test_byte_classes():
  got = [tc.BYTE_CLASSES[i] for i in tc.byte_classes('a1.\t\né'.encode())]
  assert got == ['letter', 'digit', 'punctuation', 'space', 'newline',
                 'non-ASCII', 'non-ASCII']


def test_labeller_spec_errors_name_the_value():
  assert tc.get('python') is tc.python
  assert tc.get('moe.token_categories:byte_classes') is tc.byte_classes
  with pytest.raises(ConfigError, match=r"categories='pyhton' is not valid"):
    tc.get('pyhton')
  with pytest.raises(ConfigError, match='cannot import'):
    tc.get('no_such_module:f')
  with pytest.raises(ConfigError, match='CATEGORIES attribute'):
    tc.get('numpy:zeros')


def test_statistics_by_hand():
  # Two documents; the six tokens that have a next token are routed;
  # layer 0 by hand, layer 1 = layer 0.
  es = _eval_set([b'ab1', b'a2'], seq_len=2, batch=1)   # stream a b 1 EOS a 2 EOS
  labels = routes.label(es, data.ByteTokenizer(), tc.byte_classes)
  assert labels.names == tc.BYTE_CLASSES + ('end of text',)
  assert labels.text == b'ab1a2' and labels.length.tolist() == [1, 1, 1, 0, 1, 1, 0]
  expert = np.array([0, 0, 1, 1, 0, 1])[None, :, None].repeat(2, 0)
  kept = np.ones_like(expert, bool)
  kept[:, 2] = False                                   # the digit '1' was dropped
  r = routes.Routes(np.arange(6), expert, kept, np.ones(expert.shape, np.float32),
                    np.arange(6, dtype=np.float32))    # loss j: predicting token j + 1
  res = routes.analyse(r, labels, es, data.ByteTokenizer(), 3, 'tokens_choose')
  letter, digit, eot = 0, 1, len(labels.names) - 1
  share = res['category_share']
  assert share[letter] == pytest.approx(3 / 6) and share[eot] == pytest.approx(1 / 6)
  # Loss by the predicted token's category: letters b, a at j = 0, 3.
  assert res['category_loss'][letter] == pytest.approx((0 + 3) / 2)
  assert res['category_loss'][eot] == pytest.approx((2 + 5) / 2)
  lay = res['layers'][0]
  assert lay['counts'][letter] == [3, 0, 0] and lay['counts'][digit] == [0, 2, 0]
  assert lay['counts'][eot] == [0, 1, 0]
  assert lay['expert_load'] == pytest.approx([0.5, 0.5, 0.0])
  assert lay['dead_experts'] == 1 and lay['dropped_fraction'] == pytest.approx(1 / 6)
  assert lay['dropped_by_category'][digit] == pytest.approx(0.5)
  assert lay['dropped_by_category'][letter] == 0.0
  e0 = lay['experts'][0]
  assert e0['tokens'][0] == {'token': 'a', 'count': 2, 'share_of_token': 1.0}
  assert e0['top_category'] is None          # fewer than 20 tokens of any kind
  # Contexts stop at the token's document start ('2' reads 'a2', not 'ab1a2').
  assert [c['context'] for c in lay['experts'][1]['contexts']] == ['ab1', 'a2']
  # Category and token each decide the expert here; the partitions differ.
  assert lay['category_explains'] == pytest.approx(1.0)
  assert lay['token_explains'] == pytest.approx(1.0)
  assert lay['nmi'] == pytest.approx(routes.nmi(np.array([0, 0, 1, 6, 0, 1]),
                                                expert[0, :, 0])) and lay['nmi'] < 1
  assert res['adjacent_layers'] == [{'nmi': pytest.approx(1.0), 'predicted': 1.0,
                                     'baseline': pytest.approx(0.5)}]
  # Compute: every kept choice is an FFN expert (3 of them): 5 of 6 tokens.
  assert res['compute']['ffn_per_token'] == pytest.approx([5 / 6, 5 / 6])
  assert res['compute']['by_category'][0][digit] == pytest.approx(0.5)

  # Stability over the tokens both collections hold (a later one may route
  # every 4th batch only): tokens 0, 2, 4, one of them moved.
  part = routes.Routes(*(a[..., [0, 2, 4], :] if a.ndim == 3 else a[[0, 2, 4]]
                         for a in r))
  part.expert[:, 1, 0] = 0
  assert routes.stability(part, r) == pytest.approx([2 / 3, 2 / 3])


def test_compute_by_category_and_loss_by_hand():
  """Where the compute went, and drops among FFN choices only: 2 FFN
  experts (0, 1) and a cheap one (2); top-2; loss j = j. Tokens 0-1 take
  two FFN experts, token 2 two but its second was dropped, 3-4 one FFN and
  the cheap one, token 5 only the cheap one (-1: a second choice a
  threshold did not take)."""
  es = _eval_set([b'ab1', b'a2'], seq_len=2, batch=1)
  labels = routes.label(es, data.ByteTokenizer(), tc.byte_classes)
  expert = np.array([[0, 1], [1, 0], [0, 1], [2, 0], [1, 2], [2, -1]])[None]
  kept = np.array([[1, 1], [1, 1], [1, 0], [0, 1], [1, 0], [0, 0]], bool)[None]
  r = routes.Routes(np.arange(6), expert, kept, np.ones(expert.shape, np.float32),
                    np.arange(6, dtype=np.float32))
  res = routes.analyse(r, labels, es, data.ByteTokenizer(), 3, 'tokens_choose',
                       num_ffn=2)
  lay = res['layers'][0]
  assert lay['dropped_fraction'] == pytest.approx(1 / 8)    # of the 8 FFN choices made
  letter, digit = 0, 1            # letters a b a at 0, 1, 4; digits at 2, 5
  assert lay['dropped_by_category'][digit] == pytest.approx(1 / 2)
  assert lay['dropped_by_category'][letter] == 0.0
  assert lay['expert_load'] == pytest.approx([4 / 11, 4 / 11, 3 / 11])
  c = res['compute']
  assert c['ffn_per_token'] == pytest.approx([(2 + 2 + 1 + 1 + 1 + 0) / 6])
  assert c['by_category'][0][letter] == pytest.approx(5 / 3)
  assert c['by_category'][0][digit] == pytest.approx(0.5)
  # 10 equal-count bins of 6 tokens: token j in bin j * 10 // 6.
  filled = [0, 1, 3, 5, 6, 8]
  assert [c['loss_bin_mean'][b] for b in filled] == [0, 1, 2, 3, 4, 5]
  assert [c['by_loss_bin'][0][b] for b in filled] == [2, 2, 1, 1, 1, 0]
  assert all(c['by_loss_bin'][0][b] == 0 for b in range(10) if b not in filled)


def test_nmi_and_explained_share():
  rng = np.random.default_rng(0)
  cat = rng.integers(0, 8, 50_000)
  assert routes.nmi(cat, (cat + 3) % 8) == pytest.approx(1.0)    # a relabelling
  # 8 categories onto 2 experts: the category decides the expert (explains
  # all of its entropy) but NMI, symmetric, is well below 1.
  assert routes.explained(cat, cat % 2) == pytest.approx(1.0)
  assert routes.nmi(cat, cat % 2) == pytest.approx(2 * np.log(2) / (np.log(8) + np.log(2)),
                                                   rel=1e-3)
  independent = rng.integers(0, 8, 50_000)
  assert routes.nmi(cat, independent) < 0.005 and routes.explained(cat, independent) < 0.005
  assert routes.nmi(np.zeros(5), np.zeros(5)) == 0.0
  assert routes.nmi(np.zeros(0), np.zeros(0)) == 0.0


def test_experts_choose_choices_best_first():
  # Token 0 taken by experts 2 (gate .7) and 0 (.2); token 1 by nobody.
  kept = np.array([[[True, False, True], [False, False, False]]])
  gate = np.array([[[0.2, 0.5, 0.7], [0.3, 0.3, 0.4]]], np.float32)
  expert = np.broadcast_to(np.arange(3), (1, 2, 3)).astype(np.int32)
  r = routes._best_first(routes.Routes(np.arange(2), expert, kept, gate,
                                       np.zeros(2, np.float32)))
  assert r.expert.tolist() == [[[2, 0, -1], [-1, -1, -1]]]
  assert r.kept.tolist() == [[[True, True, False], [False, False, False]]]
  # Stability counts tokens routed at both checkpoints: token 1, taken by
  # nobody, is neither kept nor changed; token 0's first expert moved.
  assert routes.stability(r, r) == [1.0]
  moved = r._replace(expert=np.array([[[0, 2, -1], [-1, -1, -1]]], np.int32))
  assert routes.stability(r, moved) == [0.0]


@functools.cache
def _category_router_model(eval_capacity_factor=2.0, mesh_shape=(1, 1, 1)):
  """A 1-layer MoE whose router sees only the token (attention output 0):
  letters go to expert 0, digits and EOS to expert 1, by construction."""
  cfg = ModelConfig(vocab_size=384, d_model=8, num_layers=1, num_heads=1,
                    head_dim=8, mlp_dim=8, max_seq_len=16,
                    moe=MoeConfig(num_experts=2, expert_dim=4, group_size=16,
                                  eval_capacity_factor=eval_capacity_factor),
                    moe_every=1)
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  s = sharded_setup.trainer(cfg, sharding.make_mesh(mesh_shape, devices), lr=1e-3)
  model = Transformer(cfg, jax.random.key(0))
  v = jnp.ones(8)
  embed = np.zeros((384, 8), np.float32)
  embed[[ord(c) for c in 'abcdefghij']] = v
  embed[[ord(c) for c in '0123456789'] + [EOS]] = -v
  model.embed[...] = jnp.asarray(embed)
  block = model.blocks[0]
  block.attn.wo[...] = jnp.zeros_like(block.attn.wo[...])
  block.ffn.w_router[...] = jnp.stack([5 * v, -5 * v], axis=1)
  _, params, extra = nnx.split(model, nnx.Param, ...)
  # The state the jitted steps take: the model above in a state of the trainer's.
  return s, s.init(jax.random.key(0))._replace(params=params, extra=extra)


@pytest.mark.parametrize('random_routing', [False, True])
def test_nmi_finds_a_router_that_follows_categories(random_routing):
  rng = np.random.default_rng(1)
  docs = [rng.choice(list(b'abcdefghij0123456789'), 300).astype(np.uint8).tobytes()
          for _ in range(6)]
  es = _eval_set(docs, seq_len=16, batch=4)
  s, state = _category_router_model()
  r = routes.collect(s, state, es, 'tokens_choose')
  assert len(r.position) == es.tokens
  labels = routes.label(es, data.ByteTokenizer(), tc.byte_classes)
  if random_routing:   # the same tokens, experts drawn uniformly
    r = r._replace(expert=rng.integers(0, 2, r.expert.shape).astype(np.int32))
  res = routes.analyse(r, labels, es, data.ByteTokenizer(), 2, 'tokens_choose')
  if random_routing:
    assert res['layers'][0]['nmi'] <= 0.05
    assert res['layers'][0]['category_explains'] <= 0.05
  else:
    assert res['layers'][0]['nmi'] >= 0.95
    assert res['layers'][0]['category_explains'] >= 0.95
    cat = labels.category[r.position]
    assert np.all(r.expert[0, cat == 0, 0] == 0) and np.all(r.expert[0, cat == 1, 0] == 1)


def test_dropped_fractions_agree_with_evaluation():
  # Capacity 4 of 16 slots per expert: most tokens are dropped. The routes'
  # per-layer dropped fraction is the evaluation's, computed independently.
  rng = np.random.default_rng(2)
  docs = [rng.choice(list(b'abc012'), 203).astype(np.uint8).tobytes() for _ in range(4)]
  es = _eval_set(docs, seq_len=16, batch=2)   # 48 rows of 17: no padding rows
  s, state = _category_router_model(eval_capacity_factor=0.5)
  r = routes.collect(s, state, es, 'tokens_choose')
  labels = routes.label(es, data.ByteTokenizer(), tc.byte_classes)
  res = routes.analyse(r, labels, es, data.ByteTokenizer(), 2, 'tokens_choose')
  metrics, _ = steps.evaluate(s, state, es)
  want = float(np.asarray(metrics['router'].dropped_fraction)[0])
  assert want > 0.3
  assert res['layers'][0]['dropped_fraction'] == pytest.approx(want, rel=1e-6)


def test_routes_under_a_mesh_equal_one_device():
  # Groups over the data axis, experts over the expert axis: the collected
  # routes are the single device's, token for token.
  rng = np.random.default_rng(3)
  docs = [rng.choice(list(b'abc012 '), 150).astype(np.uint8).tobytes() for _ in range(4)]
  es = _eval_set(docs, seq_len=16, batch=4)
  one = routes.collect(*_category_router_model(0.5), es, 'tokens_choose')
  mesh = routes.collect(*_category_router_model(0.5, (2, 2, 1)), es, 'tokens_choose')
  for a, b in zip(one, mesh):
    np.testing.assert_array_equal(a, b)
  assert not one.kept.all()                  # capacity 4 of 16: drops to agree on
