"""TokenBudgetCallback on a small real LightningModule: scalars, figures, CSV/JSON; DDP = 1 process."""

from __future__ import annotations

import csv
import json
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vlt.adaptive.allocation import allocate, draw, tilt_to_budget
from vlt.callbacks import TokenBudgetCallback
from vlt.metrics import FrechetDistance, build_fid, psnr
from vlt.metrics.budget import evaluator


class Shapes(Dataset):
    """Smooth coloured patterns: a tiny in-memory image set with labels."""

    def __init__(self, n: int = 32, size: int = 32):
        g = torch.Generator().manual_seed(0)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        freq = torch.rand(n, 3, 1, 1, generator=g) * 6 + 1
        phase = torch.rand(n, 3, 1, 1, generator=g) * 6
        self.images = torch.sin(freq * xx + phase) * torch.cos(freq * yy - phase)  # (n, 3, H, W)
        self.labels = torch.arange(n) % 4

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


class TinyAutoencoder(pl.LightningModule):
    """A conv autoencoder whose budget reconstruction degrades as 1/k: better with more tokens."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.encoder = nn.Conv2d(3, width, 3, padding=1)
        self.decoder = nn.Conv2d(width, 3, 3, padding=1)
        self.embed = nn.Embedding(4, width)

    def forward(self, x):
        return torch.tanh(self.decoder(F.gelu(self.encoder(x))))

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch["image"]), batch["image"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.mse_loss(self(batch["image"]), batch["image"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    # BudgetModule protocol
    def budget_reconstruct(self, images, k):
        assert not self.training and not torch.is_grad_enabled()
        # A fixed, image-dependent error (no RNG) shrinking as 1/k: the same on any split over ranks.
        return images + (self(images) - images + torch.sin(40 * images)) / k

    def budget_generate(self, labels, k, cfg_scale, generator):
        z = torch.randn(
            len(labels), self.encoder.out_channels, 32, 32, generator=generator, device=self.device
        )
        z = z / k + cfg_scale * self.embed(labels)[:, :, None, None]
        return torch.tanh(self.decoder(z))

    def budget_flops(self, k, task, cfg_scale):
        return 1e6 * k * (2 if task == "generate" and cfg_scale != 1.0 else 1)

    def budget_tokens(self, k):
        return float(k)

    def budget_generate_adaptive(self, labels, budget, cfg_scale, generator):
        """Per-image K from a uniform prior over {4, 16} tilted to the budget, then grouped by K."""
        p, _ = tilt_to_budget(torch.full((1, 2), 0.5), [4, 16], budget)
        ks = draw(p.expand(len(labels), 2), [4, 16], torch.Generator().manual_seed(0))
        images = torch.empty(len(labels), 3, 32, 32)
        for k in ks.unique().tolist():
            sel = ks == k
            images[sel] = self.budget_generate(labels[sel], k, cfg_scale, generator)
        return images, ks


def fit(root, logger, **kwargs) -> tuple[pl.Trainer, TokenBudgetCallback]:
    torch.manual_seed(0)
    options = {"ks": [4, 16], "every_n_steps": 1, "every_n_epochs": None, "num_images": 16, "batch_size": 8}
    options |= {"cache_dir": str(root / "fid_cache"), "dataset_id": "shapes-val"}
    callback = TokenBudgetCallback(**(options | kwargs))
    data = Shapes()
    trainer = pl.Trainer(
        default_root_dir=root, max_steps=2, logger=logger, callbacks=[callback], accelerator="cpu", devices=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=2, val_check_interval=2,
    )  # fmt: skip
    trainer.fit(TinyAutoencoder(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    return trainer, callback


def read_rows(folder):
    with (folder / "curves" / "budget.csv").open() as f:
        return list(csv.DictReader(f))


def test_callback_logs_scalars_figures_and_curve_files(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version="")
    options = {"metrics": ["psnr", "rfid", "gfid"], "cfg_scales": [1.0, 2.0], "every_n_steps": None}
    trainer, _ = fit(tmp_path, logger, **options)  # evaluates once, at the end of fit
    run_dir = tmp_path / "run"
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    for k in (4, 16):
        for name in ("psnr", "rfid_proxy", "tokens", "tflops"):
            assert f"budget/{name}@k{k}" in scalars
        for w in ("1", "2"):
            assert f"budget/gfid_proxy@k{k}_w{w}" in scalars and f"budget/gen_tflops@k{k}_w{w}" in scalars
    assert {"budget/curve_vs_tokens", "budget/curve_vs_flops"} <= images
    assert len(events.Images("budget/curve_vs_tokens")) == 1
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    # Proxy features never masquerade as FID.
    logged = scalars | set(trainer.callback_metrics) | images
    assert not [n for n in logged if ("fid@" in n or "/fid" in n) and "_proxy" not in n]
    # More tokens, better reconstruction; FLOPs are the module's.
    psnr = {k: events.Scalars(f"budget/psnr@k{k}")[-1].value for k in (4, 16)}
    rfid = {k: events.Scalars(f"budget/rfid_proxy@k{k}")[-1].value for k in (4, 16)}
    assert psnr[16] > psnr[4] and rfid[16] < rfid[4]
    assert events.Scalars("budget/gen_tflops@k4_w2")[-1].value == pytest.approx(8e-6)
    assert events.Scalars("budget/tokens@k16")[-1].step == 2
    rows = read_rows(run_dir)
    assert [(int(r["step"]), int(r["k"])) for r in rows] == [(2, 4), (2, 16)]
    assert {"tokens", "flops", "psnr", "rfid_proxy", "gfid_proxy_w2", "flops_gfid_proxy_w2"} <= set(rows[0])
    latest = json.loads((run_dir / "curves" / "budget_latest.json").read_text())
    assert latest["step"] == 2 and [r["k"] for r in latest["rows"]] == [4, 16]


def counting_fid() -> tuple[FrechetDistance, list[int]]:
    """A proxy FID that records how many real images it extracts features from."""
    fid, real_images = build_fid("proxy"), []
    update = fid.update

    def counted(imgs, real):
        if real:
            real_images.append(len(imgs))
        return update(imgs, real=real)

    fid.update = counted
    return fid, real_images


def test_real_stats_cached_across_evaluations_and_runs(tmp_path, monkeypatch):
    fids = [counting_fid(), counting_fid()]
    monkeypatch.setattr(evaluator, "build_fid", lambda *args: fids.pop(0)[0])
    counts = [fids[0][1], fids[1][1]]
    fit(tmp_path, TensorBoardLogger(tmp_path, name="a", version=""), metrics=["rfid"])
    cache_files = list((tmp_path / "fid_cache").glob("*.npz"))
    assert len(cache_files) == 1 and "shapes-val" in cache_files[0].name
    fit(tmp_path, TensorBoardLogger(tmp_path, name="b", version=""), metrics=["rfid"], every_n_steps=None)
    assert sum(counts[0]) == 16  # two evaluations, real features computed once
    assert sum(counts[1]) == 0  # a second run reads them from disk
    rows_a, rows_b = read_rows(tmp_path / "a"), read_rows(tmp_path / "b")
    assert len(rows_a) == 4 and len(rows_b) == 2  # run b evaluates once, at the end (step 2)
    assert [float(r["rfid_proxy"]) for r in rows_a[2:]] == pytest.approx(
        [float(r["rfid_proxy"]) for r in rows_b]
    )


def test_callback_without_tensorboard_still_writes_files(tmp_path):
    fit(tmp_path, CSVLogger(tmp_path, name="csv", version=""), metrics=["psnr"])
    rows = read_rows(tmp_path / "csv")
    # One row per K per evaluation (steps 1 and 2; fit end is step 2 again, not repeated).
    assert [(int(r["step"]), int(r["k"])) for r in rows] == [(1, 4), (1, 16), (2, 4), (2, 16)]
    assert "rfid_proxy" not in rows[0] and float(rows[0]["psnr"]) > 0


def test_callback_validates_its_options():
    with pytest.raises(ValueError, match=r"unknown metric 'lpips'; expected a subset of \('psnr'"):
        TokenBudgetCallback(ks=[4], metrics=["lpips"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="unknown extractor 'clip'"):
        TokenBudgetCallback(ks=[4], extractor="clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        TokenBudgetCallback(ks=[])


def validate(root, name: str, devices: int, **kwargs) -> list[dict]:
    """`trainer.validate` with the callback (no training: both runs score the same weights)."""
    torch.manual_seed(0)
    model = TinyAutoencoder()
    callback = TokenBudgetCallback(
        ks=[4, 16],
        metrics=["psnr", "rfid"],
        **kwargs,
        num_images=16,
        batch_size=4,
        cache_dir=str(root / name / "cache"),
    )
    trainer = pl.Trainer(
        default_root_dir=root, logger=CSVLogger(root, name=name, version=""), callbacks=[callback],
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.validate(model, DataLoader(Shapes(), batch_size=4))
    return read_rows(root / name)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_two_process_evaluation_matches_one_process(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)
    single = validate(tmp_path, "one", devices=1, budgets=[8])
    double = validate(tmp_path, "two", devices=2, budgets=[8])  # a distributed sampler: 8 of 16 per rank
    expected = [("4", "fixed"), ("16", "fixed"), ("8", "adaptive"), ("8", "adaptive-k2")]
    assert [(r["k"], r["mode"]) for r in double] == [(r["k"], r["mode"]) for r in single] == expected
    for a, b in zip(single, double):  # adaptive rows: one lambda from the curves of both ranks
        assert float(b["rfid_proxy"]) == pytest.approx(float(a["rfid_proxy"]), rel=1e-4)
        assert float(b["psnr"]) == pytest.approx(float(a["psnr"]), rel=1e-5)
        assert float(b["tokens"]) == pytest.approx(float(a["tokens"]))
    (one,), (two,) = (list((tmp_path / n / "cache").glob("*.npz")) for n in ("one", "two"))
    assert one.name == two.name  # same key: 16 images in total, not 8 per rank
    with np.load(one) as a, np.load(two) as b:  # real statistics reduced over ranks = one process
        assert int(a["n"]) == int(b["n"]) == 16
        assert np.allclose(a["mu"], b["mu"], atol=1e-6) and np.allclose(a["sigma"], b["sigma"], atol=1e-6)


@pytest.mark.parametrize("objective", ["mse", "neg_psnr"])
def test_adaptive_rows_follow_the_oracle_allocation(tmp_path, objective):
    rows = validate(tmp_path, "adaptive", devices=1, budgets=[8, 10], budget_distortion=objective)
    images = Shapes().images[:16]  # the callback's num_images first val images
    torch.manual_seed(0)
    model = TinyAutoencoder().eval()  # the same weights validate() scored
    with torch.no_grad():
        curves = torch.stack(
            [psnr(model.budget_reconstruct(images, k).clamp(-1, 1), images) for k in (4, 16)], 1
        ).double()  # (16, 2) per-image PSNR at K = 4, 16
    mse = torch.pow(10.0, -curves / 10)
    fixed = {int(r["k"]): r for r in rows if r["mode"] == "fixed"}
    for k, column in ((4, 0), (16, 1)):
        assert float(fixed[k]["psnr_mse"]) == pytest.approx(
            float(-10 * mse[:, column].mean().log10()), rel=1e-5
        )
    adaptive = {(float(r["k"]), r["mode"]): r for r in rows if r["mode"] != "fixed"}
    assert set(adaptive) == {(b, m) for b in (8.0, 10.0) for m in ("adaptive", "adaptive-k2")}
    for (budget, mode), row in adaptive.items():
        d = mse if objective == "mse" else -curves
        ks, _ = allocate(d, [4, 16], budget, "k" if mode == "adaptive" else "k2")
        assert float(row["tokens"]) == pytest.approx(float(ks.double().mean()))
        chosen = (ks == 16).long()[:, None]
        assert float(row["psnr"]) == pytest.approx(float(curves.gather(1, chosen).mean()), rel=1e-5)
        assert float(row["psnr_mse"]) == pytest.approx(
            float(-10 * mse.gather(1, chosen).mean().log10()), rel=1e-5
        )
        cost = float(row["tokens"]) if mode == "adaptive" else float(row["k_rms"])
        assert cost <= budget + 1e-9  # within the budget, never above
        assert np.isfinite(float(row["rfid_proxy"]))
    # Equal mean K^2 is the stricter budget: it never buys more tokens than equal mean K.
    for budget in (8.0, 10.0):
        assert float(adaptive[(budget, "adaptive-k2")]["tokens"]) <= float(
            adaptive[(budget, "adaptive")]["tokens"]
        )


def test_adaptive_generation_rows_and_a_before_curve(tmp_path):
    options = {"metrics": ["gfid"], "budgets": [10], "every_n_steps": None, "at_fit_start": True}
    fit(tmp_path, CSVLogger(tmp_path, name="gen", version=""), **options)
    rows = read_rows(tmp_path / "gen")
    one_evaluation = ["fixed", "fixed", "adaptive"]
    assert [(int(r["step"]), r["mode"]) for r in rows] == [(s, m) for s in (0, 2) for m in one_evaluation]
    row = rows[-1]
    assert float(row["tokens"]) == pytest.approx(10, abs=0.8)  # stratified draws meet the budget
    assert 4e6 < float(row["flops"]) < 16e6 and np.isfinite(float(row["gfid_proxy"]))


def test_budgets_outside_the_evaluated_ks_are_refused():
    with pytest.raises(ValueError, match="outside the evaluated K range"):
        TokenBudgetCallback(ks=[4, 16], budgets=[32])
    with pytest.raises(ValueError, match=r"distortion='ssim' is not supported"):
        TokenBudgetCallback(ks=[4, 16], budgets=[8], budget_distortion="ssim")


def test_missing_weight_files_fail_at_setup_naming_the_file_and_the_key(tmp_path):
    """Inception weights (rfid/gfid) and the vltnet feature net are checked when the fit starts, not
    after the first evaluation."""
    from unittest.mock import Mock

    missing = str(tmp_path / "pt_inception.pth")
    cb = TokenBudgetCallback(ks=[4, 16], metrics=["rfid"], extractor="inception", weights=missing)
    with pytest.raises(ValueError, match=r"init_args\.weights=.*pt_inception\.pth.*not found"):
        cb.setup(Mock(), Mock(), "fit")  # a Mock module has every BudgetModule method
    cb = TokenBudgetCallback(ks=[4, 16], metrics=["psnr"], feature_net=str(tmp_path / "nets"))
    with pytest.raises(ValueError, match=r"init_args\.feature_net=.*nets.*no vltnet feature net"):
        cb.setup(Mock(), Mock(), "fit")
    TokenBudgetCallback(ks=[4, 16], metrics=["rfid"], extractor="proxy").setup(Mock(), Mock(), "fit")


def test_vltnet_scores_with_intervals_and_cached_real_features(tmp_path, tiny_vltnet):
    options = {"metrics": ["rfid", "gfid"], "every_n_steps": None, "feature_net": str(tiny_vltnet)}
    options |= {"feature_scores": ["fd", "kid", "precision", "recall", "class_acc"], "replicates": 20}
    fit(tmp_path, TensorBoardLogger(tmp_path, name="v", version=""), **options)
    rows = json.loads((tmp_path / "v" / "curves" / "budget_latest.json").read_text())["rows"]
    for prefix in ("r", "g"):
        for name in ("fd", "kid", "precision", "recall", "class_acc"):
            column = f"{prefix}{name}_vltnet"
            # The untrained tiny net's classifier may miss every label: a zero-width class_acc interval.
            assert np.isfinite(rows[0][column]) and rows[0][f"{column}_ci"] > (-1 if "class" in name else 0)
    assert rows[0]["gfid_proxy_ci"] > 0 and "gkid_subset_std_vltnet" in rows[0]
    assert not [c for c in rows[0] if "fid" in c and "vltnet" in c]  # never "FID" on vltnet features
    cached = list((tmp_path / "fid_cache").glob("*vltnet-*.features.npz"))
    assert len(cached) == 1 and np.load(cached[0])["features"].shape == (16, 4)
    events = EventAccumulator(str(tmp_path / "v"), size_guidance={"scalars": 0})
    events.Reload()
    assert {"budget/gfd_vltnet@k4", "budget/gfd_vltnet_ci@k4", "budget/rkid_vltnet_ci@k16"} <= set(
        events.Tags()["scalars"]
    )


def test_noise_seeds_give_a_t_interval(tmp_path, tiny_vltnet):
    options = {"metrics": ["gfid"], "every_n_steps": None, "feature_net": str(tiny_vltnet), "replicates": 0}
    fit(tmp_path, TensorBoardLogger(tmp_path, name="one", version=""), seeds=1, **options)
    fit(tmp_path, TensorBoardLogger(tmp_path, name="three", version=""), seeds=3, **options)
    single = json.loads((tmp_path / "one" / "curves" / "budget_latest.json").read_text())["rows"][0]
    seeded = json.loads((tmp_path / "three" / "curves" / "budget_latest.json").read_text())["rows"][0]
    assert "gfd_vltnet_ci" not in single  # no bootstrap, one seed: no interval to give
    assert seeded["gfd_vltnet_ci"] > 0 and seeded["gfd_vltnet"] != single["gfd_vltnet"]


def test_real_shards_are_the_real_side(tmp_path, tiny_shards, tiny_vltnet):
    options = {"metrics": ["rfid"], "every_n_steps": None, "feature_net": str(tiny_vltnet), "replicates": 5}
    fit(
        tmp_path, TensorBoardLogger(tmp_path, name="s", version=""), real_shards=tiny_shards["val"], **options
    )
    cached = list((tmp_path / "fid_cache").glob("*.features.npz"))
    labels = np.load(cached[0])["labels"]
    assert len(labels) == 16 and labels.max() > 3  # hue classes of the synthetic shards, not Shapes' 0..3
