"""Speech recognition machinery of the speech modality: CTC objectives (tokens, phonemes), joint and lexicon decoding."""
