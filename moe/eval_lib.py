"""Evaluates a checkpoint under the current mesh: loss, perplexity, bits per
byte, per-layer expert load, and a capacity what-if.

Evaluated on the set of the training run's final evaluation
(`final_eval_batches`; 0, the default, is the whole validation split);
eval.json states its tokens and documents. The what-if evaluates the same
validation batches once per factor in
`eval.capacity_factors` ('dropless': room for every token), so the dropped
fraction and the loss can be read side by side; the model's own
`eval_capacity_factor` row is what training-time evals report. Bits per
byte divide the evaluated targets' loss by the bytes those targets stand for.

The compute what-if (`eval.compute_what_if`, moe.routing.compute_what_if)
evaluates the same checkpoint with less or more compute per token:
threshold routing at several p, or the cheap experts switched off, each row
without capacity drops, so that it reads as compute against loss alone: the
FFN experts per token actually taken (per layer too), the forward FLOPs per
token they cost, and the loss. A curve from one model, drawn in
workdir/compute_what_if.png.
"""

from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

import jax
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from moe import checkpoint, data, preflight, routing, run_dir, steps  # noqa: E402
from moe import metrics as metrics_lib  # noqa: E402
from moe.checkpoint import CheckpointError  # noqa: E402
from moe.config import ModelConfig  # noqa: E402
from moe.run_config import RunConfig  # noqa: E402


class Prepared(NamedTuple):
  """A run's checkpoints, ready to restore on this machine's mesh."""
  trainer: steps.Trainer
  checkpoint_steps: list[int]       # every step saved in the run


def prepare(run: RunConfig, workdir: str) -> Prepared:
  """Checks `run` against this machine and builds its steps on the current
  mesh, before anything is restored (bad input fails here, cheaply)."""
  mesh = preflight.check(run, workdir, writes=False)
  return Prepared(steps.build(run, mesh), checkpoint.checkpoint_steps(workdir))


def checkpoint_step(r: Prepared, step: int, workdir: str) -> int:
  """`step`, or the latest for step < 0; refuses a step that was not saved."""
  if step < 0 and r.checkpoint_steps:
    step = r.checkpoint_steps[-1]
  if step not in r.checkpoint_steps:
    raise CheckpointError(
        f'no checkpoint at step {step} in {workdir}/checkpoints; available '
        f'steps: {r.checkpoint_steps or "none (train first)"}.')
  return step


def restore(r: Prepared, step: int, workdir: str) -> steps.TrainState:
  """The state saved at `step` (see `checkpoint_step`), on this mesh."""
  return checkpoint.read_state(workdir, step, r.trainer.abstract_state, r.trainer.state_shardings)


def final_eval_set(run: RunConfig) -> data.EvalSet:
  """This process's rows of the training run's final evaluation
  (final_eval_batches; 0: the whole split)."""
  return data.eval_set(run.data, seq_len=run.loop.seq_len,
                       batch_size=run.loop.batch_size // jax.process_count(),
                       max_batches=run.loop.final_eval_batches or None)


def run_eval(run: RunConfig, workdir: str) -> dict:
  """Restores `workdir`'s checkpoint, evaluates, writes workdir/eval.json."""
  r = prepare(run, workdir)
  step = checkpoint_step(r, run.eval.checkpoint_step, workdir)
  state, t, loop = restore(r, step, workdir), r.trainer, run.loop

  eval_set = final_eval_set(run)   # also for every row of the what-if
  # Bits per byte of what was evaluated: its targets' bytes, not the split's.
  tokens_per_byte = eval_set.tokens / max(eval_set.target_bytes(data.get_tokenizer(run.data)), 1)

  result = metrics_lib.summarize(steps.evaluate(t, state, eval_set)[0])
  loss = result['loss']
  result.update(step=step, perplexity=math.exp(min(loss, 700.0)),
                bits_per_byte=loss / math.log(2) * tokens_per_byte,
                eval_set='whole split' if eval_set.whole_split else
                f'{eval_set.rows} rows spread over the split')
  if run.model.is_moe:
    # Every row is its own pass with the factor given explicitly, the
    # model's own factor too: that row and the headline numbers above agree
    # only if the override and the configured capacity are the same program.
    result['capacity_what_if'] = [
        {'capacity_factor': cf,
         **{k: v for k, v in metrics_lib.summarize(
             steps.evaluate(t, state, eval_set, cf)[0]).items()
            if k in ('loss', 'dropped_fraction', 'per_layer/dropped_fraction')}}
        for cf in run.eval.capacity_factors]
    rows = routing.compute_what_if(run.model.moe, run.eval.compute_what_if)
    if rows:
      result['compute_what_if'] = [
          compute_row(run.model, loop.seq_len, label, override,
                      steps.evaluate(t, state, eval_set, 'dropless', override)[0])
          for label, override in rows]
  if jax.process_index() == 0:
    run_dir.write_text(workdir, 'eval.json', json.dumps(result, indent=2))
    if 'compute_what_if' in result:
      plot_compute_what_if(result['compute_what_if'], os.path.join(workdir, 'compute_what_if.png'))
  return result


def compute_row(model: ModelConfig, seq_len: int, label: str, override, metrics) -> dict:
  """One row of the compute what-if from `evaluate`'s metrics."""
  m = metrics_lib.summarize(metrics)
  ffn = m['per_layer/ffn_experts_per_token']
  return {'setting': label, 'top_p': None if override is None else override.top_p,
          'cheap_experts': override is None or override.cheap_experts,
          'loss': m['loss'], 'ffn_experts_per_token': m['ffn_experts_per_token'],
          'per_layer/ffn_experts_per_token': ffn,
          'forward_flops_per_token': model.flops_per_token(seq_len, ffn) / 3}


def plot_compute_what_if(rows: list[dict], path: str) -> None:
  """Loss against forward FLOPs per token: every row (left), and the
  threshold rows with the model as trained, zoomed (right)."""
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  thresholds = sorted((r for r in rows if r['top_p'] is not None),
                      key=lambda r: r['forward_flops_per_token'])
  others = [r for r in rows if r['top_p'] is None]
  mflops = lambda rs: [r['forward_flops_per_token'] / 1e6 for r in rs]
  for ax in axes:
    if thresholds:
      ax.plot(mflops(thresholds), [r['loss'] for r in thresholds], 'o-', color='C0',
              label='threshold routing at p')
    for r, marker, colour in zip(others, '*s^', ('C1', 'C3', 'C2')):
      ax.plot(mflops([r]), [r['loss']], marker, color=colour, markersize=10,
              label=f"{r['setting']} ({r['ffn_experts_per_token']:.2f} FFN experts)")
    ax.set_xlabel('forward MFLOPs per token (FFN experts actually taken)')
    ax.grid(alpha=0.3)
  for r in thresholds:
    axes[1].annotate(f"p={r['top_p']:g}: {r['ffn_experts_per_token']:.3f}",
                     (r['forward_flops_per_token'] / 1e6, r['loss']), fontsize=7,
                     textcoords='offset points', xytext=(3, 5), rotation=30)
  zoomed = thresholds + [r for r in others if r['cheap_experts']]
  if zoomed:
    losses = [r['loss'] for r in zoomed]
    pad = max(max(losses) - min(losses), 1e-4)
    axes[1].set_ylim(min(losses) - pad, max(losses) + 2 * pad)
    xs = mflops(zoomed)
    axes[1].set_xlim(min(xs) - 0.02 * max(xs), max(xs) + 0.02 * max(xs))
  axes[0].set_ylabel('validation loss (nats/token)')
  axes[0].set_title('Every setting (no capacity drops)')
  axes[1].set_title('The threshold sweep, zoomed')
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  run_dir.write_figure(path, fig)
  plt.close(fig)


def format_table(result: dict) -> str:
  """The printed eval summary (markdown)."""
  lines = [f"eval at step {result['step']} on {result['eval_set']}: "
           f"{result['tokens']:,.0f} tokens of {result['documents']:,.0f} "
           'documents', '', '| metric | value |', '|---|---|']
  for key in ('loss', 'perplexity', 'bits_per_byte', 'dropped_fraction',
              'load_max_over_mean', 'router_entropy', 'dead_experts'):
    if key in result:
      lines.append(f'| {key} | {result[key]:.4f} |')
  for layer, load in enumerate(result.get('expert_load', [])):
    lines.append(f'| expert_load layer {layer} | ' + ' '.join(f'{x:.3f}' for x in load) + ' |')
  if result.get('capacity_what_if'):   # () asks for none
    lines += ['', '| capacity factor | dropped fraction | loss |', '|---|---|---|']
    for row in result['capacity_what_if']:
      lines.append(f"| {row['capacity_factor']} | {row['dropped_fraction']:.4f} "
                   f"| {row['loss']:.4f} |")
  if 'compute_what_if' in result:
    lines += ['', '| compute (no capacity drops) | FFN experts per token | '
              'forward MFLOPs per token | loss |', '|---|---|---|---|']
    for row in result['compute_what_if']:
      lines.append(f"| {row['setting']} | {row['ffn_experts_per_token']:.3f} | "
                   f"{row['forward_flops_per_token'] / 1e6:.3f} | {row['loss']:.4f} |")
  return '\n'.join(lines)
