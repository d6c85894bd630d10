"""Evaluation metrics: FID (torchmetrics, Inception or a named proxy), cached real statistics, rate."""

from vlt.metrics.fid import (
    FrechetDistance,
    InceptionExtractor,
    ProxyExtractor,
    build_fid,
    find_inception_weights,
    frechet_distance,
    make_extractor,
    metric_name,
)
from vlt.metrics.rate import measured_flops, psnr, transformer_flops
from vlt.metrics.real_stats import RealStats, RealStatsKey

__all__ = [
    "FrechetDistance",
    "InceptionExtractor",
    "ProxyExtractor",
    "RealStats",
    "RealStatsKey",
    "build_fid",
    "find_inception_weights",
    "frechet_distance",
    "make_extractor",
    "measured_flops",
    "metric_name",
    "psnr",
    "transformer_flops",
]
