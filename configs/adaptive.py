"""Adaptive compute on the CPU Switch recipe (configs/switch.py:cpu): the
same 8 FFN experts of width 256 in every layer, and tokens that may take
fewer (or more) of them. Compared with fixed top-1 over the same experts in
docs/performance.md ("Adaptive compute").

Variants (`--config configs/adaptive.py:VARIANT`):
  cpu    (default) cheap experts, MoE++-style (Jin et al. 2025): top-2
         over the 8 FFN experts plus 8 cheap ones (4 zero, 2 copy, 2
         constant), so a token takes 0, 1 or 2 FFN experts; the compute regularizer steers the mean to 0.95 FFN
         expert per token, and capacity is sized for that mean (a little
         under the buffers and the all-to-all of top-1):
           python train.py --config configs/adaptive.py:cpu --workdir runs/cheap
  top_p  threshold routing (Huang et al. 2024): each token takes FFN experts
         in order of probability until they hold p = 0.5 of it, at most 2,
         steered to 0.95 expert per token on average.
"""

from configs import switch


def get_config(arg: str = 'cpu'):
  c = switch.get_config('cpu')
  c.moe.top_k = 2
  c.moe.compute_target = 0.95     # a mean at or under top-1's one expert
  c.moe.compute_loss_coef = 1.0
  if arg == 'cpu':
    c.moe.num_zero_experts = 4
    c.moe.num_copy_experts = 2
    c.moe.num_const_experts = 2
  elif arg == 'top_p':
    c.moe.top_p = 0.5
  else:
    raise ValueError(f"unknown variant {arg!r} of configs/adaptive.py; choose "
                     "'cpu' (cheap experts) or 'top_p'.")
  return c
