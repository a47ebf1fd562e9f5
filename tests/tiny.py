"""The tiny Transformer trunk the end-to-end tests shrink recipes to."""


def shrink_trunk(c, seq_len: int = 32):
  """d_model 32, 2 layers of 2 heads x 16, dense width 64, sequences of
  `seq_len`; the MoE section is left as the recipe has it."""
  c.model.d_model = 32
  c.model.num_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 64
  c.model.num_layers = 2
  c.model.max_seq_len = c.seq_len = seq_len
  return c
