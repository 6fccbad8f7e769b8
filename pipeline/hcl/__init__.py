"""Hierarchical Context Learning (specs/HCL.md): heads, loss and MoGoClustering on a frozen feature cache."""
