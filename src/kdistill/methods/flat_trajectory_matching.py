"""``flat_trajectory_matching``: trajectory matching on flat (smooth) expert trajectories (FTD).

Du, Jiang, Tan, Zhou & Li, "Minimizing the Accumulated Trajectory Error to Improve Dataset Distillation", CVPR 2023.

The same matching as ``trajectory_matching`` (MTT, whose loss and unrolled student it reuses), with the two changes
FTD makes against the *accumulated trajectory error* (a student trained on the synthetic set drifts from the expert
segment it was matched to, and the errors add up over segments):

* the experts are trained with sharpness-aware steps (each SGD step uses the gradient at
  ``theta + expert_sam_rho * g / ||g||``), so the trajectories the set is matched to run through flat regions of the
  loss, where a perturbed student stays close in loss. FTD uses GSAM (Zhuang et al., 2022); here the plain SAM step
  of Foret et al. (2021), GSAM's surrogate-gap term left out;
* the synthetic set is read out as an exponential moving average over the distillation iterations
  (``synthetic_ema``), which smooths the last, noisy updates (FTD's EMA of the synthetic images).

Use it in place of ``trajectory_matching`` when students trained on the set generalise worse than the matching loss
suggests; the expert trajectories are cached separately (their identity includes ``expert_sam_rho``).
"""

from __future__ import annotations

from ..errors import expect
from ..registry import METHODS
from .trajectory_matching import TrajectoryMatching


@METHODS.register("flat_trajectory_matching")
class FlatTrajectoryMatching(TrajectoryMatching):
    """Trajectory matching on sharpness-aware (flat) expert trajectories with an averaged synthetic set (FTD,
    2023)."""

    registry_name = "flat_trajectory_matching"

    def __init__(self, iterations: int = 60, syn_steps: int = 10, expert_epochs_per_match: int = 2,
                 max_start_epoch: int = 5, num_experts: int = 3, expert_epochs: int = 8, expert_lr: float = 0.01,
                 expert_batch_size: int = 256, lr_data: float = 10.0, lr_lr: float = 1e-5, syn_lr: float = 0.01,
                 batch_syn: int | None = 100, learn_lr: bool = True, expert_sam_rho: float = 0.05,
                 synthetic_ema: float = 0.9) -> None:
        super().__init__(iterations=iterations, syn_steps=syn_steps, expert_epochs_per_match=expert_epochs_per_match,
                         max_start_epoch=max_start_epoch, num_experts=num_experts, expert_epochs=expert_epochs,
                         expert_lr=expert_lr, expert_batch_size=expert_batch_size, lr_data=lr_data, lr_lr=lr_lr,
                         syn_lr=syn_lr, batch_syn=batch_syn, learn_lr=learn_lr)
        expect(expert_sam_rho > 0, "flat_trajectory_matching expert_sam_rho", expert_sam_rho,
               "a positive number (the SAM radius; 0 is plain trajectory_matching)")
        expect(0.0 < synthetic_ema < 1.0, "flat_trajectory_matching synthetic_ema", synthetic_ema,
               "a number in (0, 1) (the EMA decay of the synthetic set)")
        self.expert_sam_rho = float(expert_sam_rho)
        self.synthetic_ema = float(synthetic_ema)
