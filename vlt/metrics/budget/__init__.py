"""Token-budget evaluation without a Trainer: PSNR, rFID, gFID (and vltnet scores), tokens and FLOPs
per image at every K, as rows (the columns `TokenBudgetCallback` writes to curves/budget.csv).

    tok, gen = vlt.load("exports/tokenizer-tiny"), vlt.load("exports/dit-tiny")
    evaluator = BudgetEvaluator(ks=[4, 8, 16, 32], metrics=["psnr", "rfid", "gfid"], num_images=64)
    rows = evaluator.evaluate_tokenizer(tok, images)            # images (B, 3, H, W) in [-1, 1] or a loader
    rows += evaluator.evaluate_generator(gen, images)           # generates with the labels of the real side

`CoarseToFineBudget(gen, "4,8@0.3,16@0.5,32@0.7")` evaluates coarse-to-fine sampling the same way.
`evaluate(model, ...)` takes anything implementing `BudgetModule` (the Lightning stage modules do);
`budget_scalars(rows)` names the values as the callback logs them (`budget/psnr@k8`). Under DDP
each rank passes its own share and every rank gets the same rows (`distributed`).
"""

from vlt.metrics.budget.evaluator import BudgetEvaluator
from vlt.metrics.budget.modules import BudgetModule, CoarseToFineBudget, GeneratorBudget, TokenizerBudget
from vlt.metrics.budget.scalars import budget_scalars
from vlt.metrics.budget.settings import METRICS, BudgetSettings, Metric

__all__ = [
    "METRICS",
    "BudgetEvaluator",
    "BudgetModule",
    "BudgetSettings",
    "CoarseToFineBudget",
    "GeneratorBudget",
    "Metric",
    "TokenizerBudget",
    "budget_scalars",
]
