"""Modality plugins: a frozen encoder plus a trainable adaptor each (see base.Modality)."""
