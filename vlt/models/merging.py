"""Learnable global merging (LGM): one merge pattern per K, learned, shared by every image.

Letters: B batch, N latent slots, K merged tokens, C channels, E merge-embedding width (d_m).

Each slot i has a learnable merge embedding e_i (N, E). The distance 1 - cos(e_i, e_j) feeds ONE
average-linkage clustering; cutting its tree at exactly K clusters gives the pattern for each K, and
cuts of one tree are nested (coarser K are unions of finer clusters). Training adds noise to the
similarities (exploration) and merges with a straight-through assignment, so the reconstruction
loss reaches e; the alignment loss pulls cos(e) towards the batch-averaged cos(z) so that slots
that usually agree merge first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform
from torch import Tensor, nn

from vlt.models.baselines import bipartite_assignment, pad, truncate
from vlt.models.merge_ops import column_normalise, merge, one_hot, unmerge
from vlt.models.pattern import MergePattern

# Similarity given to slot pairs in different blocks: far beyond any cosine, so average linkage
# joins blocks only after everything inside them (and only when K < blocks).
CROSS_BLOCK_SIMILARITY = -100.0


class MergeResult(NamedTuple):
    tokens: Tensor  # (B, K, C) merged tokens (cluster means, or kept slots for nested dropout)
    sizes: Tensor  # (K,) global pattern or (B, K) per-image pattern: slots per token, float
    z_hat: Tensor  # (B, N, C) what the decoder sees: tokens broadcast back to N slots


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters by their smallest member slot, so tables do not depend on the order of merges."""
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)  # cluster ids sorted by first occurrence
    new = np.empty_like(order)
    new[order] = np.arange(order.size)
    return new[np.searchsorted(np.unique(labels), labels)]


def block_ids(n: int, blocks: int) -> np.ndarray:
    """(N,) block index of each slot: `blocks` contiguous groups of N/blocks slots."""
    if blocks < 1 or n % blocks:
        raise ValueError(f"{n} slots do not split into {blocks} equal blocks")
    return np.arange(n) // (n // blocks)


def block_mask(n: int, blocks: int, device: torch.device | None = None) -> Tensor:
    """(N, N) bool: slots i and j lie in the same block (the pairs that can merge), diagonal included."""
    block = torch.from_numpy(block_ids(n, blocks)).to(device)
    return block[:, None] == block[None, :]


def similarity(
    e: Tensor, *, noise: float = 0.0, blocks: int = 1, generator: torch.Generator | None = None
) -> np.ndarray:
    """(N, N) float64 cosine similarity of e (N, E), with symmetric clamped-Gaussian noise
    (times `noise`) and cross-block pairs set to CROSS_BLOCK_SIMILARITY when blocks > 1.

    Noisy similarities may exceed 1 (up to 1 + noise): they are kept as they are, so distances
    1 - sim can be slightly negative, as in the reference code (see `hierarchy`).

    The product runs on e's device; the O(N^2) elementwise work runs in numpy, which stays fast
    where many small multi-threaded torch kernels on a busy CPU do not.
    """
    n = e.shape[0]
    en = F.normalize(e.detach().float(), dim=-1)
    sim = (en @ en.T).double().cpu().numpy()  # (N, N)
    if noise > 0:
        g = torch.randn(n, n, generator=generator).numpy().astype(np.float64)
        g = np.triu(np.clip(g, -1.0, 1.0) * noise, 1)
        sim = sim + g + g.T
    if blocks > 1:
        block = block_ids(n, blocks)
        sim = np.where(block[:, None] != block[None, :], CROSS_BLOCK_SIMILARITY, sim)
    return sim


def cut_levels(tree: np.ndarray, n: int, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """Exact cuts of a linkage tree: replay its first N - K merges for each K (nested by construction).

    Same result as scipy's `cut_tree` for a monotone linkage such as average, but exact at K = N too
    (cut_tree returns one cluster there on scipy 1.17) and O(N^2) numpy-free Python instead of
    cut_tree's much slower full-tree pass. Labels are numbered by smallest member slot.
    """
    want = {n - int(k): int(k) for k in ks}
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    out = {}
    for step in range(max(want) + 1):
        if step in want:
            labels = np.empty(n, dtype=np.int64)
            for c, slots in enumerate(members.values()):
                labels[slots] = c
            out[want[step]] = _relabel(labels)
        if step < n - 1:
            a, b = int(tree[step, 0]), int(tree[step, 1])
            members[n + step] = members.pop(a) + members.pop(b)
    return dict(sorted(out.items()))


def hierarchy(
    e: Tensor,
    ks: Sequence[int],
    *,
    noise: float = 0.0,
    blocks: int = 1,
    generator: torch.Generator | None = None,
) -> dict[int, Tensor]:
    """Nested cuts of one average-linkage tree over merge embeddings.

    Args:
        e: (N, E) merge embeddings (no gradient is taken here).
        ks: cluster counts wanted, each in [1, N].
        noise: scale of the clamped N(0,1) noise on similarities (training exploration; 0 in eval).
        blocks: restrict merges to `blocks` contiguous groups of N/blocks slots (for K >= blocks).
        generator: CPU generator for the noise.

    Returns:
        {K: assign (N,) long on e's device}, sorted by K, cluster ids in [0, K) numbered by smallest
        member slot.

    Distances 1 - sim are NOT clipped at 0. With exploration noise, near-duplicate embeddings get
    distances in [-noise, 0); clipping them would tie all such pairs at 0 and let the tie order,
    not the noise, decide which of them merge first. Average linkage needs no non-negativity: the
    Lance-Williams update (size-weighted mean of the two distances) keeps the merge heights monotone
    for any real dissimilarities, which is what scipy's nearest-neighbour-chain algorithm and our
    `cut_levels` rely on. The reference (`AgglomerativeClustering(metric="precomputed",
    linkage="average")`, i.e. scipy's average linkage on the upper triangle) runs on the same
    unclipped values.
    """
    n = e.shape[0]
    bad = [k for k in ks if not 1 <= k <= n]
    if bad or not ks:
        raise ValueError(f"cluster counts {list(ks)} must be a non-empty list of K in [1, {n}]")
    dist = 1.0 - similarity(e, noise=noise, blocks=blocks, generator=generator)
    if not np.isfinite(dist).all():
        raise FloatingPointError(
            "merge embeddings are not finite (NaN/inf similarities): training diverged; lower "
            "model.init_args.optim.lr or set trainer.gradient_clip_val"
        )
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="average") if n > 1 else np.zeros((0, 4))
    cuts = cut_levels(tree, n, ks)
    return {k: torch.from_numpy(a).to(e.device) for k, a in cuts.items()}


def straight_through(e: Tensor, assign: Tensor, k: int, tau: float = 0.1) -> Tensor:
    """Hard one-hot Gamma (N, K) in the forward pass, soft-assignment gradients into e.

    Prototypes c_j = normalize(sum_{i in S_j} normalize(e_i)) are detached (built from the
    normalised embeddings, as in the reference: with raw e a long embedding would dominate its
    cluster's prototype); the soft assignment is softmax_j(normalize(e_i) . c_j / tau);
    Gamma_st = Gamma + soft - sg(soft).
    """
    gamma = one_hot(assign, k).to(e.dtype)  # (N, K)
    en = F.normalize(e, dim=-1)  # (N, E)
    proto = F.normalize(gamma.T @ en.detach(), dim=-1)  # (K, E)
    soft = torch.softmax(en @ proto.T / tau, dim=-1)  # (N, K)
    return gamma + soft - soft.detach()


def cosine_matrix(x: Tensor) -> Tensor:
    """(..., N, E) -> (..., N, N) pairwise cosine similarity."""
    xn = F.normalize(x, dim=-1)
    return xn @ xn.transpose(-1, -2)


def alignment_loss(e: Tensor, z: Tensor, margin: float = 0.25, blocks: int = 1) -> Tensor:
    """In-block hinge sum_{(i,j) in-block} relu(|cos(e_i, e_j) - sg(mean_B cos(z_i, z_j))| - margin)
    divided by the number of in-block (i, j) entries.

    e: (N, E), z: (B, N, C) -> scalar. Only pairs of one block can merge (`similarity` puts the
    others at CROSS_BLOCK_SIMILARITY), so cross-block pairs get no gradient. The count includes the
    N diagonal entries (whose hinge is 0: both cosines are 1), as the reference's block mask does:
    N^2 / blocks in all. Callers skip the loss on K = N steps (nothing merges there).
    """
    n = e.shape[0]
    cos_e = cosine_matrix(e)  # (N, N)
    cos_z = cosine_matrix(z.detach().float()).mean(0).to(cos_e.dtype)  # (N, N)
    inside = block_mask(n, blocks, e.device)  # (N, N)
    return F.relu((cos_e - cos_z).abs() - margin)[inside].sum() / inside.sum()


MergeMode = Literal["lgm", "nested", "tome", "fixed", "none"]
MODES: tuple[str, ...] = ("lgm", "nested", "tome", "fixed", "none")


class Merger(nn.Module):
    """Holds the merge embeddings and the K policy; merges slot latents to K tokens and back.

    Modes:
        "lgm": learned global merging (this module's reason to exist).
        "fixed": learned global merging at one K (`fixed_k`) only: a tokenizer trained for that K.
        "nested": nested dropout; tokens are the first K slots, `pattern()` is a truncation and
            `unmerge` pads the N - K dropped slots with a mask vector (learned if `channels` is given,
            else zeros).
        "tome": per-image bipartite matching on z; sizes are (B, K), `pattern()` is None and `unmerge`
            is impossible without the image (use `MergeResult.z_hat`).
        "none": no merging, K is always N.
    K == N never merges, in every mode.

    Args:
        mode: one of MODES.
        n_slots: N.
        grid: the K values to train and export, e.g. (4, 8, 16, 32) for N=32.
        grid_weights: sampling weights of the grid (uniform if None).
        embed_dim: width E of the merge embeddings.
        noise: similarity noise scale in training (the reference uses 0.1).
        blocks: merges stay inside `blocks` contiguous groups of N/blocks slots (reference: 4).
        tau: softmax temperature of the straight-through assignment.
        margin: hinge margin of the alignment loss.
        fixed_k: the single K of "fixed" mode.
        channels: C, for a learned nested-dropout mask vector.
        init_std: std of the merge embeddings at init (cosines do not depend on it).
    """

    def __init__(
        self,
        *,
        mode: MergeMode = "lgm",
        n_slots: int,
        grid: Sequence[int] = (),
        grid_weights: Sequence[float] | None = None,
        embed_dim: int = 64,
        noise: float = 0.1,
        blocks: int = 1,
        tau: float = 0.1,
        margin: float = 0.25,
        fixed_k: int | None = None,
        channels: int | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown merge mode {mode!r}; choose one of {MODES}")
        if mode == "fixed":
            if fixed_k is None:
                raise ValueError("merge mode 'fixed' needs fixed_k")
            grid, grid_weights = (fixed_k,), None
        elif mode == "none":
            grid, grid_weights = (n_slots,), None
        grid = [int(k) for k in grid]
        if not grid or any(not 1 <= k <= n_slots for k in grid):
            raise ValueError(f"grid {grid} must be a non-empty list of K in [1, {n_slots}]")
        weights = [1.0] * len(grid) if grid_weights is None else [float(w) for w in grid_weights]
        if len(weights) != len(grid) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"grid_weights {grid_weights} must be {len(grid)} non-negative numbers")
        if n_slots % blocks:
            raise ValueError(f"{n_slots} slots do not split into {blocks} equal blocks")
        self.mode, self.n_slots, self.grid = mode, n_slots, grid
        self.noise, self.blocks, self.tau, self.margin = noise, blocks, tau, margin
        # A plain tensor, not a buffer: DDP broadcasts buffers on every forward, which hangs validation
        # when ranks hold different numbers of batches.
        self.grid_weights = torch.tensor(weights)
        self.e = nn.Parameter(torch.randn(n_slots, embed_dim) * init_std) if self.learned else None
        self.mask = nn.Parameter(torch.zeros(channels)) if mode == "nested" and channels else None
        self._cache: dict[int, Tensor] = {}
        self._cache_key: tuple[int, int] | None = None

    @property
    def learned(self) -> bool:
        return self.mode in ("lgm", "fixed")

    def sample_k(self, generator: torch.Generator | None = None) -> int:
        """A training K drawn from the weighted grid."""
        i = torch.multinomial(self.grid_weights, 1, generator=generator).item()
        return self.grid[int(i)]

    def assignment(self, k: int) -> Tensor:
        """Noise-free global assignment (N,) for K=k of a learned pattern, cached until e changes."""
        key = (self.e._version, self.e.data_ptr())
        if key != self._cache_key:
            self._cache, self._cache_key = {}, key
        if k not in self._cache:
            self._cache.update(hierarchy(self.e, sorted({*self.grid, k}), blocks=self.blocks))
        return self._cache[k]

    def pattern(self, e: Tensor | None = None) -> MergePattern | None:
        """The global pattern over the grid (eval: noise-free cuts), None for per-image ToMe.

        Args:
            e: merge embeddings to cut instead of the live ones (e.g. the EMA weights of a checkpoint).
        """
        if self.learned:
            if e is None:
                assign = {k: self.assignment(k).cpu() for k in self.grid}
            else:
                assign = hierarchy(e.detach().float().cpu(), self.grid, blocks=self.blocks)
            return MergePattern(self.n_slots, assign, kind="fixed" if self.mode == "fixed" else "lgm")
        if self.mode == "nested":
            return MergePattern.truncation(self.n_slots, self.grid)
        if self.mode == "none":
            return MergePattern.identity(self.n_slots)
        return None

    def fill(self) -> Tensor | None:
        """The vector dropped slots are decoded with (nested dropout's mask), None otherwise."""
        return self.mask.detach().clone() if self.mask is not None else None

    def forward(self, z: Tensor, k: int, *, generator: torch.Generator | None = None) -> MergeResult:
        """z (B, N, C), K -> MergeResult. Learned modes draw a noisy pattern and merge with the
        straight-through Gamma in training; in eval they use the cached noise-free pattern."""
        n = z.shape[1]
        if n != self.n_slots or not 1 <= k <= n or (self.mode == "none" and k != n):
            raise ValueError(f"cannot merge {n} slots to K={k} in mode {self.mode!r} (N={self.n_slots})")
        if k == n:
            return MergeResult(tokens=z, sizes=z.new_ones(n), z_hat=z)
        if self.mode == "nested":
            tokens, z_hat = truncate(z, k, self._mask_vector(z))
            return MergeResult(tokens=tokens, sizes=z.new_ones(k), z_hat=z_hat)
        if self.mode == "tome":
            gamma = bipartite_assignment(z, k).to(z.dtype)  # (B, N, K)
            tokens = merge(z, column_normalise(gamma))  # (B, K, C)
            return MergeResult(tokens=tokens, sizes=gamma.sum(1), z_hat=unmerge(tokens, gamma))
        if self.training:
            assign = hierarchy(self.e, [k], noise=self.noise, blocks=self.blocks, generator=generator)[k]
            gamma = straight_through(self.e, assign, k, self.tau)  # (N, K), gradients into e
        else:
            gamma = one_hot(self.assignment(k), k).to(z.device)  # (N, K)
        tokens = merge(z, column_normalise(gamma))  # (B, K, C)
        sizes = gamma.detach().sum(0).round().to(z.dtype)  # (K,)
        return MergeResult(tokens=tokens, sizes=sizes, z_hat=unmerge(tokens, gamma))

    def unmerge(self, tokens: Tensor) -> Tensor:
        """tokens (B, K, C) -> z_hat (B, N, C) with the global pattern (the eval pattern)."""
        k = tokens.shape[1]
        if k == self.n_slots:
            return tokens
        if self.mode == "nested":
            return pad(tokens, self.n_slots, self._mask_vector(tokens))
        if self.mode == "tome":
            raise ValueError("tome patterns are per image: unmerge with MergeResult.z_hat instead")
        return unmerge(tokens, one_hot(self.assignment(k), k).to(tokens.device))

    def alignment_loss(self, z: Tensor) -> Tensor:
        """In-block alignment of merge-embedding cosines with latent cosines (0 for unlearned modes).
        The caller decides the K: skip it on K = N steps, as `LitTokenizer.training_step` does."""
        if not self.learned:
            return z.new_zeros(())
        return alignment_loss(self.e, z, self.margin, self.blocks)

    def _mask_vector(self, z: Tensor) -> Tensor:
        return self.mask if self.mask is not None else z.new_zeros(z.shape[-1])
