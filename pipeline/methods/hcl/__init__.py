"""Hierarchical Context Learning (docs/hcl.md): heads, loss and MoGoClustering on a frozen feature cache."""
