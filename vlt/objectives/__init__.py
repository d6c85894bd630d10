"""Objectives (pure torch): reconstruction losses for stage 1, flow matching for stage 2."""

from vlt.objectives.recon import PerceptualNet, ReconLoss, psnr

__all__ = ["PerceptualNet", "ReconLoss", "psnr"]
