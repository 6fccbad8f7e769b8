"""Extraction: the frozen backbone, the features stage's workers, views, prepared crops and LHP weights."""
