"""Content-adaptive token counts (vlt's extension of the method): per-image K over the nested pattern.

Modules: `allocation` (rules, budgets, p(K | class) draws; torch only), `distortion` (per-image PSNR
curves), `predictor` (single-pass curve predictor), `command` (`vlt allocate`). Import what you use:
this package imports nothing on its own, so the light modules stay light.
"""
