"""Baseline token-reduction patterns that share the `Merger` interface (see vlt.models.merging).

Letters: B batch, N latent slots, K kept or merged tokens, L current token count, C channels.

- Nested dropout / tail truncation (FlexTok, One-D-Piece): keep the first K slots; the decoder gets
  a mask vector in place of the N - K dropped ones. Nothing is merged, every kept token has size 1.
- ToMe-style bipartite soft matching on z: a per-image, data-dependent pattern, repeated until K
  tokens remain, with sizes tracked and size-weighted means. The paper's ablation shows why LGM is
  global: a generator cannot know such a pattern at sampling time.
- Fixed-K is not a separate algorithm: the `Merger` in "fixed" mode is learned global merging that
  always uses one K (a tokenizer trained for that K only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlt.models.merge_ops import column_normalise, merge


def pad(tokens: Tensor, n: int, mask: Tensor) -> Tensor:
    """tokens (B, K, C) -> (B, N, C): the first K slots, then N - K copies of mask (C,)."""
    b, k, c = tokens.shape
    fill = mask.to(tokens.dtype).expand(b, n - k, c)  # (B, N-K, C)
    return torch.cat([tokens, fill], dim=1)


def truncate(z: Tensor, k: int, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Keep the first k slots. z: (B, N, C), mask: (C,) -> tokens (B, K, C), z_hat (B, N, C)."""
    tokens = z[:, :k]  # (B, K, C)
    return tokens, pad(tokens, z.shape[1], mask)


def _bipartite_step(x: Tensor, r: int) -> Tensor:
    """One round of bipartite soft matching on tokens x (B, L, C): the r most similar tokens of the
    even set A merge into their best match in the odd set. Returns new_index (B, L) in [0, L - r)."""
    bsz, length, _ = x.shape
    xn = F.normalize(x.float(), dim=-1)
    a, b = xn[:, ::2], xn[:, 1::2]  # (B, La, C), (B, Lb, C)
    la, lb = a.shape[1], b.shape[1]
    best, match = (a @ b.transpose(1, 2)).max(dim=-1)  # (B, La) each
    order = best.argsort(dim=-1, descending=True)  # (B, La)
    src, keep = order[:, :r], order[:, r:]  # merged / kept A tokens
    new_a = torch.empty(bsz, la, dtype=torch.long, device=x.device)
    new_a.scatter_(1, keep, torch.arange(la - r, device=x.device).expand(bsz, -1))
    new_a.scatter_(1, src, la - r + match.gather(1, src))
    new_index = torch.empty(bsz, length, dtype=torch.long, device=x.device)
    new_index[:, ::2] = new_a
    new_index[:, 1::2] = la - r + torch.arange(lb, device=x.device)
    return new_index


def bipartite_assignment(z: Tensor, k: int) -> Tensor:
    """Per-image hard assignment (B, N, K) from repeated bipartite soft matching on z (B, N, C).

    Each round merges min(L - K, L // 2) tokens; matching uses the current size-weighted means.
    """
    bsz, n, _ = z.shape
    gamma = torch.eye(n, device=z.device).expand(bsz, n, n)  # (B, N, L)
    with torch.no_grad():
        while gamma.shape[-1] > k:
            length = gamma.shape[-1]
            x = merge(z.detach(), column_normalise(gamma))  # (B, L, C) size-weighted means
            r = min(length - k, length // 2)
            step = F.one_hot(_bipartite_step(x, r), length - r).float()  # (B, L, L-r)
            gamma = gamma @ step  # (B, N, L-r)
    return gamma
