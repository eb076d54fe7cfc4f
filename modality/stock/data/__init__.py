"""Stock data: OHLCV CSV readers, signals, forecast windows, conversation records and their DataModule."""
