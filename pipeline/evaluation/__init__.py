"""Evaluation: probes, metrics, Hungarian matching, dense CRF, overclustering, codes and encoders."""
