"""Stock price series: the plugin, the forecaster and its pretraining stage, metrics, text baselines, and the
CSV readers, signals and record builders under data/."""

from modality.stock.plugin import StockModality

__all__ = ["StockModality"]
