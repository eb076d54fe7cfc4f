"""Several modalities in one model (conf/modality/mixed.yaml): cross-modal data builders, no plugin of its own."""
