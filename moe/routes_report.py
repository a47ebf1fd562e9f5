"""The routes analysis of a checkpoint: workdir/routes/ with routes.json,
routes.md and three pictures (scripts/routes.py; moe.routes has the numbers).

  heatmap.png    per MoE layer, P(expert | category): where each kind of
                 token goes, with each category's share of the tokens
  code.png       a stretch of validation text, each byte coloured by the
                 top-1 expert of its token in one layer
  stability.png  per layer, the fraction of tokens whose top-1 expert at each
                 earlier checkpoint is the one at the analysed step
"""

from __future__ import annotations

import json
import os
import time

import jax
import matplotlib
import numpy as np
from etils import epath

from moe import data, eval_lib, routes, run_dir
from moe import token_categories as tc
from moe.config import ConfigError
from moe.run_config import RunConfig

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

CODE_LINES, CODE_COLUMNS = 40, 100
# Stability against earlier checkpoints is measured on every STABILITY_EVERY-th
# batch of the set: a quarter of its tokens pins a fraction to well under 1%.
STABILITY_EVERY = 4


def default_categories(data_name: str) -> str:
  return 'python' if data_name == 'python_stdlib' else 'bytes'


def is_current(workdir: str, step: int) -> bool:
  """Whether workdir/routes/ holds the analysis of the checkpoint at `step`."""
  path = epath.Path(workdir) / 'routes' / 'routes.json'
  return path.exists() and json.loads(path.read_text()).get('step') == step


def run(run: RunConfig, workdir: str, *, step: int = -1, stability: bool = True,
        layer: int | None = None, categories: str | None = None,
        code_document: int | None = None, code_line: int | None = None) -> dict:
  """Analyses `workdir`'s checkpoint at `step` (-1: the latest) on the eval
  set of its final evaluation and writes workdir/routes/. `stability`: also
  route every STABILITY_EVERY-th batch with every other saved checkpoint.
  `layer`: the MoE layer of the coloured code (default: the one whose experts follow categories most, by
  NMI). The pictured document and line default to the one with the most
  evaluated tokens, a third of the way in."""
  started = time.time()
  r = eval_lib.prepare(run, workdir)
  model = run.model
  if not model.is_moe:
    raise ConfigError('the routes analysis needs an MoE model; this config '
                      'has moe=None (dense).')
  num_layers = model.num_moe_layers
  if layer is not None and not 0 <= layer < num_layers:
    raise ConfigError(f'layer={layer} is not an MoE layer index; the model '
                      f'has {num_layers} MoE layers: 0..{num_layers - 1}.')
  categories = categories or default_categories(run.data.name)
  labeller = tc.get(categories)
  step = eval_lib.checkpoint_step(r, step, workdir)
  eval_set = eval_lib.final_eval_set(run)
  num_docs = eval_set.num_documents
  if code_document is not None and not 0 <= code_document < num_docs:
    raise ConfigError(f'code_document={code_document} is not a document of '
                      f'the eval set: 0..{num_docs - 1}.')
  tokenizer = data.get_tokenizer(run.data)
  labels = routes.label(eval_set, tokenizer, labeller)   # a bad labeller fails here
  doc, first_line = _code_place(eval_set, labels, code_document, code_line)
  router = model.moe.router
  main = routes.collect(r.trainer, eval_lib.restore(r, step, workdir), eval_set, router)
  unchanged = []
  if stability:
    for other in r.checkpoint_steps:
      if other != step:
        other_routes = routes.collect(
            r.trainer, eval_lib.restore(r, other, workdir), eval_set, router,
            every=STABILITY_EVERY)
        unchanged.append({'step': other, 'unchanged': routes.stability(other_routes, main)})
  result = routes.analyse(main, labels, eval_set, tokenizer,
                          model.moe.num_choices, router,
                          num_ffn=model.moe.num_experts)
  nmis = [x['nmi'] for x in result['layers']]
  layer = int(np.argmax(nmis)) if layer is None else layer
  result.update(
      step=step, router=router, top_k=model.moe.top_k,
      num_ffn_experts=model.moe.num_experts, adaptive=model.moe.adaptive,
      moe_blocks=[i for i in range(model.num_layers) if model.is_moe_layer(i)],
      categories_labeller=categories,
      eval_set={'whole_split': eval_set.whole_split,
                'tokens': eval_set.tokens, 'documents': eval_set.documents},
      stability=unchanged, code_layer=layer)
  result['code'] = {'document': doc, 'first_line': first_line, 'layer': layer}
  if jax.process_index() == 0:
    out = os.path.join(workdir, 'routes')
    _save(heatmap(result), out, 'heatmap.png')
    _save(code_picture(eval_set, main, labels, layer, doc, first_line, result), out, 'code.png')
    if unchanged:
      _save(stability_plot(result), out, 'stability.png')
    if model.moe.adaptive:
      _save(compute_plot(result), out, 'compute.png')
    result['seconds'] = time.time() - started
    run_dir.write_text(out, 'routes.json', json.dumps(result, indent=1))
    run_dir.write_text(out, 'routes.md', markdown(result))
  return result


def _save(fig, directory: str, name: str) -> None:
  """The figure as a PNG in `directory` (local or gs://)."""
  run_dir.write_figure(os.path.join(directory, name), fig, dpi=120)
  plt.close(fig)


# --- Pictures ----------------------------------------------------------------

def _expert_colours(e: int) -> np.ndarray:
  cmap = plt.get_cmap('tab10' if e <= 10 else 'tab20' if e <= 20 else 'hsv')
  return np.array([cmap(i if e <= 20 else i / e) for i in range(e)])


def heatmap(result: dict):
  """P(expert | category) per MoE layer, categories with tokens only."""
  names, share = result['categories'], np.array(result['category_share'])
  rows = np.flatnonzero(share > 0)
  layers = result['layers']
  e = len(layers[0]['expert_load'])
  fig, axes = plt.subplots(1, len(layers), squeeze=False,
                           figsize=(1.2 + (0.45 * e + 0.6) * len(layers),
                                    1.2 + 0.38 * len(rows)))
  for ax, lay in zip(axes[0], layers):
    counts = np.array(lay['counts'], np.float64)[rows]
    p = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    ax.imshow(p, cmap='viridis', vmin=0, vmax=1, aspect='auto')
    for (i, j), v in np.ndenumerate(p):
      ax.text(j, i, f'{100 * v:.0f}', ha='center', va='center', fontsize=6,
              color='white' if v < 0.6 else 'black')
    ax.set_xticks(range(e))
    ax.set_xlabel('expert')
    ax.set_title(f"MoE layer {lay['layer']} (NMI {lay['nmi']:.2f})", fontsize=9)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f'{names[i]} ({100 * share[i]:.1f}%)' for i in rows]
                       if ax is axes[0][0] else [], fontsize=8)
  fig.suptitle(f"Where each kind of token goes: % of a category's tokens per "
               f"top-1 expert (step {result['step']})", fontsize=10)
  fig.tight_layout()
  return fig


def _doc_text(labels: routes.Labels, starts: np.ndarray, document: int) -> bytes:
  lo, hi = int(starts[document]), int(starts[document + 1])
  return labels.text[int(labels.end[lo] - labels.length[lo]):int(labels.end[hi - 1])]


def _code_place(eval_set: data.EvalSet, labels: routes.Labels,
                document: int | None, line: int | None) -> tuple[int, int]:
  """The pictured document (default: the one with the most evaluated tokens)
  and first line (default: a third of the way in); refuses a line past the
  document's end."""
  starts = eval_set.starts
  if document is None:
    document = int(np.argmax(np.bincount(eval_set.documents_of_targets(),
                                         minlength=len(starts) - 1)))
  lines = _doc_text(labels, starts, document).count(b'\n') + 1
  if line is None:
    line = max(1, lines // 3)
  if line > lines:
    raise ConfigError(f'code_line={line} is past the end of document {document}, '
                      f'which has {lines} lines.')
  return document, line


def code_picture(eval_set: data.EvalSet, main: routes.Routes,
                 labels: routes.Labels, layer: int, document: int,
                 first_line: int, result: dict):
  """CODE_LINES lines of `document` from `first_line` (1-based), each byte
  on the colour of its token's top-1 expert in `layer`."""
  starts = eval_set.starts
  lo, hi = int(starts[document]), int(starts[document + 1])
  expert = np.full(len(eval_set.stream), -2, np.int64)        # -2: not evaluated
  expert[main.position] = main.expert[layer, :, 0]
  dropped = np.zeros(len(eval_set.stream), bool)
  first = main.expert[layer, :, 0]
  dropped[main.position] = ~main.kept[layer, :, 0] & (first < result['num_ffn_experts'])
  text = _doc_text(labels, starts, document)
  per_byte = np.repeat(np.where(dropped, -1, expert)[lo:hi], labels.length[lo:hi])
  lines, owners, at = [], [], 0
  for i, raw in enumerate(text.split(b'\n')):
    if first_line <= i + 1 < first_line + CODE_LINES:
      lines.append(raw[:CODE_COLUMNS])
      owners.append(per_byte[at:at + min(len(raw), CODE_COLUMNS)])
    at += len(raw) + 1
  e = len(result['layers'][layer]['expert_load'])
  colours = _expert_colours(e)
  grid = np.ones((max(len(lines), 1), CODE_COLUMNS, 4))
  for r, own in enumerate(owners):
    for c, x in enumerate(own):
      grid[r, c] = (colours[x] * [1, 1, 1, 0.55] if x >= 0 else
                    (0.55, 0.55, 0.55, 1.0) if x == -1 else (1, 1, 1, 1))
  fig, ax = plt.subplots(figsize=(CODE_COLUMNS * 0.085 + 0.5, len(grid) * 0.2 + 1.6))
  ax.imshow(grid, aspect='auto', interpolation='nearest', extent=(0, CODE_COLUMNS, len(grid), 0))
  for r, raw in enumerate(lines):
    for c, b in enumerate(raw):
      if 32 < b < 127:
        ax.text(c + 0.5, r + 0.5, chr(b), ha='center', va='center', family='monospace', fontsize=7)
  ax.set_axis_off()
  load = result['layers'][layer]['expert_load']
  handles = [Patch(color=colours[x] * [1, 1, 1, 0.55],
                   label=f'expert {x} ({100 * load[x]:.0f}%)') for x in range(e)]
  handles.append(Patch(color=(0.55, 0.55, 0.55), label='dropped'))
  fig.legend(handles=handles, loc='lower center', ncol=min(len(handles), 6),
             fontsize=7, frameon=False)
  ax.set_title(f"Document {document}, lines {first_line}-"
               f"{first_line + len(lines) - 1}: top-1 expert of each token in "
               f"MoE layer {layer} (step {result['step']})", fontsize=9)
  fig.tight_layout(rect=(0, 0.4 / fig.get_figheight() * (1 + e // 6), 1, 1))
  return fig


def compute_plot(result: dict):
  """FFN experts per token against the token's own loss (equal-count loss
  bins), per layer, and by category (adaptive compute)."""
  c = result['compute']
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2))
  for l, row in enumerate(c['by_loss_bin']):
    left.plot(c['loss_bin_mean'], row, 'o-', label=f'MoE layer {l}')
  left.set_xlabel(f"the token's own loss (mean of each of {routes.LOSS_BINS} "
                  'equal-count bins, nats)')
  left.set_ylabel('FFN experts per token')
  left.set_title('Do hard tokens get more compute?')
  left.grid(alpha=0.3)
  left.legend(fontsize=8)
  names, shares = result['categories'], result['category_share']
  shown = [i for i, s in enumerate(shares) if s >= 0.001]
  width = 0.8 / max(len(c['by_category']), 1)
  for l, row in enumerate(c['by_category']):
    right.bar(np.arange(len(shown)) + l * width, [row[i] or 0.0 for i in shown], width,
              label=f'layer {l}')
  right.set_xticks(np.arange(len(shown)) + 0.4 - width / 2)
  right.set_xticklabels([names[i] for i in shown], rotation=45, ha='right', fontsize=8)
  right.set_ylabel('FFN experts per token')
  right.set_title('By category (categories with >= 0.1% of the tokens)')
  right.legend(fontsize=7)
  fig.tight_layout()
  return fig


def stability_plot(result: dict):
  rows = sorted(result['stability'], key=lambda x: x['step'])
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  steps = [x['step'] for x in rows] + [result['step']]
  for l in range(len(result['layers'])):
    ax.plot(steps, [x['unchanged'][l] for x in rows] + [1.0], marker='o', label=f'MoE layer {l}')
  ax.set_xlabel('checkpoint step')
  ax.set_ylabel(f"top-1 expert as at step {result['step']}")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


# --- The page ----------------------------------------------------------------

def _code(text: str) -> str:
  """A markdown code span that holds backticks too."""
  return f'`` {text} ``' if '`' in text else f'`{text}`'


def markdown(result: dict) -> str:
  names = result['categories']
  share, loss = result['category_share'], result['category_loss']
  layers = result['layers']
  ev = result['eval_set']
  where = 'the whole validation split' if ev['whole_split'] else 'the eval set'
  out = [f"# Routes at step {result['step']}", '',
         f"{result['tokens']:,} routed tokens of {where} ({ev['documents']} "
         f"documents), categories by the `{result['categories_labeller']}` "
         f"labeller; router {result['router']}, top-{result['top_k']}, MoE "
         f"layers in blocks {result['moe_blocks']}. "
         'NMI: normalized mutual information between a token\'s category and '
         'its top-1 expert (1: the same partition of the tokens, 0: '
         'independent). Explained: the share of the top-1 expert\'s entropy '
         'that the category, or the token itself, accounts for (1: it decides '
         'the expert).', '',
         '| MoE layer | NMI (category) | explained by category | explained by '
         'token | dead experts | load max / mean | dropped |',
         '|---|---|---|---|---|---|---|']
  for lay in layers:
    load = np.array(lay['expert_load'])
    out.append(f"| {lay['layer']} | {lay['nmi']:.3f} | "
               f"{100 * lay['category_explains']:.1f}% | "
               f"{100 * lay['token_explains']:.1f}% | {lay['dead_experts']} | "
               f"{load.max() / load.mean():.2f} | "
               f"{100 * lay['dropped_fraction']:.2f}% |")
  out += ['', '## Categories', '',
          '| category | share of routed tokens | loss predicting it | '
          + ' | '.join(f"dropped, layer {l['layer']}" for l in layers) + ' |',
          '|---|---|---|' + '---|' * len(layers)]
  for i, name in enumerate(names):
    if share[i] == 0:
      continue
    drops = ' | '.join(f"{100 * l['dropped_by_category'][i]:.2f}%" for l in layers)
    out.append(f'| {name} | {100 * share[i]:.1f}% | {loss[i]:.3f} | {drops} |')
  for lay in layers:
    out += ['', f"## MoE layer {lay['layer']}: what each expert takes", '',
            '| expert | load (all choices) | most over-represented category (× '
            'its share) | most frequent tokens (share of that token\'s '
            'occurrences whose first choice it is) | most frequent 8-byte '
            'contexts |', '|---|---|---|---|---|']
    for x in lay['experts']:
      toks = ', '.join(f"{_code(t['token'])} {100 * t['share_of_token']:.0f}%"
                       for t in x['tokens'][:6])
      ctx = ', '.join(_code(c['context']) for c in x['contexts'][:4])
      top = (f"{x['top_category']} (×{x['top_category_lift']:.1f})" if x['top_category'] else '—')
      out.append(f"| {x['expert']} | {100 * x['load']:.1f}% | {top} | {toks} | {ctx} |")
  if result['adjacent_layers']:
    out += ['', '## From one MoE layer to the next', '',
            '| layers | NMI | next expert guessed from this one | guessing '
            'the most loaded |', '|---|---|---|---|']
    for l, a in enumerate(result['adjacent_layers']):
      out.append(f"| {l} → {l + 1} | {a['nmi']:.3f} | {100 * a['predicted']:.1f}% "
                 f"| {100 * a['baseline']:.1f}% |")
  if result['stability']:
    out += ['', '## Routing stability over training', '',
            f"Fraction of tokens whose top-1 expert is the one at step "
            f"{result['step']} (among tokens routed at both):", '',
            '| step | ' + ' | '.join(f"layer {l['layer']}" for l in layers)
            + ' |', '|---|' + '---|' * len(layers)]
    for row in sorted(result['stability'], key=lambda x: x['step']):
      out.append(f"| {row['step']} | "
                 + ' | '.join(f'{100 * u:.1f}%' for u in row['unchanged']) + ' |')
    out += ['', '![stability](stability.png)']
  if result.get('adaptive'):
    out += _where_the_compute_went(result)
  code = result.get('code', {})
  out += ['', '## Pictures', '', '![heatmap](heatmap.png)', '',
          f"Document {code.get('document')}, from line {code.get('first_line')}, "
          f"coloured by MoE layer {code.get('layer')}'s top-1 expert:", '',
          '![code](code.png)', '']
  return '\n'.join(out)


def _where_the_compute_went(result: dict) -> list[str]:
  """The page's section on adaptive compute: FFN experts per token by loss and category."""
  c, e = result['compute'], result['num_ffn_experts']
  columns = ' | '.join(f"layer {l['layer']}" for l in result['layers']) + ' |'
  rule = '|---|' + '---|' * len(result['layers'])
  out = ['', '## Where the compute went', '',
         f'Experts {e} and above are cheap (zero, copy, constant). FFN experts that '
         f'processed a token (kept choices of experts 0..{e - 1}), by the token\'s own '
         'loss (equal-count bins):', '', '| loss bin (mean, nats) | ' + columns, rule]
  for b, mean in enumerate(c['loss_bin_mean']):
    out.append(f'| {mean:.3f} | ' + ' | '.join(f'{row[b]:.3f}' for row in c['by_loss_bin']) + ' |')
  out += ['', '| category | ' + columns, rule]
  for i, name in enumerate(result['categories']):
    if result['category_share'][i] >= 0.001:
      out.append(f'| {name} | ' + ' | '.join(f'{row[i]:.3f}' for row in c['by_category']) + ' |')
  return out + ['', '![compute](compute.png)']
