"""The speech corpus: espeak-ng synthesis of real sentences, instruct conversations, splits."""
