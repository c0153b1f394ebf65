"""Settings of the attention-aware methods' mask solver (plain data, no JAX)."""

import dataclasses

from attnprune_jax import validation
from attnprune_jax.errors import InputError

OPTIMIZERS = ("adam", "sgd")  # optax.adam, optax.sgd (`layer_masks` maps the names)


@dataclasses.dataclass(frozen=True)
class MaskSolverConfig:
  """Settings of the attention-aware methods (all our choice; the paper gives none).

  Attributes:
    optimizer: "adam" or "sgd" (plain gradient descent, the paper's Algorithm 1).
    lr: step size.
    lam: λ of the (λ/2)(‖M_Q‖² + ‖M_K‖²) term.
    steps: optimizer steps of "attn" before its single cut.
    rounds: prune steps of the progressive methods.
    steps_per_round: optimizer steps before each prune step.
    reweight_steps: extra steps on the final support ("attn-reweight" only).
    reweight_lam: λ during those extra steps. The L2 term pulls the kept values towards 0,
      which shrinks the attention logits: 0 by default (our choice, see paper_repro.md).
    windows_per_step: calibration windows per optimizer step (must divide their count).
  """
  optimizer: str = "adam"
  lr: float = 1e-2
  lam: float = 3e-3
  steps: int = 100
  rounds: int = 8
  steps_per_round: int = 12
  reweight_steps: int = 40
  reweight_lam: float = 0.0
  windows_per_step: int = 2

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}",
                       argument="optimizer")
    validation.check_scalar("lr", self.lr, minimum=0.0, strict=True)
    validation.check_scalar("lam", self.lam, minimum=0.0)
    validation.check_scalar("reweight_lam", self.reweight_lam, minimum=0.0)
    for name in ("steps", "rounds", "steps_per_round", "reweight_steps"):
      validation.check_positive_int(name, getattr(self, name), maximum=validation.MAX_STEPS)
    validation.check_positive_int("windows_per_step", self.windows_per_step)


BLOCK_TARGETS = ("teacher", "local")


@dataclasses.dataclass(frozen=True)
class BlockSolverConfig(MaskSolverConfig):
  """Settings of the whole-block attention-aware methods (`block_masks`; all our choice).

  The inherited fields mean what they mean for the q/k methods, on every target's mask.

  Attributes:
    attention_weight: weight of the paper's attention-matrix term beside the attention half's
      output error (both relative: squared error over the reference's squared norm).
    target: what each half of a pruned block is fitted to: "teacher", the dense model's own
      residual stream after that half (so errors from earlier blocks are corrected, not
      carried), or "local", the dense half's output on the pruned model's inputs (the
      protocol of Wanda, SparseGPT and the q/k methods).
  """
  lr: float = 3e-3
  lam: float = 0.0
  attention_weight: float = 1.0
  target: str = "teacher"

  def __post_init__(self):
    super().__post_init__()
    validation.check_scalar("attention_weight", self.attention_weight, minimum=0.0)
    if self.target not in BLOCK_TARGETS:
      raise InputError(f"target must be one of {BLOCK_TARGETS}, got {self.target!r}",
                       argument="target")
