"""Lightning callbacks: token-budget curves (rFID/gFID/PSNR vs tokens and FLOPs)."""

from vlt.callbacks.token_budget import BudgetModule, TokenBudgetCallback

__all__ = ["BudgetModule", "TokenBudgetCallback"]
