"""The methods hp-pipe trains: one package per method, each registered once (pipeline/methods/registry.py)."""
