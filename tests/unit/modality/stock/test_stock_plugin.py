"""StockModality: refs -> windows -> features -> LLM embeddings; checkpoints; forecast hooks."""

from __future__ import annotations

import lightning as L
import pandas as pd
import pytest
import torch

from modality.stock.data.windows import N_FEATURES, StockForecastDataModule
from modality.stock.data.signals import N_SIGNALS, compute_signals
from modality.stock.plugin import StockModality, parse_ref

SMALL = dict(context=64, horizon=5, patch_len=8, stride=4, d_model=32, n_heads=2, n_layers=1, d_ff=64, n_tokens=5)


@pytest.fixture()
def stock():
    torch.manual_seed(0)
    return StockModality(d_llm=48, **SMALL)


def test_parse_ref_forms():
    assert parse_ref("AAPL_2013@2019-05-31") == {"csv": "packaged", "ticker": "AAPL_2013", "end": "2019-05-31"}
    assert parse_ref({"ticker": "IBM"}) == {"csv": "packaged", "ticker": "IBM", "end": None}
    with pytest.raises(ValueError, match="unknown key"):
        parse_ref({"ticker": "IBM", "date": "2001-01-01"})
    with pytest.raises(ValueError, match="must be a dict"):
        parse_ref(42)


def test_load_window_ends_at_date(stock):
    w = stock.load({"csv": "packaged", "ticker": "AAPL", "end": "2019-05-31"})
    assert len(w) == 65 and w.index[-1] == pd.Timestamp("2019-05-31")
    w2 = stock.load("AAPL_2013@2019-06-01")  # a Saturday: the last trading day before it
    assert w2.index[-1] == pd.Timestamp("2019-05-31")


def test_load_relative_csv_and_errors(stock, tmp_path):
    dates = pd.bdate_range("2020-01-01", periods=100)
    df = pd.DataFrame({"Date": dates.strftime("%Y-%m-%d"), "Open": 10.0, "High": 11.0, "Low": 9.0, "Close": 10.5, "Volume": 1e5})
    df.to_csv(tmp_path / "XYZ.csv", index=False)
    w = stock.load({"csv": "XYZ.csv", "end": "2020-04-01"}, root=str(tmp_path))
    assert len(w) == 65 and w.index[-1] <= pd.Timestamp("2020-04-01")
    with pytest.raises(ValueError, match=r"XYZ.csv\[XYZ\]: only .* rows up to 2020-01-10; a window needs 65"):
        stock.load({"csv": "XYZ.csv", "end": "2020-01-10"}, root=str(tmp_path))
    with pytest.raises(ValueError, match="missing.csv"):
        stock.load({"csv": "missing.csv"}, root=str(tmp_path))
    df.loc[70, "Close"] = -1.0
    df.to_csv(tmp_path / "BAD.csv", index=False)
    with pytest.raises(ValueError, match=r"BAD.csv: line 72: Close must be positive"):
        stock.load({"csv": "BAD.csv"}, root=str(tmp_path))


def test_featurize_carries_signals(stock):
    w = stock.load("IBM_2000@2004-06-30")
    f = stock.featurize(w)
    assert f.shape == (64, N_FEATURES + N_SIGNALS) and f.dtype == torch.float32
    sig = torch.from_numpy(compute_signals(w).vector())
    torch.testing.assert_close(f[0, N_FEATURES:], sig)
    torch.testing.assert_close(f[-1, N_FEATURES:], sig)


def test_encode_shapes_cached_path_and_lengths(stock):
    feats = [stock.load_features(r)[0] for r in ("IBM_2000@2004-06-30", "MSFT_2000@2008-01-31")]
    values, mask = stock.collate_features(feats)
    emb, lengths = stock.encode(values, mask)
    assert emb.shape == (2, 5, 48) and lengths.tolist() == [5, 5] == [stock.output_length(64)] * 2
    hidden, hl = stock.encode_frozen(values, mask)
    assert stock.adapted_length(hidden.shape[1]) == 5
    emb2, _ = stock.adapt(hidden, hl)
    torch.testing.assert_close(emb, emb2)
    # a sample alone or padded next to a longer one encodes the same
    short = feats[0][-40:]
    alone, _ = stock.encode(*stock.collate_features([short]))
    both, _ = stock.encode(*stock.collate_features([short, feats[1]]))
    torch.testing.assert_close(alone[0], both[0], rtol=1e-4, atol=1e-5)


def test_frozen_encoder_gets_no_grad_adaptor_does(stock):
    values, mask = stock.collate_features([stock.load_features("IBM_2000@2004-06-30")[0]])
    assert stock.encoder_frozen
    emb, _ = stock.encode(values, mask)
    emb.sum().backward()
    assert all(p.grad is None for p in stock.encoder.parameters())
    assert all(p.grad is not None for p in stock.adaptor.parameters())


def test_target_rms_and_argument_checks():
    m = StockModality(d_llm=16, target_rms=0.02, **SMALL)
    values, mask = m.collate_features([m.load_features("IBM_2000@2004-06-30")[0]])
    emb, _ = m.encode(values, mask)
    torch.testing.assert_close(emb.pow(2).mean(-1).sqrt(), torch.full((1, 5), 0.02), rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="n_tokens"):
        StockModality(d_llm=16, **(SMALL | {"n_tokens": 99}))
    with pytest.raises(ValueError, match="ForecasterConfig"):
        StockModality(d_llm=16, **(SMALL | {"context": 63}))
    with pytest.raises(ValueError, match="d_llm is None"):
        StockModality(d_llm=None, **SMALL).adapt(torch.zeros(1, 20, 32), torch.tensor([20]))


def test_checkpoint_round_trip_and_mismatch(stock, tmp_path):
    path = tmp_path / "fc.pt"
    stock.save_forecaster(path)
    other = StockModality(d_llm=48, checkpoint=str(path), **SMALL)
    for a, b in zip(stock.encoder.state_dict().values(), other.encoder.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert other.align_requires is None and stock.align_requires == "forecast"
    # a Lightning-style checkpoint with encoder.* keys loads too
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in stock.encoder.state_dict().items()}}, tmp_path / "l.ckpt")
    StockModality(d_llm=48, checkpoint=str(tmp_path / "l.ckpt"), **SMALL)
    with pytest.raises(ValueError, match=r"fc.pt: forecaster config differs"):
        StockModality(d_llm=48, checkpoint=str(path), **(SMALL | {"d_model": 64}))
    torch.save({"state_dict": {"encoder.pos": torch.zeros(3)}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"bad.ckpt: forecaster weights do not match"):
        StockModality(d_llm=48, checkpoint=str(tmp_path / "bad.ckpt"), **SMALL)


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, above all on a shared CPU
    yield
    torch.set_num_threads(n)


def test_forecast_stage_hooks_train(tmp_path, one_thread):
    torch.manual_seed(0)
    m = StockModality(d_llm=None, train_encoder=True, **SMALL)
    with pytest.raises(ValueError, match="encoder is frozen"):
        StockModality(d_llm=None, **SMALL).configure_optimizers()
    dm = StockForecastDataModule("packaged", context=64, horizon=5, batch_size=32, tickers=["IBM_2000"])
    before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    trainer = L.Trainer(max_steps=3, limit_val_batches=2, val_check_interval=2, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(m, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/rel_mae" in trainer.callback_metrics
    changed = [k for k, v in m.encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert "patch_embed.weight" in changed


def test_reading_states_signals_and_the_forecasters_call_and_fills_its_answers(stock):
    from data.dataset import ConversationDataset
    from modality.stock.data.text import question_specs
    from tasks.evaluate import answer_correct

    ref = {"csv": "packaged", "ticker": "IBM_2000", "end": "2008-10-31"}
    text, fields = stock.reading(ref), stock.answer_fields(ref)
    with torch.no_grad():  # the forecaster's own call on this window, computed here independently
        x, valid, _ = stock.right_align(stock.featurize(stock.load(ref))[None], torch.ones(1, SMALL["context"], dtype=torch.bool))
        median = float(stock.encoder(x).quantiles[0, -1, 1])
    direction = "up" if median >= 0 else "down"
    assert fields["forecast_direction"].startswith(f"Likely {direction} ")
    assert f"forecast: likely {direction}," in text
    for q in question_specs(compute_signals(stock.load(ref)), SMALL["context"]):
        assert answer_correct(q.key, text), q.key
    rec = {"id": "r", "where": "f.jsonl:1", "stock": [ref], "fill": "stock", "conversations": [
        {"from": "human", "value": "<stock>\nWhich way?"}, {"from": "gpt", "value": "{forecast_direction}"}]}
    sample = ConversationDataset([rec], {"stock": stock})[0]
    assert sample["messages"][-1]["content"] == fields["forecast_direction"] and sample["readings"]["stock"] == [text]
    bad = dict(rec, conversations=[rec["conversations"][0], {"from": "gpt", "value": "{tomorrow}"}])
    with pytest.raises(ValueError, match=r"f.jsonl:1: stock cannot fill \{tomorrow\}"):
        ConversationDataset([bad], {"stock": stock})[0]
    assert StockModality(d_llm=48, reading=False, **SMALL).reading(ref) is None
