"""What the experts learned: every evaluated token's routing, by category.

`collect` runs a checkpoint over the evaluation set (the one eval.py and the
training run's final evaluation use) and keeps, for every MoE layer and every
routed token, its chosen experts in the router's order (its first choice
first), their gates and whether each was kept. The routed token at input
position j is the one the model reads there; the loss at j is that of
predicting the next token. A token's category is the labeller's category
(moe.token_categories) of its bytes: of its first non-whitespace byte, for
tokens of several bytes; tokens that stand for no bytes (EOS) are
'end of text'.

`analyse` turns that into numbers (JSON-able):
  * per layer, between a token's category C and its top-1 expert E: the
    normalized mutual information NMI = I(C; E) / ((H(C) + H(E)) / 2)
    (1 when the two are the same partition of the tokens, ~0 when
    independent) and the share of the expert's entropy the category
    explains, I(C; E) / H(E) (1 when the category decides the expert);
    the same share for the token itself (`token_explains`: routing by token
    identity; its plug-in estimate is biased up by about
    (V - 1)(E - 1) / (2 N H(E)) for V distinct tokens in N); per-expert
    load over the whole set (fraction of all k choices, not per step) and
    dead experts; the category x expert count matrix (top-1); the dropped
    fraction per category; per expert its most frequent tokens (with the
    share of each token's occurrences whose first choice it is) and its
    most frequent 8-byte contexts (the bytes of the token's document
    ending with the token's last byte).
  * per category: its share of the routed tokens, and the model's mean loss
    on the tokens of that category (predicting them).
  * across depth: for adjacent MoE layers, NMI between their top-1 experts
    and how often the next layer's expert is the one most often paired with
    this layer's (against always guessing its most loaded expert).
  * where the compute went (adaptive compute: cheap experts, threshold
    routing): per layer the FFN experts that processed a token (kept
    choices of experts < num_ffn), on average, by category, and by the
    token's own loss (tokens in LOSS_BINS equal-count bins of the loss of
    the prediction made at their position): do hard tokens get more?
`stability` compares two checkpoints of one run: per layer, the fraction of
tokens, among those routed at both, whose top-1 expert is unchanged
(StableMoE, Dai et al. 2022).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from moe import data
from moe import token_categories as tc
from moe.steps import Trainer, TrainState

CONTEXT_BYTES = 8
LOSS_BINS = 10


class Routes(NamedTuple):
  """The routing of every token of an eval set (padding rows left out)."""
  position: np.ndarray    # int64 [N]: the routed token's index in the set's stream
  expert: np.ndarray      # int32 [L, N, K]: choices, first choice first; -1: none
  kept: np.ndarray        # bool [L, N, K]: the choice reached its expert
  gate: np.ndarray        # float32 [L, N, K]
  token_loss: np.ndarray  # float32 [N]: the loss of predicting the next token


def collect(s: Trainer, state: TrainState, eval_set: data.EvalSet,
            router: str, every: int = 1) -> Routes:
  """Runs `eval_set` once with routes=True (see the module doc), or every
  `every`-th batch of it; `router` is the model's moe.router."""
  parts = []
  for i, batch in enumerate(eval_set):
    if i % every:
      continue
    tokens = data.global_batch(batch.tokens, s.batch_sharding)
    m = jax.device_get(s.eval_step(state, tokens, None, True))
    r, rows = m['router'].routes, batch.weights > 0      # [L, B, T, K], [B]
    l, k = r.expert_index.shape[0], r.expert_index.shape[-1]
    parts.append(Routes(
        (batch.positions[rows] - 1).ravel(),
        r.expert_index[:, rows].reshape(l, -1, k),
        r.kept[:, rows].reshape(l, -1, k),
        r.gate[:, rows].reshape(l, -1, k),
        m['token_loss'][rows].ravel()))
  per_token = {'position', 'token_loss'}       # [N]; the rest are [L, N, K]
  routes = Routes(*(np.concatenate(a, axis=0 if name in per_token else 1)
                    for name, a in zip(Routes._fields, zip(*parts))))
  return routes if router == 'tokens_choose' else _best_first(routes)


def _best_first(r: Routes) -> Routes:
  """Experts-choose lists all E experts per token, most of which did not
  take it: order them by gate, the ones that took it first, the others -1.
  (Tokens-choose already lists its top-k best first, kept or not.)"""
  score = np.where(r.kept, r.gate, -1.0)
  order = np.argsort(-score, axis=-1, kind='stable')
  take = lambda a: np.take_along_axis(a, order, axis=-1)
  kept = take(r.kept)
  return r._replace(expert=np.where(kept, take(r.expert), -1), kept=kept,
                    gate=take(r.gate))


# --- Token categories --------------------------------------------------------

class Labels(NamedTuple):
  """Category and bytes of every token of an eval set's stream."""
  names: tuple[str, ...]   # category names; the last is 'end of text'
  category: np.ndarray     # int16 [len(stream)]
  text: bytes              # every document's bytes, one after another
  end: np.ndarray          # int64 [len(stream)]: each token's end in `text`
  length: np.ndarray       # int64 [len(stream)]: bytes of each token


def label(eval_set: data.EvalSet, tokenizer, labeller) -> Labels:
  """Runs `labeller` on each document's bytes and gives every token the
  category of its first non-whitespace byte (module doc)."""
  stream, starts = eval_set.stream, eval_set.starts
  table = {}
  names = tuple(labeller.CATEGORIES) + (tc.END_OF_TEXT,)
  eot = len(names) - 1
  category = np.full(len(stream), eot, np.int16)
  lengths = np.zeros(len(stream), np.int64)
  texts = []
  for d in range(len(starts) - 1):
    toks = stream[starts[d]:starts[d + 1]]
    pieces = []
    for t in toks.tolist():
      if t not in table:
        table[t] = tokenizer.token_bytes(t)
      pieces.append(table[t])
    text = b''.join(pieces)
    texts.append(text)
    n = np.fromiter((len(p) for p in pieces), np.int64, len(pieces))
    lengths[starts[d]:starts[d + 1]] = n
    if not text:
      continue
    labels = np.asarray(labeller(text), np.int64)
    if labels.shape != (len(text),) or labels.min() < 0 or labels.max() >= eot:
      raise ValueError(f'the labeller gave labels of shape {labels.shape} in '
                       f'[{labels.min()}, {labels.max()}] for {len(text)} bytes;'
                       f' it must give one index < {eot} per byte.')
    begin = np.cumsum(n) - n
    cat = category[starts[d]:starts[d + 1]]
    one = n == 1
    cat[one] = labels[begin[one]]
    for i in np.flatnonzero(n > 1):   # several bytes: the first non-space one
      piece = pieces[i]
      j = len(piece) - len(piece.lstrip())
      cat[i] = labels[begin[i] + (j if j < len(piece) else 0)]
  text = b''.join(texts)
  return Labels(names, category, text, np.cumsum(lengths), lengths)


# --- Statistics ----------------------------------------------------------------

def _entropy(counts: np.ndarray) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def _information(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
  """(I(A; B), H(A), H(B)) in nats, plug-in, of two label arrays."""
  if len(a) == 0:
    return 0.0, 0.0, 0.0
  _, ai = np.unique(a, return_inverse=True)
  _, bi = np.unique(b, return_inverse=True)
  joint = np.bincount(ai * (bi.max() + 1) + bi).astype(np.float64)
  ha = _entropy(np.bincount(ai).astype(np.float64))
  hb = _entropy(np.bincount(bi).astype(np.float64))
  return max(ha + hb - _entropy(joint), 0.0), ha, hb


def nmi(a: np.ndarray, b: np.ndarray) -> float:
  """Normalized mutual information (arithmetic mean of the entropies): 1
  when a and b partition the items alike, 0 when independent or constant."""
  mutual, ha, hb = _information(a, b)
  return 0.0 if ha + hb == 0 else mutual / ((ha + hb) / 2)


def explained(a: np.ndarray, b: np.ndarray) -> float:
  """I(A; B) / H(B): the share of b's entropy that a explains, 1 when a
  decides b (0 for a constant b)."""
  mutual, _, hb = _information(a, b)
  return 0.0 if hb == 0 else mutual / hb


def _shown(token: bytes) -> str:
  """A token's bytes, readable in a table: spaces as '␣', escapes for the rest."""
  text = token.decode('utf-8', 'backslashreplace')
  return (text.replace('\\', '\\\\').replace('\n', '\\n').replace('\t', '\\t')
          .replace(' ', '\u2423').replace('|', '\\|') or '(none)')


def _context_keys(labels: Labels, positions: np.ndarray,
                  starts: np.ndarray) -> np.ndarray:
  """The last CONTEXT_BYTES bytes of each token's document up to its last
  byte, as uint64 keys (shorter contexts near a document's start)."""
  raw = np.frombuffer(labels.text, np.uint8)
  raw = np.concatenate([np.zeros(CONTEXT_BYTES, np.uint8), raw])
  first = starts[np.searchsorted(starts, positions, side='right') - 1]
  doc_begin = labels.end[first] - labels.length[first] + CONTEXT_BYTES
  end = labels.end[positions] + CONTEXT_BYTES
  key = np.zeros(len(positions), np.uint64)
  for i in range(CONTEXT_BYTES):
    at = end - CONTEXT_BYTES + i
    byte = np.where(at >= doc_begin, raw[at], 0).astype(np.uint64)
    key = (key << np.uint64(8)) | byte
  return key


def _key_bytes(key: int) -> bytes:
  return int(key).to_bytes(CONTEXT_BYTES, 'big').lstrip(b'\0')


class _Tokens(NamedTuple):
  """The routed tokens, as the per-layer and per-expert statistics read them."""
  names: tuple[str, ...]   # category names
  cat: np.ndarray          # int64 [N]: each routed token's category
  tok: np.ndarray          # int64 [N]: its token
  contexts: np.ndarray     # uint64 [N]: its context (_context_keys)
  cat_tokens: np.ndarray   # int64 [len(names)]: routed tokens per category
  all_counts: np.ndarray   # int64: routed tokens per token
  tokenizer: object        # shows a token's bytes
  top: int                 # tokens and contexts listed per expert


def analyse(routes: Routes, labels: Labels, eval_set: data.EvalSet, tokenizer,
            num_experts: int, router: str, top: int = 8,
            num_ffn: int | None = None) -> dict:
  """The statistics of the module doc, JSON-able. `num_experts`: the
  router's choices (with cheap experts, E FFN experts then the cheap ones;
  `num_ffn` = E). Dropped: a tokens-choose FFN choice whose expert was
  full, as a share of the FFN choices made (cheap choices and those a
  threshold did not take are neither); an experts-choose token no expert
  took."""
  ffn = num_experts if num_ffn is None else num_ffn
  num_cat = len(labels.names)
  cat = labels.category[routes.position].astype(np.int64)           # [N]
  tok = eval_set.stream[routes.position].astype(np.int64)            # [N]
  t = _Tokens(labels.names, cat, tok, _context_keys(labels, routes.position, eval_set.starts),
              np.bincount(cat, minlength=num_cat), np.bincount(tok), tokenizer, top)
  # The loss of predicting each target, by the target's category.
  target_cat = labels.category[routes.position + 1].astype(np.int64)
  target_tokens = np.bincount(target_cat, minlength=num_cat)
  loss_sum = np.bincount(target_cat, routes.token_loss.astype(np.float64), num_cat)
  top1 = routes.expert[:, :, 0]                                        # [L, N]
  return {'tokens': int(len(cat)), 'categories': list(labels.names),
          'category_share': (t.cat_tokens / len(cat)).tolist(),
          'category_loss': [float(s / n) if n else None for s, n in zip(loss_sum, target_tokens)],
          'layers': [_layer(routes, l, t, num_experts, ffn, router) for l in range(len(top1))],
          'adjacent_layers': [_adjacent(top1[l], top1[l + 1], num_experts)
                              for l in range(len(top1) - 1)],
          'compute': _compute(routes, cat, num_cat, ffn)}


def _layer(routes: Routes, l: int, t: _Tokens, e: int, ffn: int, router: str) -> dict:
  """MoE layer l's statistics (module doc), what each of its experts takes included."""
  first = routes.expert[l, :, 0]
  routed = first >= 0
  counts = np.zeros((len(t.names), e), np.int64)
  np.add.at(counts, (t.cat[routed], first[routed]), 1)
  choices = routes.expert[l][routes.expert[l] >= 0]
  load = np.bincount(choices, minlength=e) / max(len(choices), 1)
  if router == 'tokens_choose':   # FFN choices made whose expert was full
    made = (routes.expert[l] >= 0) & (routes.expert[l] < ffn)           # [N, K]
    dropped = made & ~routes.kept[l]
  else:                             # tokens nobody took
    made = np.ones((len(t.cat), 1), bool)
    dropped = ~routes.kept[l].any(-1, keepdims=True)                   # [N, 1]
  drop_sum = np.bincount(t.cat, dropped.sum(-1), len(t.names))
  made_sum = np.bincount(t.cat, made.sum(-1), len(t.names))
  return {'layer': l,
          'nmi': nmi(t.cat[routed], first[routed]),
          'category_explains': explained(t.cat[routed], first[routed]),
          'token_explains': explained(t.tok[routed], first[routed]),
          'expert_load': load.tolist(),
          'dead_experts': int((load == 0).sum()),
          'dropped_fraction': float(dropped.sum() / max(made.sum(), 1)),
          'dropped_by_category': [float(s / n) if n else None for s, n in zip(drop_sum, made_sum)],
          'counts': counts.tolist(),
          'experts': [_expert(x, first == x, counts[:, x], load[x], t) for x in range(e)]}


def _expert(x: int, mine: np.ndarray, counts: np.ndarray, load: float, t: _Tokens) -> dict:
  """What expert x takes (module doc); `mine`: the tokens whose first choice it is."""
  tok_counts = np.bincount(t.tok[mine], minlength=len(t.all_counts))
  best = np.argsort(-tok_counts, kind='stable')[:t.top]
  keys, key_counts = np.unique(t.contexts[mine], return_counts=True)
  best_ctx = np.argsort(-key_counts, kind='stable')[:t.top]
  share = counts / max(counts.sum(), 1)
  # The category it takes most often relative to the category's share of all tokens,
  # among categories with >= 20 of its tokens and >= 0.1% of all (not the 35 EOS of a split).
  lift = (share / np.maximum(t.cat_tokens / len(t.cat), 1e-12)
          * (counts >= 20) * (t.cat_tokens >= 0.001 * len(t.cat)))
  return {'expert': x, 'load': float(load),
          'top_category': t.names[int(np.argmax(lift))] if lift.any() else None,
          'top_category_lift': float(lift.max()),
          'category_share': share.tolist(),
          'tokens': [{'token': _shown(t.tokenizer.token_bytes(int(i))), 'count': int(tok_counts[i]),
                      'share_of_token': float(tok_counts[i] / t.all_counts[i])}
                     for i in best if tok_counts[i] > 0],
          'contexts': [{'context': _shown(_key_bytes(keys[i])),
                        'count': int(key_counts[i])} for i in best_ctx]}


def _compute(routes: Routes, cat: np.ndarray, num_cat: int, num_ffn: int) -> dict:
  """FFN experts per token (kept FFN choices) per layer: mean, by category
  and by bins of the token's own loss (module doc)."""
  ffn = (routes.kept & (routes.expert >= 0) & (routes.expert < num_ffn)).sum(-1)  # [L, N]
  loss = routes.token_loss.astype(np.float64)
  order = np.argsort(loss, kind='stable')
  bins = np.empty(len(loss), np.int64)
  bins[order] = np.arange(len(loss)) * LOSS_BINS // max(len(loss), 1)
  per_bin = np.maximum(np.bincount(bins, minlength=LOSS_BINS), 1)
  per_cat = np.bincount(cat, minlength=num_cat)
  return {
      'ffn_per_token': ffn.mean(-1).tolist(),
      'by_category': [[float(x / n) if n else None for x, n in
                       zip(np.bincount(cat, f, num_cat), per_cat)] for f in ffn],
      'loss_bin_mean': (np.bincount(bins, loss, LOSS_BINS) / per_bin).tolist(),
      'by_loss_bin': [(np.bincount(bins, f, LOSS_BINS) / per_bin).tolist() for f in ffn],
  }


def _adjacent(a: np.ndarray, b: np.ndarray, e: int) -> dict:
  """How strongly layer l's top-1 expert (a) predicts layer l+1's (b)."""
  both = (a >= 0) & (b >= 0)
  joint = np.zeros((e, e), np.int64)
  np.add.at(joint, (a[both], b[both]), 1)
  n = max(int(both.sum()), 1)
  return {'nmi': nmi(a[both], b[both]),
          'predicted': float(joint.max(1).sum() / n),
          'baseline': float(joint.sum(0).max() / n)}


def stability(a: Routes, b: Routes) -> list[float]:
  """Per layer, the fraction of tokens with the same top-1 expert in two
  collections of one eval set (over the tokens both hold), among tokens
  routed in both (an experts-choose token no expert took has none)."""
  _, ia, ib = np.intersect1d(a.position, b.position, return_indices=True)
  if not len(ia):
    raise ValueError('stability compares routes of the same eval set.')
  x, y = a.expert[:, ia, 0], b.expert[:, ib, 0]                     # [L, N]
  both = (x >= 0) & (y >= 0)
  same = np.sum((x == y) & both, axis=1) / np.maximum(np.sum(both, axis=1), 1)
  return [float(v) for v in same]
