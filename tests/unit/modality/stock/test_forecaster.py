"""PatchTST-style forecaster: config checks, shapes, masking, loss, and learning real structure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from modality.stock.data.windows import StockWindows
from modality.stock.forecaster import Forecaster, ForecasterConfig, pinball_loss
from modality.stock.metrics import evaluate

TINY = dict(context=64, horizon=8, patch_len=8, stride=4, d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.0)


@pytest.mark.parametrize(
    "bad,needle",
    [
        (dict(context=60, patch_len=16, stride=8), "divisible by stride"),
        (dict(quantiles=(0.9, 0.5, 0.1)), "strictly increasing"),
        (dict(quantiles=(0.0, 0.5)), "lie in (0, 1)"),
        (dict(d_model=30, n_heads=4), "divisible by n_heads"),
        (dict(stride=20, patch_len=16), "stride <= patch_len"),
        (dict(channel_mode="both"), "channel_mode"),
        (dict(horizon=0), "horizon"),
    ],
)
def test_config_validation(bad, needle):
    with pytest.raises(ValueError, match="ForecasterConfig") as e:
        ForecasterConfig(**bad)
    assert needle in str(e.value)


def test_default_patching():
    cfg = ForecasterConfig()
    assert cfg.n_patches == (256 - 16) // 8 + 2 == 32


@pytest.mark.parametrize("mode", ["mixed", "independent"])
def test_shapes_monotone_quantiles_and_scale_equivariance(mode):
    torch.manual_seed(0)
    cfg = ForecasterConfig(**TINY, channel_mode=mode)
    m = Forecaster(cfg).eval()
    x = torch.randn(3, 64, 4) * 0.02
    out = m(x)
    assert out.embeddings.shape == (3, cfg.n_patches, 32)
    assert out.quantiles.shape == (3, 8, 3) and out.vol.shape == (3,)
    assert (out.quantiles.diff(dim=-1) >= 0).all()
    # returns x10 -> forecasts x10 (RevIN); the other channels are scaled too, features are unitless
    out10 = m(x * 10)
    torch.testing.assert_close(out10.quantiles, out.quantiles * 10, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(out10.vol, out.vol * 10, rtol=1e-3, atol=1e-6)


def test_padding_is_ignored():
    torch.manual_seed(0)
    m = Forecaster(ForecasterConfig(**TINY)).eval()
    x = torch.randn(2, 64, 4)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[:, :20] = False  # left padding
    a = m(x, mask)
    y = x.clone()
    y[:, :20] = 1e3  # garbage in the padded rows
    b = m(y, mask)
    torch.testing.assert_close(a.quantiles, b.quantiles)
    torch.testing.assert_close(a.embeddings, b.embeddings)
    with pytest.raises(ValueError, match=r"expects \[B, 64, 4\]"):
        m(torch.randn(2, 32, 4))


def test_pinball_hand_value():
    pred = torch.tensor([[[0.0, 1.0]]])  # quantiles 0.1 and 0.9 predict 0 and 1
    target = torch.tensor([[2.0]])
    # diff = 2 and 1 -> 0.1*2 and 0.9*1 -> mean 0.55
    assert pinball_loss(pred, target, torch.tensor([0.1, 0.9])).item() == pytest.approx(0.55)
    target = torch.tensor([[-1.0]])  # diff -1, -2 -> 0.9*1, 0.1*2 -> 0.55
    assert pinball_loss(pred, target, torch.tensor([0.1, 0.9])).item() == pytest.approx(0.55)


def synthetic_series(n: int = 1500, seed: int = 0) -> pd.DataFrame:
    """Log price = trend + 20-day cycle + noise: forecastable, unlike real prices."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    logp = 3 + 0.0005 * t + 0.05 * np.sin(2 * np.pi * t / 20) + 0.005 * rng.standard_normal(n)
    c = np.exp(logp)
    o = np.exp(logp + 0.002 * rng.standard_normal(n))
    return pd.DataFrame(
        {"Open": o, "High": np.maximum(c, o) * 1.01, "Low": np.minimum(c, o) * 0.99, "Close": c,
         "Volume": rng.integers(100_000, 200_000, n).astype(float)},
        index=pd.bdate_range("2000-01-03", periods=n),
    )


@pytest.fixture()
def one_thread():
    """Tiny models run faster on one thread, and much faster on a CPU shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_learns_structure_and_beats_persistence_on_mase(one_thread):
    torch.manual_seed(0)
    df = synthetic_series()
    train = StockWindows({"SYN": df}, 64, 8, "train")
    test = StockWindows({"SYN": df}, 64, 8, "test")
    items = [train[i] for i in range(len(train))]
    x = torch.stack([it["x"] for it in items])
    y = torch.stack([it["target"] for it in items])
    v = torch.stack([it["vol_target"] for it in items])
    m = Forecaster(ForecasterConfig(**TINY))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss, _ = m.loss(m(x[idx]), y[idx], v[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = evaluate(m, torch.utils.data.DataLoader(test, batch_size=256))
    assert report["model"]["mase"] < 1.0 < report["persistence"]["mase"]
    assert report["model"]["rel_mae"] < 0.5
    assert report["model"]["direction_acc"] > 0.8
