"""Proportional attention: the bias only where sizes differ, the FlexAttention path, compiled blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlt.lit.dit import LitDiT
from vlt.models.dit import DiT, DiTBlock, DiTConfig
from vlt.models.pattern import MergePattern
from vlt.nn.attention import Attention, flex_available, size_bias
from vlt.nn.compile import compile_blocks

needs_flex = pytest.mark.skipif(not flex_available(), reason="torch has no flex_attention")


def _mask_path(attn: Attention, x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """The reference: SDPA with the float key mask log m_j always present (what the code did before)."""
    q, k, v = attn.qkv(x).reshape(x.shape[0], x.shape[1], 3, attn.heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    log_m = sizes.float().log()
    mask = log_m.reshape(1, 1, 1, -1) if log_m.ndim == 1 else log_m[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, E)
    return attn.proj(out.transpose(1, 2).reshape(x.shape))


def test_equal_sizes_need_no_mask_unequal_ones_do():
    assert size_bias(torch.ones(8)) is None  # K = N, nested dropout, fixed K: all m_j = 1
    assert size_bias(torch.full((3, 8), 4.0)) is None
    assert size_bias(torch.tensor([[2.0, 2.0], [1.0, 1.0]])) is None  # equal within each image
    sizes = MergePattern.contiguous(12, [5]).sizes(5)  # 12 slots in 5 tokens: sizes 3 and 2
    bias = size_bias(sizes)
    assert bias is not None and bias.shape == (1, 1, 1, 5)
    assert sorted(sizes.tolist()) == [2, 2, 2, 3, 3] and torch.allclose(bias.flatten(), sizes.log())


@pytest.mark.parametrize("kernel", ["sdpa", pytest.param("flex", marks=needs_flex)])
@pytest.mark.parametrize(
    "sizes",
    [
        torch.tensor([3.0, 3, 2, 2, 2]),
        torch.tensor([[1.0, 4, 2, 1, 4], [2.0, 2, 2, 5, 1]]),
        torch.full((5,), 2.0),
    ],
    ids=["shared", "per-image", "equal"],
)
def test_every_kernel_gives_the_mask_path(kernel, sizes):
    torch.manual_seed(0)
    attn = Attention(32, 4, qk_norm=True, kernel=kernel).eval()
    x = torch.randn(2, 5, 32)  # (B, K, D)
    with torch.no_grad():
        torch.testing.assert_close(
            attn(x, size_bias(sizes)), _mask_path(attn, x, sizes), atol=1e-5, rtol=1e-5
        )


@needs_flex
def test_a_flex_dit_equals_the_sdpa_dit():
    torch.manual_seed(0)
    cfg = DiTConfig(n_slots=12, channels=4, width=32, depth=2, heads=2, num_classes=3)
    sdpa = DiT(cfg).eval()
    flex = DiT(DiTConfig(**{**vars(cfg), "attention": "flex"})).eval()
    flex.load_state_dict(sdpa.state_dict())
    pattern = MergePattern.contiguous(12, [5, 12])
    t, y = torch.rand(3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        for k in (5, 12):  # unequal sizes (a bias), then K = N (none)
            x = torch.randn(3, k, 4)
            args = (x, t, y, pattern.gbar(k), pattern.sizes(k))
            torch.testing.assert_close(flex(*args), sdpa(*args), atol=1e-5, rtol=1e-5)


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="kernel 'fused' is not supported"):
        Attention(32, 4, kernel="fused")


def test_compiled_blocks_give_the_same_outputs():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is unavailable")
    torch.manual_seed(0)
    cfg = DiTConfig(n_slots=12, channels=4, width=32, depth=2, heads=2, num_classes=3)
    plain, compiled = DiT(cfg).eval(), DiT(cfg).eval()
    compiled.load_state_dict(plain.state_dict())
    assert compile_blocks(compiled, (DiTBlock,), backend="eager") == 2
    assert list(compiled.state_dict()) == list(plain.state_dict())  # names unchanged: checkpoints load
    pattern = MergePattern.contiguous(12, [5])
    args = (torch.randn(3, 5, 4), torch.rand(3), torch.tensor([0, 1, 2]), pattern.gbar(5), pattern.sizes(5))
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), plain(*args), atol=1e-6, rtol=1e-6)


def test_the_compile_option_compiles_every_dit_block_in_place():
    lit = LitDiT(dit=DiTConfig(n_slots=12, channels=4, width=32, depth=3, heads=2), ks=[4, 12], compile=True)
    lit.configure_model()
    blocks = [m for m in lit.generator.dit.modules() if isinstance(m, DiTBlock)]
    assert len(blocks) == 3 and all(b._compiled_call_impl is not None for b in blocks)
    assert lit.hparams.compile is True
