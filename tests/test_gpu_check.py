"""scripts/gpu_check.sh is the one prepared run for a scarce GPU, and no GPU
has run it yet: every command it would run must be well-formed against the
current repository. The script runs here with `python` and `nvidia-smi`
replaced by recorders on PATH; each recorded pytest call is then collected
for real (it must select tests) and the bench call's flags parsed for real."""

import json
import os
import re
import stat
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record_commands(tmp_path) -> list[dict]:
  """The script's `python` calls: argv and JAX_PLATFORMS, in order."""
  bin_dir, log = tmp_path / 'bin', tmp_path / 'calls.jsonl'
  bin_dir.mkdir()
  recorder = (f'#!{sys.executable}\nimport json, os, sys\n'
              f'with open({str(log)!r}, "a") as f:\n'
              '  f.write(json.dumps({"argv": sys.argv[1:], '
              '"platforms": os.environ.get("JAX_PLATFORMS")}) + "\\n")\n')
  for name, text in (('python', recorder),
                     ('nvidia-smi', '#!/bin/sh\necho "NVIDIA H200, 143771 MiB"\n')):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(stat.S_IRWXU)
  proc = subprocess.run(
      ['bash', os.path.join('scripts', 'gpu_check.sh'), str(tmp_path / 'out')],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}'})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return [json.loads(line) for line in log.read_text().splitlines()]


def test_every_command_of_gpu_check_is_well_formed(tmp_path):
  calls = _record_commands(tmp_path)
  tests = [c for c in calls if c['argv'][:2] == ['-m', 'pytest']]
  bench = [c for c in calls if c['argv'][:1] == ['scripts/bench.py']]
  # Oracle/routing and cuDNN attention on the GPU; the mesh tests on 8 fake CPUs.
  assert [c['platforms'] for c in tests] == ['cuda', 'cuda', 'cpu']
  assert len(bench) == 1

  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  for call in tests:
    selection = [a for a in call['argv'][2:] if a != '-q']
    proc = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', *selection],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (selection, proc.stdout[-3000:], proc.stderr[-3000:])
    collected = re.search(r'(\d+) tests? collected', proc.stdout)
    assert collected and int(collected.group(1)) >= 1, (selection, proc.stdout[-3000:])

  # The bench's flags, config overrides included, parse: --helpshort then
  # prints the bench's own flags (a misspelled flag stops parsing first).
  proc = subprocess.run([sys.executable, *bench[0]['argv'], '--helpshort'], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  out = proc.stdout + proc.stderr
  assert 'Flags parsing error' not in out, out[-3000:]
  assert '--layer_calls' in out and '--steps' in out, out[-3000:]
