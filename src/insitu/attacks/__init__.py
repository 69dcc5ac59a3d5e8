"""Attacks that measure what a defence buys: membership inference, reconstruction, re-identification,
and the side channels around the protected vectors (training losses, evaluation answers, sampling).

    from insitu.attacks import loss_threshold, lira, analytic_linear, gradient_matching, linkage_attack
    from insitu.attacks import loss_equation_attack, evaluation_oracle, sampling_figures

Every attack has a test showing it succeeds with no defence, so a defended result means something.
The privacy report (``insitu privacy report`` / ``compare``) runs them against finished runs.
"""
from insitu.attacks.linkage import LinkageResult, ReidentificationRisk, linkage_attack, reidentification_before_after
from insitu.attacks.membership import MembershipAttack, MembershipResult, lira, logit_confidence, loss_threshold, train_shadows
from insitu.attacks.metrics import RocSummary, auc_interval, psnr, roc_summary, ssim, tpr_at_fpr
from insitu.attacks.observer import ObservedRound, observe_round
from insitu.attacks.probe import ProbeResult, attack_images, attack_tabular, single_record_round
from insitu.attacks.reconstruction import MatchConfig, analytic_linear, gradient_matching, score_images, score_tabular
from insitu.attacks.side_channels import (
    LossEquationResult,
    OracleResult,
    SamplingFigures,
    evaluation_oracle,
    known_sampling_epsilon,
    loss_equation_attack,
    sampling_figures,
)

__all__ = [
    "LinkageResult",
    "LossEquationResult",
    "OracleResult",
    "SamplingFigures",
    "MatchConfig",
    "MembershipAttack",
    "MembershipResult",
    "ObservedRound",
    "ProbeResult",
    "ReidentificationRisk",
    "RocSummary",
    "analytic_linear",
    "attack_images",
    "auc_interval",
    "attack_tabular",
    "evaluation_oracle",
    "gradient_matching",
    "known_sampling_epsilon",
    "linkage_attack",
    "lira",
    "loss_equation_attack",
    "logit_confidence",
    "loss_threshold",
    "observe_round",
    "psnr",
    "reidentification_before_after",
    "roc_summary",
    "sampling_figures",
    "score_images",
    "score_tabular",
    "single_record_round",
    "ssim",
    "tpr_at_fpr",
    "train_shadows",
]
