"""Defaults shared by every recipe; the recipes override what they change.

The defaults are the fields of `moe.run_config.RunConfig`'s sections, the
only place they are written and documented: `model` (moe.config.ModelConfig),
`moe` (moe.config.MoeConfig), `data` (moe.data.DataConfig), `optimizer`
(OptimizerConfig), `eval` (EvalConfig), and the top-level keys of LoopConfig,
ResumeConfig and LayoutConfig. `moe.run_config.build` checks them all before
anything expensive runs. Not a recipe itself: use switch.py, gshard.py,
shared_expert.py, expert_choice.py, adaptive.py or dense.py.
"""

import ml_collections

from moe import run_config


def get_config() -> ml_collections.ConfigDict:
  return run_config.default_config()
