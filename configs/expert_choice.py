"""Experts-choose recipe (Zhou et al. 2022): each expert picks its top-C
tokens of a group. NOT causal: a token's routing depends on later tokens of
its group, so a decoder trained this way leaks future information; training
warns. Useful as a load-balance reference and for non-causal use.

Variants (`--config configs/expert_choice.py:VARIANT`):
  cpu  (default):
         python train.py --config configs/expert_choice.py:cpu --workdir runs/ec
"""

from configs import base


def get_config(arg: str = 'cpu'):
  c = base.get_config()
  c.moe.router = 'experts_choose'
  c.moe.train_capacity_factor = 1.0
  c.moe.eval_capacity_factor = 1.0
  c.moe.aux_loss_coef = 0.0
  if arg != 'cpu':
    raise ValueError(f"unknown variant {arg!r} of configs/expert_choice.py; choose 'cpu'.")
  return c
