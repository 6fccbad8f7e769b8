"""Shared test setup: never touch the network, keep torch small on a 2-core machine."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Never the user's Hugging Face / torch caches: a machine with DINO weights cached must test like CI (subprocesses
# inherit this environment too).
for _var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(_var, None)
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hp-pipe-test-hf-")
os.environ["TORCH_HOME"] = os.path.join(os.environ["HF_HOME"], "torch")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
