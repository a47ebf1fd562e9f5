"""Metric writers (JSONL, TensorBoard, tqdm), expert statistics, throughput and MFU.

Writers (`MetricWriter`, process 0 only; other processes get a no-op writer):
  * `workdir/metrics.jsonl`, always: one JSON object per `write` call,
    `{"step": 100, "loss": 3.2, ...}`. Opened in append mode, so a resumed run
    continues the file; after resuming from an earlier checkpoint a step may
    appear twice: readers keep the last line for a step. Numbers are plain
    JSON numbers; NaN and +-inf are written as the strings "nan", "inf",
    "-inf" (strict JSON; `float(s)` reads them back).
  * `workdir/tensorboard/`: event files through tensorboardX (TensorFlow is
    not needed, neither to write nor to read), with the same names as the
    JSONL keys; per-layer values are flattened (below).
  * with a remote (gs://) workdir both are written to a local copy and
    uploaded at each checkpoint (`sync`) and at `close`: object stores
    cannot append (moe.run_dir).
  * a tqdm bar on process 0 showing step, loss and tokens/s. Training passes
    `progress=run.loop.progress_bar or False`: with configs/base.py's
    `progress_bar = True` the bar shows whether or not stderr is a TTY, with
    False it is off. A writer left at `progress=None` shows it only when stderr
    is a TTY (tqdm's `disable=None`), so batch logs are not flooded.

Metric names (DESIGN.md section 4). `router_summary` turns the model's
`RouterStats` (stacked over L MoE layers) into:

  JSONL key                        TensorBoard tag(s)                  value
  dropped_fraction                 dropped_fraction                    mean over layers
  per_layer/dropped_fraction       dropped_fraction/layer_{l}          [L]
  expert_load                      expert_load/layer_{l}/expert_{e}    [L][E] fraction of
                                                                       routed tokens (sums to 1
                                                                       per layer)
  load_max_over_mean               load_max_over_mean                  max_e load / mean_e load,
                                                                       mean over layers (1 = balanced,
                                                                       E = collapsed)
  per_layer/load_max_over_mean     load_max_over_mean/layer_{l}        [L]
  router_entropy                   router_entropy                      mean over layers (nats)
  per_layer/router_entropy         router_entropy/layer_{l}            [L]
  dead_experts                     dead_experts                        experts with zero load,
                                                                       summed over layers
  per_layer/dead_experts           dead_experts/layer_{l}              [L]
  per_layer/aux_loss               aux_loss/layer_{l}                  [L] (the mean over layers,
  per_layer/z_loss                 z_loss/layer_{l}                    `aux_loss`/`z_loss`, comes
  per_layer/compute_loss           compute_loss/layer_{l}              from the train step)
  ffn_experts_per_token            ffn_experts_per_token               FFN experts a token took
                                                                       (routed, before capacity
                                                                       drops), mean over layers
  per_layer/ffn_experts_per_token  ffn_experts_per_token/layer_{l}     [L]
  ffn_count_share                  ffn_count_share/layer_{l}/experts_{j}  [L][K+1] share of tokens
                                                                       that took j FFN experts
  cheap_share                      cheap_share/layer_{l}/cheap_{c}     [L][zero+copy+const] share of
                                                                       taken choices per cheap
                                                                       expert (models with them)

The flattening rule (`tensorboard_scalars`): a scalar keeps its key; a list
under `per_layer/NAME` or `NAME` becomes `NAME/layer_{l}`, and a list of
lists `NAME/layer_{l}/expert_{e}` (lists are always indexed [layer][expert];
`ffn_count_share` by [layer][experts taken], `cheap_share` by [layer][cheap
expert], named `experts_{j}` and `cheap_{c}`).
Strings (e.g. `mfu_peak_source`) go to JSONL and to TensorBoard text.

Other train keys: `loss`, `total_loss`, `aux_loss`, `z_loss`, `grad_norm`,
`lr`, and from `Throughput.measure`: `tokens_per_sec`, `tflops_per_sec`,
`mfu`, `step_time`. `Throughput.info()` (logged once) carries
`mfu_peak_source` ('measured' or 'declared'), `peak_tflops_per_device`,
`num_devices` and `flops_per_token`.

Eval: `write_eval(step, metrics)` writes the same names with an `eval/`
prefix into the same JSONL file and TensorBoard run: `eval/loss`,
`eval/per_layer/dropped_fraction` (JSONL), `eval/dropped_fraction/layer_0`
(TensorBoard), ..., plus `eval/tokens` and `eval/documents`, the size of the
evaluated set. The last step's evaluation, on the set of
`final_eval_batches` (0: the whole split), is written again under a
`final/` prefix (`final/loss`, ...).

Throughput and MFU: `tflops_per_sec` is model FLOPs (active experts only,
`ModelConfig.flops_per_token`) per second summed over all devices;
`mfu = achieved FLOP/s / (peak FLOP/s per device * num_devices)`. The peak is
either declared (e.g. 989e12 for H100/H200 bf16 dense) or measured by
`measure_matmul_peak`, a large square matmul on one device. Timing is
wall-clock between `measure` calls: JAX dispatches asynchronously, so the
caller must block on the step results (e.g. `jax.device_get(metrics)`) before
calling `measure`, or the interval measures dispatch, not compute.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from moe import run_dir
from moe.routing import RouterStats

PEAK_SOURCES = ('measured', 'declared')


# --- Expert statistics ----------------------------------------------------------

def router_summary(router: RouterStats) -> dict[str, Any]:
  """JSON-able expert statistics from RouterStats stacked over L MoE layers.

  Fields are [L, ...] arrays (numpy or jax; a single unstacked layer is
  accepted too). Returns the keys listed in the module docstring.
  """
  load = np.asarray(router.expert_load, np.float64)             # [L, E]
  if load.ndim == 1:
    load = load[None]
  per_layer = lambda x: np.asarray(x, np.float64).reshape(load.shape[0])  # [L]
  dropped = per_layer(router.dropped_fraction)
  entropy = per_layer(router.router_entropy)
  with np.errstate(divide='ignore', invalid='ignore'):
    max_over_mean = load.max(axis=1) / load.mean(axis=1)         # [L]
  dead = (load == 0).sum(axis=1).astype(int)                     # [L]
  return {
      'dropped_fraction': float(dropped.mean()),
      'per_layer/dropped_fraction': dropped.tolist(),
      'expert_load': load.tolist(),
      'load_max_over_mean': float(max_over_mean.mean()),
      'per_layer/load_max_over_mean': max_over_mean.tolist(),
      'router_entropy': float(entropy.mean()),
      'per_layer/router_entropy': entropy.tolist(),
      'dead_experts': int(dead.sum()),
      'per_layer/dead_experts': dead.tolist(),
      'per_layer/aux_loss': per_layer(router.aux_loss).tolist(),
      'per_layer/z_loss': per_layer(router.z_loss).tolist(),
      'per_layer/compute_loss': per_layer(router.compute_loss).tolist(),
      **ffn_summary(router, load.shape[0]),
  }


def ffn_summary(router: RouterStats, num_layers: int) -> dict[str, Any]:
  """Where the compute went: FFN experts per token, the share of tokens
  that took 0, 1, ..., K of them, and the cheap experts' shares."""
  ffn = np.asarray(router.ffn_per_token, np.float64).reshape(num_layers)
  count = np.asarray(router.ffn_count_share, np.float64).reshape(num_layers, -1)
  cheap = np.asarray(router.cheap_share, np.float64).reshape(num_layers, -1)
  out = {'ffn_experts_per_token': float(ffn.mean()),
         'per_layer/ffn_experts_per_token': ffn.tolist(),
         'ffn_count_share': count.tolist()}
  if cheap.shape[1]:
    out['cheap_share'] = cheap.tolist()
  return out


def summarize(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Host-side values of a step's metrics: scalars as floats, the router
  stats as their summary."""
  return {k: float(v) if np.ndim(v) == 0 else v for k, v in _expand(metrics).items()}


def _expand(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Replaces a RouterStats value (the train step's 'router') by its summary."""
  out = {}
  for k, v in metrics.items():
    if isinstance(v, RouterStats):
      out.update(router_summary(v))
    else:
      out[k] = v
  return out


# --- Conversion to JSON and TensorBoard -------------------------------------------

def _number(x):
  """numpy/jax scalar -> int or float; non-finite floats -> 'nan'/'inf'/'-inf'."""
  if isinstance(x, (bool, np.bool_)):
    return int(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  x = float(x)
  if math.isfinite(x):
    return x
  return 'nan' if math.isnan(x) else ('inf' if x > 0 else '-inf')


def _jsonable(v):
  if isinstance(v, str):
    return v
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  a = np.asarray(v)
  if a.ndim == 0:
    return _number(a.item())
  return [_jsonable(x) for x in a.tolist()]


def _floats(v):
  """Nested lists of Python floats; non-finite values stay floats (TensorBoard takes them)."""
  if isinstance(v, (list, tuple)):
    return [_floats(x) for x in v]
  a = np.asarray(v)
  return float(a) if a.ndim == 0 else [_floats(x) for x in a.tolist()]


# The second index of [layer][...] lists that are not indexed by expert.
_INNER_INDEX = {'ffn_count_share': 'experts', 'cheap_share': 'cheap'}


def tensorboard_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Flat {tag: float} for TensorBoard; strings are left out (see module doc)."""
  out = {}

  def flatten(tag, v, depth, inner):
    if not isinstance(v, list):
      out[tag] = v
      return
    index = ('layer', inner)[depth] if depth < 2 else 'index'
    for i, x in enumerate(v):
      flatten(f'{tag}/{index}_{i}', x, depth + 1, inner)

  for k, v in _expand(metrics).items():
    if not isinstance(v, str):
      name = k.removeprefix('per_layer/')
      flatten(name, _floats(v), 0, _INNER_INDEX.get(name.rsplit('/', 1)[-1], 'expert'))
  return out


# --- Writers -----------------------------------------------------------------------

class MetricWriter:
  """JSONL + TensorBoard (tensorboardX) + tqdm bar; a no-op unless enabled.

  enabled: write at all; default True only on process 0 (jax.process_index()).
  total_steps: the bar's total. progress: None shows the bar only on a TTY.
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None,
               total_steps: int, progress: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._total = total_steps
    self._progress = progress
    self._bar = None
    self._jsonl = self._tb = None
    if not self.enabled:
      return
    # A remote (gs://) workdir cannot be appended to: write a local copy,
    # continuing the run's metrics.jsonl, and upload it at each `sync`.
    self._workdir = workdir
    self._staging = tempfile.mkdtemp(prefix='moe_metrics_') if run_dir.is_remote(workdir) else None
    directory = self._staging or workdir
    os.makedirs(directory, exist_ok=True)
    if self._staging:
      run_dir.download(workdir, 'metrics.jsonl', self._staging)
    path = os.path.join(directory, 'metrics.jsonl')
    self._jsonl = open(path, 'a', encoding='utf-8')
    if self._jsonl.tell() > 0:   # a crash may have left a partial last line
      with open(path, 'rb') as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b'\n':
          self._jsonl.write('\n')
    self._tb = SummaryWriter(os.path.join(directory, 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes train metrics: scalars, lists, strings, a RouterStats value."""
    if not self.enabled:
      return
    metrics = _expand(metrics)
    self._write(step, metrics, prefix='')
    self._update_bar(step, metrics)

  def write_eval(self, step: int, metrics: Mapping[str, Any], *,
                 prefix: str = 'eval/') -> None:
    """Writes eval metrics under `prefix` (JSONL and TensorBoard): `eval/`
    for the periodic evaluations, `final/` for the last step's."""
    if not self.enabled:
      return
    self._write(step, _expand(metrics), prefix=prefix)

  def _write(self, step, metrics, prefix):
    line = {'step': int(step)}
    line.update({prefix + k: _jsonable(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(line, allow_nan=False) + '\n')
    self._jsonl.flush()
    for tag, value in tensorboard_scalars(metrics).items():
      self._tb.add_scalar(prefix + tag, value, int(step))
    for k, v in metrics.items():
      if isinstance(v, str):
        self._tb.add_text(prefix + k, v, int(step))

  def _update_bar(self, step, metrics):
    if self._bar is None:
      disable = None if self._progress is None else not self._progress
      self._bar = tqdm(total=self._total, initial=int(step), unit='step',
                       dynamic_ncols=True, mininterval=1.0, disable=disable)
    postfix = {}
    if 'loss' in metrics:
      postfix['loss'] = f'{float(np.asarray(metrics["loss"])):.4f}'
    if 'tokens_per_sec' in metrics:
      postfix['tok/s'] = f'{float(metrics["tokens_per_sec"]):.4g}'
    if postfix:
      self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(max(0, int(step) - self._bar.n))

  def sync(self) -> None:
    """Uploads metrics.jsonl and the TensorBoard files to a remote workdir
    (a no-op for a local one, which is written directly). TensorBoard's
    writer flushes in the background: its newest events may wait for the
    next sync; `close` uploads everything (or, if that upload fails, keeps
    the local copy). A failed upload is logged, not raised: training goes
    on, and the next sync uploads it all again."""
    if not self.enabled or self._jsonl is None:
      return
    self._jsonl.flush()
    self._tb.flush()
    if self._staging:
      self._upload('trying again at the next checkpoint')

  def _upload(self, otherwise: str) -> bool:
    try:
      run_dir.upload(self._staging, self._workdir)
      return True
    except Exception as e:  # pylint: disable=broad-except  (any filesystem's error)
      logging.warning('could not upload metrics to %s (%s: %s); %s',
                      self._workdir, type(e).__name__, e, otherwise)
      return False

  def close(self) -> None:
    if not self.enabled or self._jsonl is None:
      return
    if self._bar is not None:
      self._bar.close()
    self._tb.close()
    self._jsonl.close()
    if self._staging and self._upload(f'they are kept in {self._staging}'):
      shutil.rmtree(self._staging)
    self._jsonl = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# --- Throughput and MFU --------------------------------------------------------------

def measure_matmul_peak(dtype=jnp.float32, n: int | None = None, *,
                        repeats: int = 5, calls: int = 4,
                        clock: Callable[[], float] = time.perf_counter) -> float:
  """Achieved FLOP/s of a square [n, n] @ [n, n] matmul on the default device.

  n defaults to 1024 on CPU and 8192 on accelerators. The jitted matmul is
  compiled and run once (warm-up, not timed); each of `repeats` timings
  dispatches `calls` matmuls and blocks on all of them; returns the median.
  Uses the default matmul precision, as the model does.
  """
  device = jax.devices()[0]
  if n is None:
    n = 1024 if device.platform == 'cpu' else 8192
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(ka, (n, n), dtype), device)
  b = jax.device_put(jax.random.normal(kb, (n, n), dtype), device)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()                    # compile + warm-up
  times = []
  for _ in range(repeats):
    start = clock()
    jax.block_until_ready([matmul(a, b) for _ in range(calls)])
    times.append(clock() - start)
  return 2.0 * n**3 * calls / float(np.median(times))


def peak_flops(declared: float | None, dtype=jnp.float32) -> tuple[float, str]:
  """(peak FLOP/s per device, source): the declared value, else measured."""
  if declared:
    return float(declared), 'declared'
  return measure_matmul_peak(dtype), 'measured'


class Throughput:
  """tokens/s, TFLOP/s, MFU and step time over wall-clock log intervals.

  flops_per_token: model training FLOPs per token (active experts only,
    `ModelConfig.flops_per_token(seq_len)`).
  tokens_per_step: global batch size x sequence length.
  peak_flops_per_device, peak_source: from `peak_flops` ('measured' or
    'declared').
  num_devices: devices the step runs on. Default: jax.device_count(), except
    on CPU, where the "devices" share the host's cores (which the matmul probe
    already uses), so jax.process_count().
  clock: seconds, monotonic (injectable for tests).

  Usage (the loop must block on results before `measure`, see module doc):
    tp.start(step)                      # after the first (compiling) step
    ...
    metrics = jax.device_get(metrics)   # blocks
    writer.write(step, {**metrics, **tp.measure(step)})
    ...                                 # after eval or a checkpoint:
    tp.start(step)                      # so their time is not counted
  """

  def __init__(self, *, flops_per_token: float, tokens_per_step: int,
               peak_flops_per_device: float, peak_source: str,
               num_devices: int | None = None,
               clock: Callable[[], float] = time.perf_counter):
    if peak_source not in PEAK_SOURCES:
      raise ValueError(f'peak_source={peak_source!r}; expected one of {PEAK_SOURCES}.')
    if not peak_flops_per_device > 0:
      raise ValueError(f'peak_flops_per_device={peak_flops_per_device}; must be > 0.')
    if num_devices is None:
      cpu = jax.devices()[0].platform == 'cpu'
      num_devices = jax.process_count() if cpu else jax.device_count()
    self.flops_per_token = float(flops_per_token)
    self.tokens_per_step = int(tokens_per_step)
    self.peak_flops_per_device = float(peak_flops_per_device)
    self.peak_source = peak_source
    self.num_devices = int(num_devices)
    self._clock = clock
    self._mark = None   # (step, time) at the start of the interval
    self._counted = []  # FLOPs per token of each step since the mark (`count`)
    logging.info('MFU peak: %.4g TFLOP/s per device (%s) x %d devices.',
                 self.peak_flops_per_device / 1e12, peak_source, self.num_devices)

  def info(self) -> dict[str, Any]:
    """What MFU is measured against; log once (e.g. writer.write(step, tp.info()))."""
    return {'mfu_peak_source': self.peak_source,
            'peak_tflops_per_device': self.peak_flops_per_device / 1e12,
            'num_devices': self.num_devices,
            'flops_per_token': self.flops_per_token}

  def start(self, step: int) -> None:
    """Starts (or restarts) an interval at `step`, now."""
    self._mark = (int(step), self._clock())
    self._counted = []

  def count(self, flops_per_token: float) -> None:
    """The FLOPs per token one step of the interval actually spent (adaptive
    compute: `ModelConfig.flops_per_token` of the experts its tokens took).
    When every step of an interval was counted, `measure` uses their mean
    instead of the nominal figure, and reports it as `flops_per_token`."""
    self._counted.append(float(flops_per_token))

  def measure(self, step: int) -> dict[str, float]:
    """Metrics over the steps since the last start/measure; starts the next.

    Returns {} on the first call without `start` and when no step was taken.
    """
    now = self._clock()
    mark, self._mark = self._mark, (int(step), now)
    counted, self._counted = self._counted, []
    if mark is None or int(step) <= mark[0] or now <= mark[1]:
      return {}
    steps, seconds = int(step) - mark[0], now - mark[1]
    flops_per_token = (sum(counted) / steps if len(counted) == steps
                       else self.flops_per_token)
    tokens_per_sec = steps * self.tokens_per_step / seconds
    flops_per_sec = tokens_per_sec * flops_per_token
    out = {'tokens_per_sec': tokens_per_sec,
           'tflops_per_sec': flops_per_sec / 1e12,
           'mfu': flops_per_sec / (self.peak_flops_per_device * self.num_devices),
           'step_time': seconds / steps}
    if len(counted) == steps:
      out['flops_per_token'] = flops_per_token
    return out


def compiled_memory(compiled) -> dict[str, int]:
  """XLA's memory figure of one compiled step, per device, in bytes:
  argument, output, alias (donated) and temp, and their total = argument +
  output - alias + temp, the step's high-water mark."""
  m = compiled.memory_analysis()
  out = {'argument': m.argument_size_in_bytes, 'output': m.output_size_in_bytes,
         'alias': m.alias_size_in_bytes, 'temp': m.temp_size_in_bytes}
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def peak_memory_mb(compiled) -> float:
  """Peak device memory of one compiled step in MiB, from the compiler
  (`compiled_memory`): a figure of the step itself on every backend, unlike
  the device's high-water mark, which also counts whatever ran before."""
  return compiled_memory(compiled)['total'] / 2**20
