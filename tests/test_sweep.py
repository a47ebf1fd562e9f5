"""moe/sweep.py and scripts/sweep.py: expansion and names, validation before
launch, and a 2-run sweep end to end (train.py + eval.py subprocesses, 2 at a
time): resume of an unfinished run, skipping of finished runs, one results row
per run."""

import csv
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from moe import sweep  # noqa: E402


# --- Expansion, names, overrides (in-process, fast) ---------------------------------------

def test_grid_and_zip_expand_to_named_runs():
  runs = sweep.expand({
      'config': 'configs/switch.py:cpu',
      'grid': {'moe.num_experts': [4, 8], 'moe.train_capacity_factor': [1.0, 1.25]},
      'zip': {'moe.router': ['tokens_choose', 'experts_choose'], 'moe.top_k': [2, 1]},
      'fixed': {'num_steps': 10}}, {'num_steps': 20})
  names = [r.name for r in runs]
  assert len(runs) == 8 and len(set(names)) == 8
  assert names[:3] == [
      'num_experts=4,train_capacity_factor=1.0,router=tokens_choose,top_k=2',
      'num_experts=4,train_capacity_factor=1.0,router=experts_choose,top_k=1',
      'num_experts=4,train_capacity_factor=1.25,router=tokens_choose,top_k=2']
  assert runs[0].overrides == {'num_steps': 20, 'moe.num_experts': 4,
                               'moe.train_capacity_factor': 1.0,
                               'moe.router': 'tokens_choose', 'moe.top_k': 2}
  # Deterministic: the same sweep gives the same names.
  assert names == [r.name for r in sweep.expand({
      'config': 'x', 'grid': {'moe.num_experts': [4, 8],
                              'moe.train_capacity_factor': [1.0, 1.25]},
      'zip': {'moe.router': ['tokens_choose', 'experts_choose'],
              'moe.top_k': [2, 1]}})]
  # Clashing short names keep the whole key; odd characters become _.
  (run,) = sweep.expand({'grid': {'model.dtype': ['bfloat16'],
                                  'data.name': ['c4/en'], 'eval.capacity_factors':
                                  [(1.0, 'dropless')], 'mesh': [(2, 4, 1)]}})
  assert run.name == 'dtype=bfloat16,name=c4_en,capacity_factors=1.0xdropless,mesh=2x4x1'
  runs = sweep.expand({'grid': {'moe.top_k': [1]}, 'zip': {'optimizer.top_k': [2]}})
  assert runs[0].name == 'moe.top_k=1,optimizer.top_k=2'
  assert sweep.expand({'config': 'x'})[0].name == 'base'


def test_bad_sweeps_are_refused():
  with pytest.raises(sweep.SweepError, match='one length'):
    sweep.expand({'zip': {'moe.top_k': [1, 2], 'moe.router': ['tokens_choose']}})
  with pytest.raises(sweep.SweepError, match='non-empty list'):
    sweep.expand({'grid': {'moe.top_k': 2}})
  with pytest.raises(sweep.SweepError, match='both be named'):
    sweep.expand({'grid': {'data.name': ['a/b', 'a_b']}})
  base = sweep.load_config('configs/switch.py:cpu')
  (run,) = sweep.expand({'grid': {'moe.num_expert': [4]}})
  with pytest.raises(sweep.SweepError, match="unknown config key 'moe.num_expert'"):
    sweep.build_config(base, run)
  assert sweep.parse_set(base, ['num_steps=3', 'mesh=(1, 2, 1)', 'data.data_dir=/x',
                                'progress_bar=False']) == {
      'num_steps': 3, 'mesh': (1, 2, 1), 'data.data_dir': '/x', 'progress_bar': False}
  assert sweep.config_args('configs/switch.py:cpu', sweep.SweepRun('r', {}, {
      'mesh': (1, -1, 1), 'moe.train_capacity_factor': 1.0, 'data.name': 'c4/en'})) == [
      '--config', 'configs/switch.py:cpu', '--config.mesh=(1, -1, 1)',
      '--config.moe.train_capacity_factor=1.0', '--config.data.name=c4/en']


# --- End to end ------------------------------------------------------------------------------

def _env():
  """Each run sees ONE CPU device, as on a laptop."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1')
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                            env.get('XLA_FLAGS', ''))
  return env


def _write_sweep(path, data_dir, grid):
  path.write_text(textwrap.dedent(f'''
      """A tiny sweep for the tests."""

      def get_sweep(arg=''):
        return {{
            'config': 'configs/switch.py:cpu',
            'grid': {grid!r},
            'fixed': {{
                'model.d_model': 32, 'model.num_heads': 2, 'model.head_dim': 16,
                'model.mlp_dim': 64, 'model.num_layers': 2, 'model.max_seq_len': 32,
                'seq_len': 32, 'batch_size': 4, 'moe.expert_dim': 64,
                'moe.group_size': 64, 'num_steps': 2, 'log_every': 1,
                'eval_every': 2, 'eval_batches': 1, 'final_eval_batches': 1, 'checkpoint_every': 2,
                'progress_bar': False, 'peak_flops_per_device': 1e12,
                'eval.capacity_factors': (2.0,), 'data.data_dir': {data_dir!r},
            }},
        }}
  '''))
  return str(path)


def _sweep(*args, timeout=900):
  proc = subprocess.run([sys.executable, 'scripts/sweep.py', *args], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=timeout)
  print(proc.stdout[-4000:], proc.stderr[-4000:])
  return proc


# Two runs (each a train.py and an eval.py process); grids of several keys
# are expanded and named in test_grid_and_zip_expand_to_named_runs.
GRID = {'moe.num_experts': [2, 4]}
NAMES = ['num_experts=2', 'num_experts=4']


def _train_steps(run_dir):
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    return [r['step'] for r in map(json.loads, f) if 'loss' in r]


def test_sweep_end_to_end(data_dir, tmp_path):
  spec = _write_sweep(tmp_path / 'tiny.py', data_dir, GRID)
  workdir = str(tmp_path / 'sweep')
  common = ['--sweep', spec, '--workdir', workdir, '--num_devices=1']

  # One run stopped half-way (1 of 2 steps, no eval yet): the sweep resumes it.
  first = NAMES[0]
  proc = _sweep(*common, f'--only={first}', '--set=num_steps=1', '--eval=False')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.listdir(workdir) and not os.path.exists(os.path.join(workdir, NAMES[1]))
  # Its report, without repeating --set, counts it finished at the 1 step it
  # was launched for; the other runs were never started.
  proc = _sweep(*common, '--report_only', '--eval=False')
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'results.csv')) as f:
    assert [(r['status'], r['step']) for r in csv.DictReader(f)] == [
        ('finished', '1'), ('new', '')]

  proc = _sweep(*common, '--parallel=2', '--metric=eval.json/loss',
                '--x=moe.num_experts')
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert '2 runs validated' in out
  assert f'{first}: resuming from step 1' in out
  assert out.count(': new') == 1
  for name in NAMES:
    run_dir = os.path.join(workdir, name)
    assert sorted(os.listdir(os.path.join(run_dir, 'checkpoints')))[-1] == '2'
    with open(os.path.join(run_dir, 'eval.json')) as f:
      assert json.load(f)['step'] == 2
    with open(os.path.join(run_dir, 'config.json')) as f:
      config = json.load(f)
    assert config['moe']['num_experts'] == int(name.split('=')[1])
    assert _train_steps(run_dir) == [1, 2]      # the first run: 1, then resumed 2
  with open(os.path.join(workdir, first, 'sweep_train.log')) as f:
    assert 'resumed from step 1' in f.read()

  with open(os.path.join(workdir, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['run'] for r in rows] == NAMES
  assert [r['moe.num_experts'] for r in rows] == ['2', '4']
  for r in rows:
    assert r['status'] == 'finished' and r['step'] == '2'
    for col in ('loss', 'eval/loss', 'eval.json/loss', 'eval.json/perplexity',
                'eval.json/cf=2.0/loss', 'num_params'):
      assert float(r[col]) > 0, (col, r)
  with open(os.path.join(workdir, 'results.md')) as f:
    md = f.read()
  table = [l for l in md.splitlines() if l.startswith('| num_experts=')]
  assert len(table) == 2
  assert os.path.getsize(os.path.join(workdir, 'eval.json_loss_vs_num_experts.png')) > 0

  # Re-running trains nothing: every run is finished.
  logs = {n: os.path.getsize(os.path.join(workdir, n, 'sweep_train.log')) for n in NAMES}
  proc = _sweep(*common, '--parallel=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count('skipping') == 2
  assert ' train (' not in proc.stdout and ' eval (' not in proc.stdout
  assert logs == {n: os.path.getsize(os.path.join(workdir, n, 'sweep_train.log'))
                  for n in NAMES}
  with open(os.path.join(workdir, 'results.csv')) as f:
    assert len(list(csv.DictReader(f))) == 2
  assert os.path.exists(os.path.join(workdir, 'eval_loss_vs_num_experts.png'))


def test_a_bad_run_stops_the_sweep_before_anything_starts(data_dir, tmp_path):
  # 3 experts cannot split over an expert axis of 2; 4 can.
  spec = _write_sweep(tmp_path / 'bad.py', data_dir, {'moe.num_experts': [4, 3]})
  workdir = str(tmp_path / 'bad')
  proc = _sweep('--sweep', spec, '--workdir', workdir, '--num_devices=2',
                '--set=mesh=(1, 2, 1)', timeout=300)
  assert proc.returncode == 2
  assert 'run num_experts=3 is not valid (2 devices)' in proc.stderr
  assert 'moe.num_experts=3 is not divisible by the expert axis (2)' in proc.stderr
  assert not os.path.exists(workdir)


def test_the_launcher_validates_for_its_target_without_a_backend(data_dir, tmp_path):
  """A sweep's runs are validated for a target of 32 devices on a machine
  without them, and the launching process starts no jax backend (on a GPU
  host it would hold the memory its runs need): under a platform that does
  not exist, any backend would fail."""
  spec = _write_sweep(tmp_path / 'grid.py', data_dir, {'moe.num_experts': [4, 8]})
  proc = subprocess.run(
      [sys.executable, 'scripts/sweep.py', '--sweep', spec, '--workdir', str(tmp_path / 'w'),
       '--launcher', 'print', '--num_devices=32', '--set=mesh=(-1, 4, 1)',
       '--set=batch_size=64'],
      cwd=REPO, env=dict(_env(), JAX_PLATFORMS='no_such_platform'), capture_output=True,
      text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'sweep grid: 2 runs validated (32 devices each)' in proc.stderr
  assert proc.stdout.count('train.py') == 2


def test_a_local_sweep_into_a_bucket_is_refused(data_dir, tmp_path):
  """The local launcher writes each run's log beside the run: gs:// would
  make a local folder named 'gs:' (sweep.py runs in the repository)."""
  spec = _write_sweep(tmp_path / 'grid.py', data_dir, {'moe.num_experts': [2, 4]})
  proc = _sweep('--sweep', spec, '--workdir', 'gs://bkt/sweep', timeout=120)
  assert proc.returncode == 2
  assert "--workdir gs://bkt/sweep: the local launcher writes each run's log" in proc.stderr
  assert not os.path.exists(os.path.join(REPO, 'gs:'))


def test_launched_steps_reads_the_runs_own_config(tmp_path):
  """--report_only judges a run by the num_steps in its config.json; a run
  directory without one (never started) falls back to the sweep's."""
  assert sweep.launched_steps(str(tmp_path), 600) == 600
  (tmp_path / 'config.json').write_text(json.dumps({'num_steps': 3, 'seed': 0}))
  assert sweep.launched_steps(str(tmp_path), 600) == 3
