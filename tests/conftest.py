"""Shared test setup: never touch the network, keep torch small on a 2-core machine."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")
