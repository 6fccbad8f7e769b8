"""Orchestration: the stage graph and its executor, the runner and manifests, run records, paths, locks."""
