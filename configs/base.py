"""Defaults shared by every recipe; the recipes override what they change.

Every field is documented here once; `moe.run_config.validate` checks them
all before anything expensive runs. Not a recipe itself: use switch.py,
gshard.py, shared_expert.py, expert_choice.py or dense.py.
"""

import ml_collections


def moe_defaults() -> ml_collections.ConfigDict:
  """The MoE layer (moe.config.MoeConfig fields)."""
  m = ml_collections.ConfigDict()
  m.num_experts = 8
  m.top_k = 1                     # experts per token (tokens_choose)
  m.expert_dim = 512              # hidden width F of each expert's SwiGLU
  m.router = 'tokens_choose'      # or 'experts_choose' (not causal: warns)
  m.priority = 'choice'           # capacity priority: 'choice' (all first choices
                                  # first, GShard) or 'position' (causal for any k)
  m.renormalize_gates = False     # divide the top-k gates by their sum
  m.dispatch = 'gather'           # 'gather' (index-based), 'einsum' (one-hot) or
                                  # 'dropless' (no capacity: every token reaches its experts)
  m.group_size = 256              # tokens per routing group (whole sequences)
  m.train_capacity_factor = 1.25  # C = max(ceil(cf*k*S/E), min_capacity)
  m.eval_capacity_factor = 2.0
  m.min_capacity = 4
  m.jitter_eps = 0.0              # Switch jitter on router inputs (training)
  m.logit_noise_std = 0.0         # Gaussian noise on router logits (training)
  m.aux_loss_coef = 0.01          # unit-normalized aux loss (1.0 at uniform)
  m.balance_scope = 'group'       # aux loss's token fractions f_e and mean probs
                                  # P_e per routing 'group', or over the global
                                  # 'batch' (Qiu et al. 2025; capacity stays per group)
  m.z_loss_coef = 1e-3            # ST-MoE router z-loss
  m.num_shared_experts = 0        # always-active experts of width expert_dim
  m.balance_bias_rate = 0.0       # DeepSeek-V3 aux-loss-free bias step (0: off)
  # Adaptive compute (moe.routing): cheap experts in the router's choice set
  # (no buffer, no all-to-all, no capacity) and threshold routing.
  m.num_zero_experts = 0          # output nothing (MoE++)
  m.num_copy_experts = 0          # output the token's input
  m.num_const_experts = 0         # output a learned vector
  m.top_p = 0.0                   # > 0: choices in order of probability until
                                  # they sum to p, at most top_k (Huang et al. 2024)
  m.compute_target = 0.0          # FFN experts per token to steer to; also the
                                  # capacity's expected choices (0: top_k * E / choices)
  m.compute_loss_coef = 0.0       # compute regularizer (n - target)^2 (needs a target)
  return m


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # init, data order and router noise

  # Model (moe.config.ModelConfig fields).
  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 0          # 0: the tokenizer's (bytes: 384)
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.head_dim = 32
  c.model.mlp_dim = 512           # dense SwiGLU hidden width
  c.model.max_seq_len = 128
  c.model.rope_theta = 10_000.0
  c.model.dtype = 'float32'       # compute dtype: 'float32' or 'bfloat16'
  c.model.moe_every = 2           # every n-th layer is MoE (1: all)
  c.model.remat = False           # recompute blocks in the backward pass (memory)
  c.model.attention = 'auto'      # 'xla', 'cudnn' (flash, CUDA + bf16) or 'auto':
                                  # cudnn where it applies, else xla
  c.moe = moe_defaults()          # None for a dense model

  # Data (moe.data.DataConfig fields).
  c.data = ml_collections.ConfigDict()
  c.data.name = 'python_stdlib'   # 'text_files', or a TFDS name ('c4/en')
  c.data.data_dir = ''            # '': TFDS default; may be gs://bucket/tfds
  c.data.text_files = ''          # glob or directory, for name='text_files'
  c.data.tokenizer = 'bytes'      # or a SentencePiece .model path
  c.data.eval_split = 'validation'
  c.data.row_shuffle = 'auto'     # training rows: 'global' (a permutation of every
                                  # packed row), 'window' (for corpora too large to
                                  # index) or 'auto' (global up to 1 GiB stored)
  c.data.shuffle_window = 8192    # rows per shuffle window ('window' order)

  # Batches and schedule.
  c.batch_size = 16               # global sequences per step
  c.seq_len = 128
  c.num_steps = 1000
  c.restore_step = -1             # -1: resume from the newest checkpoint; N: from step <= N
  c.skip_batches = 0              # on (re)start, skip this many batches (loss spikes)
  c.init_from = ''                # dense run's workdir: upcycle a fresh MoE from its checkpoint (moe/upcycle.py)

  # Optimizer.
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'      # or 'adafactor' (large runs)
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.decay = 'cosine'    # 'cosine', 'linear' or 'constant'
  c.optimizer.min_lr_ratio = 0.1  # final lr / peak lr
  c.optimizer.weight_decay = 0.1  # lr * 0.1 * p a step (AdamW and Adafactor);
                                  # not on norms, biases or the router bias
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.grad_clip = 1.0     # global-norm clipping (0: off)

  # Mesh: (data, expert, model) inside one domain (a GPU node, a TPU slice);
  # -1 = the rest of the domain's devices. dcn_mesh: domains per axis across
  # the slow network (the whole mesh is mesh x dcn_mesh); data goes across.
  c.mesh = (1, -1, 1)
  c.dcn_mesh = (1, 1, 1)
  c.fsdp = False                  # shard weights' d_model over `data`

  # Loop.
  c.log_every = 50
  c.eval_every = 250
  c.eval_batches = 8              # periodic evals: batches spread over the
                                  # validation split (0: the whole split)
  c.final_eval_batches = 0        # the last step's eval and eval.py (0: whole split)
  c.checkpoint_every = 500
  c.max_to_keep = 3
  c.nonfinite = 'skip'            # non-finite loss/grads: 'skip' the update or 'stop'
  c.restore_fallback = False      # damaged latest checkpoint: use the previous one
  c.accept_config_change = False  # resume under a changed model/data/optimizer/seed
                                  # config (recorded in starts.jsonl); else refused
  c.peak_flops_per_device = 0.0   # MFU peak; 0: measured by a matmul probe
  c.progress_bar = True           # tqdm on process 0

  # eval.py: capacity what-if factors ('dropless': no token dropped).
  c.eval = ml_collections.ConfigDict()
  c.eval.capacity_factors = (1.0, 1.25, 2.0, 'dropless')
  c.eval.checkpoint_step = -1     # -1: latest
  # eval.py: compute what-if, each row without capacity drops: 'as_trained',
  # thresholds p in (0, 1] (threshold routing, at most moe.top_k choices),
  # 'no_cheap' (cheap experts off); ('auto',): for adaptive compute (cheap
  # experts or moe.top_p) as trained, p = 0.5 ... 1.0 and no_cheap; else none.
  c.eval.compute_what_if = ('auto',)
  return c
