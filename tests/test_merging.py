"""Learned global merging and its baselines: exact nested cuts, round trips, gradients, oracles."""

from __future__ import annotations

import pytest
import torch

from vlt.models.baselines import bipartite_assignment
from vlt.models.merging import Merger, alignment_loss, hierarchy, straight_through
from vlt.models.pattern import MergePattern
from vlt.nn.attention import Attention, size_bias

N, C, GRID = 32, 16, (1, 4, 8, 16, 32)


def _merger(mode: str = "lgm", **kw) -> Merger:
    return Merger(mode=mode, n_slots=N, grid=(4, 8, 16, 32), fixed_k=8, channels=C, embed_dim=8, **kw)


@pytest.mark.parametrize("noise", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("blocks", [1, 4])
def test_hierarchy_is_nested_with_exact_counts(noise: float, blocks: int) -> None:
    torch.manual_seed(0)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        cuts = hierarchy(torch.randn(N, 8), range(1, N + 1), noise=noise, blocks=blocks, generator=gen)
        for k, a in cuts.items():
            assert a.unique().numel() == k and a.min() == 0 and a.max() == k - 1
            # Numbered by smallest member: first occurrences appear in order 0, 1, 2, ...
            first = [int(a[: i + 1].max()) for i in range(N)]
            assert first == sorted(first) and a[0] == 0
        assert MergePattern(N, cuts).nested()


def test_block_restriction_keeps_clusters_inside_blocks() -> None:
    torch.manual_seed(0)
    block = torch.arange(N) // (N // 4)
    cuts = hierarchy(torch.randn(N, 8), GRID, noise=0.1, blocks=4)
    for k, a in cuts.items():
        for j in range(k):
            members = block[a == j].unique()
            assert k < 4 or members.numel() == 1, (k, j, members)
    # Without the restriction some cluster crosses a block boundary (random e, K=4).
    free = hierarchy(torch.randn(N, 8), [4])[4]
    assert any(block[free == j].unique().numel() > 1 for j in range(4))


def test_noise_changes_the_pattern_but_keeps_k_exact() -> None:
    torch.manual_seed(0)
    e = torch.randn(N, 8)
    clean = hierarchy(e, GRID)
    noisy = hierarchy(e, GRID, noise=0.3, generator=torch.Generator().manual_seed(1))
    assert any(not torch.equal(clean[k], noisy[k]) for k in (4, 8, 16))
    assert all(noisy[k].unique().numel() == k for k in GRID)
    assert all(torch.equal(clean[k], hierarchy(e, GRID)[k]) for k in GRID)  # deterministic without noise


@pytest.mark.parametrize("k", [4, 8, 16])
def test_merge_unmerge_round_trip_and_sizes(k: int) -> None:
    torch.manual_seed(0)
    m = _merger().eval()
    z = torch.randn(3, N, C)
    out = m(z, k)
    assert out.tokens.shape == (3, k, C) and out.z_hat.shape == (3, N, C)
    assert out.sizes.sum() == N
    torch.testing.assert_close(m.unmerge(out.tokens), out.z_hat)
    torch.testing.assert_close(m(out.z_hat, k).tokens, out.tokens)  # merge(unmerge(t)) == t
    # Mass is conserved: size-weighted token sum equals the slot sum.
    torch.testing.assert_close((out.sizes[None, :, None] * out.tokens).sum(1), z.sum(1))
    pattern = m.pattern()
    assert pattern.ks == [4, 8, 16, 32] and pattern.nested() and pattern.kind == "lgm"
    torch.testing.assert_close(pattern.merge(z, k), out.tokens)
    torch.testing.assert_close(pattern.unmerge(out.tokens), out.z_hat)


def test_k_equal_n_is_identity_in_every_mode() -> None:
    z = torch.randn(2, N, C)
    for mode in ("lgm", "nested", "tome", "fixed", "none"):
        out = _merger(mode)(z, N)
        assert out.tokens is z and out.z_hat is z and torch.equal(out.sizes, torch.ones(N))


def test_straight_through_forward_is_hard_and_gradient_reaches_e() -> None:
    torch.manual_seed(0)
    e = torch.randn(N, 8, requires_grad=True)
    assign = hierarchy(e, [8])[8]
    gamma = straight_through(e, assign, 8)
    torch.testing.assert_close(gamma, torch.nn.functional.one_hot(assign, 8).float())
    m = _merger().train()
    z, target = torch.randn(2, N, C), torch.randn(2, N, C)
    out = m(z, 8, generator=torch.Generator().manual_seed(0))
    (out.z_hat - target).pow(2).mean().backward()
    assert m.e.grad is not None and torch.isfinite(m.e.grad).all() and m.e.grad.abs().sum() > 0


def test_eval_pattern_follows_updates_of_e() -> None:
    torch.manual_seed(0)
    m = _merger().eval()
    before = m.pattern().assignment(8).clone()
    with torch.no_grad():
        m.e.copy_(torch.randn_like(m.e))  # in place, like an optimizer step
    after = m.pattern().assignment(8)
    assert torch.equal(after, hierarchy(m.e, [8])[8]) and not torch.equal(before, after)


def test_attention_on_unmerged_slots_equals_proportional_attention_on_merged_tokens() -> None:
    torch.manual_seed(0)
    d, p, k = 32, 5, 8
    attn = Attention(d, 4)
    m = Merger(mode="lgm", n_slots=N, grid=(k,), embed_dim=8).eval()
    x, z = torch.randn(2, p, d), torch.randn(2, N, d)
    out = m(z, k)
    full = attn(torch.cat([x, out.z_hat], 1))  # (B, P+N, D)
    bias = size_bias(torch.cat([torch.ones(p), out.sizes]))
    merged = attn(torch.cat([x, out.tokens], 1), bias)  # (B, P+K, D)
    torch.testing.assert_close(full[:, :p], merged[:, :p], atol=1e-5, rtol=1e-5)
    # Slot queries see the same thing as their merged token's query.
    assign = m.pattern().assignment(k)
    torch.testing.assert_close(full[:, p:], merged[:, p:][:, assign], atol=1e-5, rtol=1e-5)


def test_alignment_loss_zero_within_margin_positive_otherwise() -> None:
    torch.manual_seed(0)
    e = torch.randn(N, C)
    near = (e + 0.01 * torch.randn(4, N, C)).requires_grad_()
    assert alignment_loss(e, near) == 0
    flipped = e * torch.where(torch.arange(N) % 2 == 0, 1.0, -1.0)[:, None]
    e_param = e.clone().requires_grad_()
    loss = alignment_loss(e_param, flipped[None].expand(3, -1, -1))
    loss.backward()
    assert loss > 0 and e_param.grad.abs().sum() > 0
    assert _merger("nested").alignment_loss(near) == 0 and _merger().alignment_loss(near) > 0


@pytest.mark.parametrize("mode", ["lgm", "nested", "tome", "fixed"])
def test_every_mode_gives_k_tokens(mode: str) -> None:
    torch.manual_seed(0)
    m = _merger(mode).train()
    z = torch.randn(3, N, C, requires_grad=True)
    k = 8
    out = m(z, k)
    assert out.tokens.shape == (3, k, C) and out.z_hat.shape == (3, N, C)
    sizes = out.sizes if out.sizes.ndim == 2 else out.sizes.expand(3, k)
    # Nested dropout keeps K single slots (the rest are masked, not merged): sizes sum to K.
    assert torch.equal(sizes.sum(1), torch.full((3,), float(k if mode == "nested" else N)))
    out.z_hat.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_nested_dropout_keeps_the_head_and_masks_the_tail() -> None:
    m = _merger("nested")
    with torch.no_grad():
        m.mask.fill_(7.0)
    z = torch.randn(2, N, C)
    out = m(z, 4)
    assert torch.equal(out.tokens, z[:, :4]) and torch.equal(out.z_hat[:, :4], z[:, :4])
    assert (out.z_hat[:, 4:] == 7.0).all() and torch.equal(m.unmerge(out.tokens), out.z_hat)
    # The same scheme as a global pattern: the first K slots, sizes 1, the mask as the fill.
    pattern = m.pattern()
    assert pattern.kind == "nested" and pattern.nested() and torch.equal(pattern.sizes(4), torch.ones(4))
    assert torch.equal(pattern.merge(z, 4), out.tokens)
    assert torch.equal(pattern.unmerge(out.tokens, m.fill()), out.z_hat)
    assert _merger("tome").pattern() is None


def test_tome_merges_duplicate_pairs_and_is_per_image() -> None:
    torch.manual_seed(0)
    base = torch.randn(2, N // 2, C)
    z = base.repeat_interleave(2, dim=1)  # slots 2j and 2j+1 are identical
    gamma = bipartite_assignment(z, N // 2)  # (B, N, K)
    for b in range(2):
        for j in range(N // 2):
            assert torch.equal(gamma[b, 2 * j], gamma[b, 2 * j + 1])
    m = _merger("tome")
    out = m(torch.randn(2, N, C), 4)
    assert out.sizes.shape == (2, 4)
    torch.testing.assert_close((out.sizes[..., None] * out.tokens).sum(1), out.z_hat.sum(1))
    with pytest.raises(ValueError, match="per image"):
        m.unmerge(out.tokens)


def test_k_policy() -> None:
    gen = torch.Generator().manual_seed(0)
    m = Merger(mode="lgm", n_slots=N, grid=(4, 8, 16), grid_weights=(0, 1, 0))
    assert {m.sample_k(gen) for _ in range(50)} == {8}
    assert _merger("fixed").sample_k(gen) == 8 and _merger("none").sample_k(gen) == N
    both = Merger(mode="lgm", n_slots=N, grid=(4, 8))
    assert {both.sample_k(gen) for _ in range(50)} == {4, 8}


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match=r"'bogus'.*lgm"):
        Merger(mode="bogus", n_slots=N, grid=(4,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fixed_k"):
        Merger(mode="fixed", n_slots=N)
    with pytest.raises(ValueError, match="grid"):
        Merger(mode="lgm", n_slots=N, grid=(64,))
    with pytest.raises(ValueError, match="K=8"):
        _merger("none")(torch.randn(1, N, C), 8)


def test_cut_levels_match_scipy_cut_tree() -> None:
    """Our replay of the merges gives scipy's cut_tree partitions (K < N, where cut_tree is right)."""
    import numpy as np
    from scipy.cluster.hierarchy import cut_tree, linkage

    from vlt.models.merging import cut_levels

    rng = np.random.default_rng(0)
    tree = linkage(rng.normal(size=(N, 3)), method="average")
    ks = list(range(1, N))
    ours, ref = cut_levels(tree, N, ks), cut_tree(tree, n_clusters=ks)
    for col, k in enumerate(ks):
        same = (ref[:, col][:, None] == ref[:, col][None, :]) == (ours[k][:, None] == ours[k][None, :])
        assert same.all(), k
    assert np.array_equal(cut_levels(tree, N, [N])[N], np.arange(N))


def _hinge_oracle(e: torch.Tensor, z: torch.Tensor, margin: float, blocks: int) -> torch.Tensor:
    """The in-block hinge written out pair by pair (the reference's block-masked mean)."""
    n, size = e.shape[0], e.shape[0] // blocks
    cos_e = torch.nn.functional.cosine_similarity(e[:, None], e[None, :], dim=-1)
    zn = torch.nn.functional.normalize(z, dim=-1)
    cos_z = (zn @ zn.transpose(1, 2)).mean(0)
    total = e.new_zeros(())
    for i in range(n):
        for j in range(n):
            if i // size == j // size:
                total = total + torch.relu((cos_e[i, j] - cos_z[i, j]).abs() - margin)
    return total / (blocks * size * size)


@pytest.mark.parametrize("blocks", [1, 4])
def test_alignment_loss_is_the_in_block_mean_of_the_reference(blocks: int) -> None:
    torch.manual_seed(0)
    e, z = torch.randn(N, C), torch.randn(3, N, C)
    torch.testing.assert_close(alignment_loss(e, z, 0.1, blocks), _hinge_oracle(e, z, 0.1, blocks))


def test_alignment_gradient_is_zero_across_blocks() -> None:
    """Changing only cross-block latent cosines (negate one block's slots) changes neither the loss nor
    its gradient, and a cross-block-only change of e gets no gradient from it."""
    torch.manual_seed(0)
    e, z = torch.randn(N, C, requires_grad=True), torch.randn(3, N, C)
    sign = torch.where(torch.arange(N) < N // 4, -1.0, 1.0)[None, :, None]  # flips block 0 only
    grads = []
    for latents in (z, z * sign):
        e.grad = None
        loss = alignment_loss(e, latents, 0.1, blocks=4)
        loss.backward()
        grads.append((loss.detach(), e.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    # With all-pairs normalisation (blocks=1) the same change does move the gradient.
    e.grad = None
    alignment_loss(e, z, 0.1).backward()
    g1 = e.grad.clone()
    e.grad = None
    alignment_loss(e, z * sign, 0.1).backward()
    assert not torch.allclose(g1, e.grad)


def test_noisy_cuts_match_average_linkage_on_unclipped_distances() -> None:
    """Near-duplicate embeddings: noisy similarities exceed 1 and distances go negative. The cut must be
    the reference's (sklearn's precomputed average linkage on 1 - sim, unclipped)."""
    cluster = pytest.importorskip("sklearn.cluster")
    from vlt.models.merging import similarity

    torch.manual_seed(0)
    base = torch.randn(4, C)
    e = base.repeat_interleave(N // 4, 0) + 1e-4 * torch.randn(N, C)  # 4 groups of near-duplicates
    differs = 0
    for seed in range(6):
        sim = similarity(e, noise=0.1, generator=torch.Generator().manual_seed(seed))
        assert (1.0 - sim)[~torch.eye(N, dtype=torch.bool).numpy()].min() < 0  # negative distances occur
        for k in (6, 12, 20):
            ours = hierarchy(e, [k], noise=0.1, generator=torch.Generator().manual_seed(seed))[k]
            ref = cluster.AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average")
            labels = torch.from_numpy(ref.fit(1.0 - sim).labels_)
            assert torch.equal(_first_member_ids(labels), ours.cpu())
            clipped = cluster.AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average")
            clip_labels = torch.from_numpy(clipped.fit((1.0 - sim).clip(0, None)).labels_)
            differs += not torch.equal(_first_member_ids(clip_labels), ours)
    assert differs > 0  # clipping would have changed some of these partitions


def _first_member_ids(labels: torch.Tensor) -> torch.Tensor:
    """Renumber cluster labels by their smallest member slot (the hierarchy's convention)."""
    order = {}
    for lab in labels.tolist():
        order.setdefault(lab, len(order))
    return torch.tensor([order[lab] for lab in labels.tolist()])


def test_prototypes_come_from_normalised_embeddings() -> None:
    """Gamma_st's gradient is that of softmax(norm(e) . norm(sum of norm(e) in the cluster) / tau):
    with slot norms that vary, raw-e prototypes would give another gradient."""
    torch.manual_seed(0)
    raw = torch.randn(N, C) * torch.logspace(-1, 1, N)[:, None]  # norms over two decades
    assign = hierarchy(raw, [8])[8]
    weight = torch.randn(N, 8)
    e = raw.clone().requires_grad_()
    (straight_through(e, assign, 8, tau=0.1) * weight).sum().backward()
    e2 = raw.clone().requires_grad_()
    en = torch.nn.functional.normalize(e2, dim=-1)
    gamma = torch.nn.functional.one_hot(assign, 8).float()
    proto = torch.nn.functional.normalize(gamma.T @ en.detach(), dim=-1)
    (torch.softmax(en @ proto.T / 0.1, dim=-1) * weight).sum().backward()
    torch.testing.assert_close(e.grad, e2.grad)


def test_tokenizer_step_skips_alignment_at_k_equal_n() -> None:
    """On K = N steps nothing merges: the merge embeddings get no gradient at all (no alignment term)."""
    from vlt.lit import LitTokenizer
    from vlt.models.tokenizer import TokenizerConfig
    from vlt.specs import MergeSpec

    torch.manual_seed(0)
    cfg = TokenizerConfig(width=32, heads=2, enc_depth=1, dec_depth=1)
    model = LitTokenizer(tokenizer=cfg, merge=MergeSpec(mode="lgm", blocks=4))
    images = torch.rand(4, 3, cfg.image_size, cfg.image_size) * 2 - 1
    for k, expect_grad in ((cfg.n_slots, False), (cfg.n_slots // 4, True)):
        model.zero_grad(set_to_none=True)
        model.losses(images, k)["loss"].backward()
        grad = model.merger.e.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect_grad
