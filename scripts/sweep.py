"""Sweeps: a grid or zip of config overrides -> named runs -> one table.

  python scripts/sweep.py --sweep configs/sweeps/experts.py --workdir runs/sweeps/experts
  python scripts/sweep.py --sweep configs/sweeps/experts.py --parallel 2
  python scripts/sweep.py --sweep configs/sweeps/experts.py --launcher print
  python scripts/sweep.py --sweep configs/sweeps/experts.py --workdir gs://B/sweeps/experts \\
      --launcher tpu --launcher_args='--tpu=my-v5p-32 --zone=us-east5-a --data_dir=gs://B/tfds'
  python scripts/sweep.py --sweep configs/sweeps/experts.py --workdir /shared/sweeps/experts \\
      --launcher slurm --launcher_args='--nodes=1 --gpus_per_node=8 --partition=gpu'
  python scripts/sweep.py --sweep configs/sweeps/experts.py --report_only

The sweep file, the runs' names (WORKDIR/NAME) and the results are moe/sweep.py's.
Before anything starts, every run's config is built and validated
(`moe.run_config.build`, and its mesh for the target's device count, without
starting a backend here); one bad run stops
the whole sweep with its name and the reason.

Launchers: `local` (default) runs `train.py` then `eval.py` per run as subprocesses, one
after another or `--parallel N` at a time (logs in WORKDIR/NAME/sweep_{train,eval}.log);
`print` prints those commands; `tpu` and `slurm` hand each run to scripts/launch_tpu.sh /
scripts/launch_slurm.sh (with `--launcher_args`; `--dry_run` prints what they would run).
A run whose newest checkpoint is at num_steps (and that has its eval.json, with --eval)
is skipped; an unfinished one resumes from its checkpoint.

At the end (and with --report_only) the sweep writes WORKDIR/results.csv, results.md
and <metric>_vs_<x>.png (--metric against the swept value --x, one line per
combination of the other values); a gs:// sweep's go to --results_dir.
"""

import concurrent.futures
import dataclasses
import fnmatch
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/

from moe import config_flag, run_config, sweep  # noqa: E402  (imports jax, starts no backend)
from moe.config import ConfigError  # noqa: E402
from moe.run_dir import is_remote  # noqa: E402

_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file[:arg], e.g. configs/sweeps/experts.py.')
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Runs and results (default runs/sweeps/<sweep file name>[_<variant>]).')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Local runs at a time (subprocesses).')
_LAUNCHER = flags.DEFINE_enum('launcher', 'local', ['local', 'print', 'tpu', 'slurm'],
                              'Where runs go.')
_LAUNCHER_ARGS = flags.DEFINE_string(
    'launcher_args', '', 'Arguments for scripts/launch_{tpu,slurm}.sh (one string).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False,
                             'tpu/slurm: print what would run; local: same as print.')
_EVAL = flags.DEFINE_bool('eval', True, 'Run eval.py after each training run.')
_SET = flags.DEFINE_multi_string('set', [], 'KEY=VALUE fixed override for every run.')
_ONLY = flags.DEFINE_multi_string('only', [], 'Only runs whose name matches (fnmatch).')
_NUM_DEVICES = flags.DEFINE_integer(
    'num_devices', None, 'Devices each run gets, for validation (default: this '
    "machine's for local runs, the mesh's product otherwise).")
_METRIC = flags.DEFINE_string('metric', 'eval/loss', 'Column to plot.')
_X = flags.DEFINE_string('x', None, 'Swept key on the x axis (default: the first).')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Only rebuild the results.')
_RESULTS_DIR = flags.DEFINE_string(
    'results_dir', None, 'Where results.csv/.md and the plot go (default: '
    '--workdir; runs/sweeps/<sweep file name>[_<variant>] when --workdir is gs://).')
_PYTHON = flags.DEFINE_string('python', sys.executable, 'Python for local runs.')


def local_commands(python: str, args: list[str], run_dir: str, todo: str,
                   with_eval: bool) -> list[list[str]]:
  cmds = []
  if todo in ('new', 'resume'):
    cmds.append([python, 'train.py', *args, '--workdir', run_dir])
  if with_eval and todo in ('new', 'resume', 'eval'):
    cmds.append([python, 'eval.py', *args, '--workdir', run_dir])
  return cmds


def launcher_command(launcher: str, launcher_args: str, args: list[str], run_dir: str,
                     job_name: str, with_eval: bool, dry_run: bool) -> list[str]:
  script = os.path.join(ROOT, 'scripts', f'launch_{launcher}.sh')
  cmd = ['bash', script, *shlex.split(launcher_args), f'--workdir={run_dir}']
  if launcher == 'slurm':
    cmd.append(f'--job_name={job_name}')
  if with_eval:
    cmd.append('--eval')
  if dry_run:
    cmd.append('--dry_run')
  return cmd + ['--', *args]


_print_lock = threading.Lock()


def _say(msg: str) -> None:
  with _print_lock:
    print(msg, flush=True)


def run_local(jobs: list[tuple[str, str, list[list[str]]]], parallel: int) -> dict:
  """Runs each job's commands in order (a failure stops that job), up to
  `parallel` jobs at a time. jobs: (name, run_dir, commands). -> name: rc."""
  def one(job):
    name, run_dir, cmds = job
    os.makedirs(run_dir, exist_ok=True)
    start = time.monotonic()
    for cmd in cmds:
      kind = 'train' if cmd[1] == 'train.py' else 'eval'
      log = os.path.join(run_dir, f'sweep_{kind}.log')
      _say(f'{name}: {kind} ({shlex.join(cmd[1:])})')
      with open(log, 'a') as f:
        f.write(f'$ {shlex.join(cmd)}\n')
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
      if rc:
        _say(f'{name}: {kind} FAILED (exit {rc}); see {log}')
        return name, rc
    _say(f'{name}: done in {time.monotonic() - start:.0f} s')
    return name, 0

  with concurrent.futures.ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
    return dict(pool.map(one, jobs))


def local_device_count(python: str) -> int:
  """Devices a local run sees, asked of a fresh process (this one never
  starts a backend: on a GPU it would take the memory the runs need)."""
  out = subprocess.run([python, '-c', 'import jax; print(jax.device_count())'],
                       capture_output=True, text=True, check=True)
  return int(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  config_flag.quiet_logs()
  if not _SWEEP.value:
    raise app.UsageError('--sweep is required, e.g. --sweep configs/sweeps/experts.py')
  try:
    return _main()
  except sweep.SweepError as e:
    print(f'sweep: {e}', file=sys.stderr)
    return 2


def _main() -> int:
  path, _, arg = _SWEEP.value.partition(':')
  title = os.path.basename(path)[:-3]
  # The variant is part of the local directory: two variants never share one.
  local_dir = os.path.join('runs', 'sweeps', title + (f'_{arg}' if arg else ''))
  workdir = _WORKDIR.value or local_dir
  definition = sweep.load_sweep(_SWEEP.value)
  base = sweep.load_config(definition['config'])
  runs = sweep.expand(definition, sweep.parse_set(base, _SET.value))
  if _ONLY.value:
    runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in _ONLY.value)]
    if not runs:
      raise sweep.SweepError(f'no run matches --only {_ONLY.value}.')
  configs = {r.name: sweep.build_config(base, r) for r in runs}
  launcher = 'print' if (_LAUNCHER.value == 'local' and _DRY_RUN.value) else _LAUNCHER.value
  if launcher == 'local' and is_remote(workdir) and not _REPORT_ONLY.value:
    raise sweep.SweepError(f'--workdir {workdir}: the local launcher writes each run\'s log '
                           'beside it, so give a local path (or --launcher tpu for gs://).')
  if not _REPORT_ONLY.value:
    # With --launcher print, stdout holds only the commands.
    info = functools.partial(print, file=sys.stderr if launcher == 'print' else sys.stdout,
                             flush=True)
    _validate(configs, launcher, title, info)
    todo = _todo(configs, workdir, info)
    pending = [r for r in runs if todo[r.name][0] != 'finished']
    if launcher == 'local' and pending:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
        json.dump({'sweep': _SWEEP.value, 'config': definition['config'],
                   'runs': [dataclasses.asdict(r) for r in runs]}, f, indent=2, default=str)
    rc = _launch(launcher, definition['config'], pending, todo, workdir, title)
    if rc is not None:
      return rc
  rows = _aggregate(runs, configs, workdir)
  swept = list(dict.fromkeys(k for r in runs for k in r.values))
  results_dir = _RESULTS_DIR.value or (local_dir if is_remote(workdir) else workdir)
  paths = sweep.write_results(rows, results_dir, swept, _METRIC.value, _X.value, title)
  print('results:', ', '.join(paths.values()))
  unfinished = [r['run'] for r in rows if r['status'] != 'finished']
  if unfinished and not _REPORT_ONLY.value:
    print(f'unfinished runs: {unfinished}', file=sys.stderr)
    return 1
  return 0


def _validate(configs, launcher, title, info) -> None:
  """Every run's config (name -> config) for the target's device count."""
  num_devices = _NUM_DEVICES.value
  if num_devices is None and launcher in ('local', 'print'):
    num_devices = local_device_count(_PYTHON.value)
  for name, config in configs.items():
    n = num_devices
    if n is None:
      n = math.prod(int(s) for s in config.mesh)
      if n < 0:
        raise sweep.SweepError(f'run {name}: mesh {tuple(config.mesh)} has a -1; '
                               'give --num_devices for the target.')
    try:
      run_config.build(config).mesh_shapes(n)
    except ConfigError as e:
      raise sweep.SweepError(f'run {name} is not valid ({n} devices): {e}') from e
  info(f'sweep {title}: {len(configs)} runs validated '
       f'({num_devices or "mesh-sized"} devices each)')


def _todo(configs, workdir, info) -> dict:
  """What each run needs: name -> (status, newest checkpoint step), said."""
  todo = {}
  for name, config in configs.items():
    run_dir = sweep.join(workdir, name)
    try:
      todo[name] = sweep.status(run_dir, config.num_steps, _EVAL.value)
    except Exception as e:  # e.g. gs:// without gcsfs here: launch anyway
      info(f'{name}: cannot read {run_dir} ({type(e).__name__}: {e}); '
           'treating it as new')
      todo[name] = ('new', None)
  for name, (state, step) in todo.items():
    what = {'finished': f'finished (step {step}), skipping',
            'eval': f'trained (step {step}), evaluating',
            'resume': f'resuming from step {step}', 'new': 'new'}[state]
    info(f'  {name}: {what}')
  return todo


def _launch(launcher, config_spec, pending, todo, workdir, title) -> int | None:
  """Starts the pending runs; the exit code if there is nothing to aggregate yet."""
  failed = []
  if launcher in ('local', 'print'):
    jobs = []
    for run in pending:
      run_dir = sweep.join(workdir, run.name)
      cmds = local_commands(_PYTHON.value, sweep.config_args(config_spec, run),
                            run_dir, todo[run.name][0], _EVAL.value)
      jobs.append((run.name, run_dir, cmds))
    if launcher == 'print':
      for _, _, cmds in jobs:
        print(' && '.join(shlex.join(c) for c in cmds))
      return 0
    failed = [n for n, rc in run_local(jobs, _PARALLEL.value).items() if rc]
  else:
    for run in pending:
      cmd = launcher_command(launcher, _LAUNCHER_ARGS.value,
                             sweep.config_args(config_spec, run),
                             sweep.join(workdir, run.name), f'{title}-{run.name}',
                             _EVAL.value, _DRY_RUN.value)
      print(f'{run.name}: {shlex.join(cmd)}', flush=True)
      rc = subprocess.run(cmd, cwd=ROOT).returncode
      if rc:
        failed.append(run.name)
    if _DRY_RUN.value or launcher == 'slurm':
      if failed:
        print(f'launcher failed for {failed}', file=sys.stderr)
      return 1 if failed else 0
  if failed:
    print(f'FAILED runs: {failed}', file=sys.stderr)
  return None


def _aggregate(runs, configs, workdir) -> list[dict]:
  """One results row per run, by the state its files show."""
  rows = []
  for run in runs:
    run_dir = sweep.join(workdir, run.name)
    try:
      num_steps = configs[run.name].num_steps
      if _REPORT_ONLY.value:
        num_steps = sweep.launched_steps(run_dir, num_steps)
      state, _ = sweep.status(run_dir, num_steps, _EVAL.value)
      rows.append(sweep.collect(run, run_dir, state))
    except Exception as e:  # unreadable (e.g. gs:// without gcsfs): say so
      print(f'{run.name}: cannot read {run_dir} ({type(e).__name__}: {e})', file=sys.stderr)
      rows.append({'run': run.name, 'status': 'unreadable', **run.values})
  return rows


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
