"""scripts/launch_tpu.sh and scripts/launch_slurm.sh in dry-run mode: the
exact commands and batch script they would run, parsed back the way bash
would read them."""

import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, 'scripts', 'launch_tpu.sh')
SLURM = os.path.join(REPO, 'scripts', 'launch_slurm.sh')

TRAIN_ARGS = ['--config', 'configs/switch.py:1b', '--config.mesh=(1, 8, 1)',
              "--config.eval.capacity_factors=(1.0, 'dropless')"]


def _run(script, *args, env=None):
  return subprocess.run(['bash', script, *args], capture_output=True, text=True,
                        timeout=60, env=dict(os.environ, **(env or {})))


def _command_option(argv, name):
  (value,) = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  return value


def test_tpu_dry_run_prints_the_gcloud_command():
  proc = _run(TPU, '--tpu=my-v5p-32', '--zone=us-east5-a', '--project=proj',
              '--workdir=gs://bkt/runs/switch1b', '--data_dir=gs://bkt/tfds',
              '--setup=source ~/venv/bin/activate', '--eval', '--dry_run', '--',
              *TRAIN_ARGS)
  assert proc.returncode == 0, proc.stderr
  (line,) = proc.stdout.strip().splitlines()
  argv = shlex.split(line)
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-v5p-32']
  assert '--zone=us-east5-a' in argv and '--project=proj' in argv
  assert '--worker=all' in argv               # the same command on every host
  remote = _command_option(argv, 'command')
  assert remote.startswith('cd moe && source ~/venv/bin/activate && ')
  train, evaluate = remote.split(' && ')[2:]
  expected = (TRAIN_ARGS + ['--workdir=gs://bkt/runs/switch1b',
                            '--config.data.data_dir=gs://bkt/tfds'])
  assert shlex.split(train) == ['python3', 'train.py', *expected]
  assert shlex.split(evaluate) == ['python3', 'eval.py', *expected]


def test_tpu_multislice_puts_data_across_slices():
  """--num_slices=2: every worker of every slice of the queued resource,
  and dcn_mesh (2, 1, 1) unless the arguments give one."""
  common = ['--tpu=my-qr', '--zone=z', '--num_slices=2', '--workdir=gs://b/w',
            '--data_dir=gs://b/d', '--dry_run', '--', '--config', 'configs/switch.py:1b']
  argv = shlex.split(_run(TPU, *common).stdout)
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'ssh', 'my-qr']
  assert '--node=all' in argv and '--worker=all' in argv
  assert shlex.split(_command_option(argv, 'command'))[4:] == [
      'train.py', '--config', 'configs/switch.py:1b', '--config.dcn_mesh=(2,1,1)',
      '--workdir=gs://b/w', '--config.data.data_dir=gs://b/d']
  own = _command_option(shlex.split(_run(TPU, *common, '--config.dcn_mesh=(1,2,1)').stdout),
                        'command')
  assert own.count('dcn_mesh') == 1 and "--config.dcn_mesh='(1,2,1)'" in own
  proc = _run(TPU, *common[:2], '--num_slices=0', *common[3:])
  assert proc.returncode == 2 and '--num_slices=0 must be a positive integer' in proc.stderr


def test_tpu_without_eval_and_env_dry_run():
  proc = _run(TPU, '--tpu=t', '--zone=z', '--workdir=gs://b/w', '--data_dir=gs://b/d',
              '--repo_dir=/opt/moe', '--python=/opt/venv/bin/python', '--',
              '--config', 'configs/gshard.py:1b', env={'DRY_RUN': '1'})
  assert proc.returncode == 0, proc.stderr
  argv = shlex.split(proc.stdout)
  assert '--project' not in proc.stdout
  assert _command_option(argv, 'command') == (
      'cd /opt/moe && /opt/venv/bin/python train.py --config configs/gshard.py:1b '
      '--workdir=gs://b/w --config.data.data_dir=gs://b/d')


@pytest.mark.parametrize('args,message', [
    (['--zone=z', '--workdir=gs://b/w', '--data_dir=gs://b/d'], '--tpu=NAME is required'),
    (['--tpu=t', '--zone=z', '--workdir=/local/w', '--data_dir=gs://b/d'],
     '--workdir must be gs://'),
    (['--tpu=t', '--zone=z', '--workdir=gs://b/w', '--data_dir=/local/tfds'],
     '--data_dir must be gs://'),
    (['--tpu=t', '--zone=z', '--workdir=gs://b/w', '--data_dir=gs://b/d', '--nope'],
     'unknown option --nope'),
])
def test_tpu_refuses(args, message):
  proc = _run(TPU, *args, '--dry_run', '--', '--config', 'configs/switch.py:1b')
  assert proc.returncode == 2
  assert message in proc.stderr
  assert not proc.stdout


def _script_and_submit(stdout):
  lines = stdout.strip().splitlines()
  assert lines[0].startswith('# would write ') and lines[-2] == '# and run:'
  path = lines[0][len('# would write '):-1]
  return path, lines[1:-2], shlex.split(lines[-1])


def test_slurm_one_task_per_gpu():
  proc = _run(SLURM, '--nodes=4', '--gpus_per_node=8', '--partition=gpu',
              '--time=24:00:00', '--account=acct', '--job_name=gshard1b',
              '--workdir=/shared/runs/gshard', '--data_dir=/shared/tfds',
              '--setup=source .venv/bin/activate', '--eval', '--dry_run', '--',
              *TRAIN_ARGS)
  assert proc.returncode == 0, proc.stderr
  path, script, submit = _script_and_submit(proc.stdout)
  assert path == '/shared/runs/gshard/launch.sbatch'
  assert submit == ['sbatch', path]
  assert script[0] == '#!/bin/bash'
  sbatch = [l for l in script if l.startswith('#SBATCH ')]
  for line in ('--job-name=gshard1b', '--nodes=4', '--ntasks-per-node=8',
               '--gpus-per-node=8', '--time=24:00:00', '--partition=gpu',
               '--account=acct', '--output=/shared/runs/gshard/slurm-%j.out',
               '--signal=TERM@120'):
    assert f'#SBATCH {line}' in sbatch, line
  assert not any('gpus-per-task' in l or 'requeue' in l for l in sbatch)
  assert f'cd {REPO}' in script and 'source .venv/bin/activate' in script
  assert not any('JAX_LOCAL_DEVICE_IDS' in l and not l.startswith('#') for l in script)
  srun = [shlex.split(l) for l in script if l.startswith('srun ')]
  # Nodes are the mesh's domains: data across the 4 nodes.
  expected = TRAIN_ARGS + ['--config.dcn_mesh=(4,1,1)', '--workdir=/shared/runs/gshard',
                           '--config.data.data_dir=/shared/tfds']
  assert srun == [['srun', '--kill-on-bad-exit=1', 'python', 'train.py', *expected],
                  ['srun', '--kill-on-bad-exit=1', 'python', 'eval.py', *expected]]
  # Nothing before the first #SBATCH but the shebang (sbatch stops reading
  # options at the first command).
  first_cmd = next(i for i, l in enumerate(script) if l and not l.startswith('#'))
  assert all(not l.startswith('#SBATCH') for l in script[first_cmd:])


def test_slurm_one_task_per_node():
  proc = _run(SLURM, '--per=node', '--nodes=2', '--gpus_per_node=4', '--requeue',
              '--sbatch=--qos=high', '--workdir=/s/run', '--dry_run', '--',
              '--config', 'configs/gshard.py:1b')
  assert proc.returncode == 0, proc.stderr
  _, script, _ = _script_and_submit(proc.stdout)
  for line in ('--nodes=2', '--ntasks-per-node=1', '--gpus-per-node=4', '--requeue',
               '--qos=high'):
    assert f'#SBATCH {line}' in script, line
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3' in script
  (srun,) = [shlex.split(l) for l in script if l.startswith('srun ')]
  assert srun[3:] == ['train.py', '--config', 'configs/gshard.py:1b',
                      '--config.dcn_mesh=(2,1,1)', '--workdir=/s/run']


def test_slurm_script_is_valid_bash_and_refuses_bad_options(tmp_path):
  proc = _run(SLURM, '--workdir=/s/run', '--dry_run', '--', *TRAIN_ARGS)
  _, script, _ = _script_and_submit(proc.stdout)
  path = tmp_path / 'job.sbatch'
  path.write_text('\n'.join(script) + '\n')
  assert subprocess.run(['bash', '-n', str(path)]).returncode == 0
  for args, message in ((['--per=socket', '--workdir=/s'], '--per=socket'),
                        (['--nodes=0', '--workdir=/s'], '--nodes=0'),
                        ([], '--workdir=DIR is required'),
                        (['--workdir=gs://b/run'], 'on a filesystem all nodes share')):
    bad = _run(SLURM, *args, '--dry_run', '--', '--config', 'c')
    assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


def test_sweep_hands_runs_to_the_launchers(tmp_path):
  """scripts/sweep.py --launcher tpu/slurm --dry_run: one launcher command
  per run, each with the run's overrides and its own workdir."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, 'scripts/sweep.py', '--sweep', 'configs/sweeps/routers.py:small',
         '--workdir', 'gs://bkt/sweeps/routers', '--launcher', 'tpu', '--dry_run',
         '--num_devices=16', '--set=mesh=(1,8,2)',
         '--launcher_args=--tpu=v5p-32 --zone=us-east5-a --data_dir=gs://bkt/tfds']
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  gcloud = [shlex.split(l) for l in proc.stdout.splitlines() if l.startswith('gcloud ')]
  assert len(gcloud) == 3
  remote = [_command_option(argv, 'command') for argv in gcloud]
  first = shlex.split(remote[0].split(' && ')[1])
  assert first[:4] == ['python3', 'train.py', '--config', 'configs/switch.py:cpu']
  assert '--config.moe.router=tokens_choose' in first and '--config.moe.top_k=1' in first
  assert '--config.mesh=(1, 8, 2)' in first
  assert ('--workdir=gs://bkt/sweeps/routers/'
          'router=tokens_choose,top_k=1,renormalize_gates=False') in first
  assert any('--config.moe.router=experts_choose' in r for r in remote)
  assert all(' && python3 eval.py ' in r for r in remote)

  cmd = [sys.executable, 'scripts/sweep.py', '--sweep', 'configs/sweeps/routers.py:small',
         '--workdir', str(tmp_path / 'sw'), '--launcher', 'slurm', '--dry_run',
         '--launcher_args=--nodes=1 --gpus_per_node=8', '--num_devices=8', '--eval=False']
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count('#SBATCH --job-name=routers-router=') == 3
  assert 'eval.py' not in proc.stdout
  assert not os.path.exists(tmp_path / 'sw')   # a dry run writes nothing


@pytest.mark.parametrize('script', [TPU, SLURM])
def test_help_prints_the_header_comment_and_nothing_else(script):
  proc = _run(script, '--help')
  assert proc.returncode == 0, proc.stderr
  with open(script) as f:
    lines = f.read().split('\n')[1:]
  header = lines[:next(i for i, l in enumerate(lines) if not l.startswith('#'))]
  assert proc.stdout.split('\n')[:-1] == [l[2:] for l in header]
  assert '--dry_run' in proc.stdout and 'set -euo' not in proc.stdout
  bad = _run(script, '--bogus')
  assert bad.returncode == 2
  assert bad.stderr.startswith(os.path.basename(script) + ': unknown option --bogus')
