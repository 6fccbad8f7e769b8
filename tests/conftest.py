"""Shared test setup: never touch the network, keep torch small on a 2-core machine."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
# under pytest-xdist (`make test`: one worker per core) each worker and the processes it starts use one thread
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
# Never the user's Hugging Face / torch caches: a machine with DINO weights cached must test like CI (subprocesses
# inherit this environment too).
for _var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(_var, None)
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hp-pipe-test-hf-")
os.environ["TORCH_HOME"] = os.path.join(os.environ["HF_HOME"], "torch")
# `amp = "auto"` turns bf16 autocast on where the CPU has native bf16 (pipeline/precision.py): the suite pins the CPU
# as one without, so that its exact-value tests hold on every machine; the bf16 tests ask for amp = true themselves.
os.environ["HP_PIPE_CPU_BF16"] = "0"


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SLOW_REASON = "slow end-to-end test: `make test-all` runs it, and so does CI (CI=1)"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (CI=1 does too)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: an end-to-end test of many seconds; skipped by `make test` unless CI "
                                       "is set or --slow is given, always run by CI")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow") or os.environ.get("CI"):
        return
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.skip(reason=SLOW_REASON))
