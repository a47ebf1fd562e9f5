"""What the experts learned: routes every token of the evaluation set through
a checkpoint and writes workdir/routes/ (routes.md, routes.json, heatmap.png,
code.png, stability.png). moe/routes.py says what is measured.

  python scripts/routes.py --config configs/switch.py:cpu --workdir runs/switch_cpu
  python scripts/routes.py --config configs/switch.py:cpu --workdir runs/switch_cpu \\
      --step 400 --layer 2 --categories bytes --nostability

Pass the config (and overrides) the run was trained with; any mesh works.
"""

import os
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/

import jax  # noqa: E402

from moe import cli, config_flag, routes_report, run_config  # noqa: E402

_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step to analyse (-1: the latest).')
_STABILITY = flags.DEFINE_bool(
    'stability', True, "Also route a quarter of the set (every 4th batch) with "
    "every other saved checkpoint: how much of the routing each one shares "
    "with the analysed step's.")
_LAYER = flags.DEFINE_integer(
    'layer', None, 'MoE layer (0-based among MoE layers) of the coloured code; '
    'default: the one with the highest category/expert NMI.')
_CATEGORIES = flags.DEFINE_string(
    'categories', None, "Token categories: 'python' (tokenize; the default for "
    "python_stdlib), 'bytes' (byte classes; the default otherwise) or "
    "'package.module:function' (moe/token_categories.py).")
_DOCUMENT = flags.DEFINE_integer(
    'code_document', None, 'Eval-set document of the coloured code '
    '(default: the one with the most evaluated tokens).')
_LINE = flags.DEFINE_integer('code_line', None, 'Its first line (1-based; '
                             'default: a third of the way in).', lower_bound=1)


def main(argv):
  del argv
  run = run_config.build(cli.CONFIG.value)
  cli.init_distributed()
  result = routes_report.run(
      run, cli.WORKDIR.value, step=_STEP.value,
      stability=_STABILITY.value, layer=_LAYER.value,
      categories=_CATEGORIES.value, code_document=_DOCUMENT.value,
      code_line=_LINE.value)
  if jax.process_index() == 0:
    out = os.path.join(cli.WORKDIR.value, 'routes')
    print('\n'.join(routes_report.markdown(result).split('\n')[:12]))
    print(f"\nwrote {out}/routes.md ({result['seconds']:.0f} s)")


if __name__ == '__main__':
  config_flag.run(main)
