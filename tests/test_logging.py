"""hp-pipe's messages: through `logging`, INFO to stdout and warnings to stderr, levels from --quiet/--verbose,
progress bars left whole, and lines logged on a dask worker shown on the client's console."""

from __future__ import annotations

import logging
import sys
import time

import pytest
from tqdm import tqdm

from pipeline.log import get_logger, log, set_verbosity
from pipeline.orchestration.dask_client import dask_client


@pytest.fixture(autouse=True)
def normal_level():
    yield
    set_verbosity("normal")


def test_info_goes_to_stdout_and_warnings_to_stderr(capsys):
    log.info("[stage] did a thing")
    log.warning("[stage] careful")
    log.debug("[stage] detail")
    out, err = capsys.readouterr()
    assert out == "[stage] did a thing\n"
    assert err == "[stage] careful\n"


@pytest.mark.parametrize(("verbosity", "shown"), [("quiet", {"warning"}), ("normal", {"info", "warning"}),
                                                  ("verbose", {"debug", "info", "warning"})])
def test_verbosity_selects_the_lines(capsys, verbosity, shown):
    set_verbosity(verbosity)
    for level in ("debug", "info", "warning"):
        getattr(get_logger("child"), level)(level)
    out, err = capsys.readouterr()
    assert set((out + err).split()) == shown


def test_a_line_during_a_progress_bar_leaves_the_bar_whole(capsys):
    """tqdm.write clears the bar, writes the line, and redraws the bar: the line is never glued to a bar."""
    with tqdm(total=3, file=sys.stdout, ascii=True, desc="bar") as bar:
        bar.update(1)
        log.info("[stage] between")
        bar.update(2)
    out = capsys.readouterr().out
    line = [piece for piece in out.replace("\r", "\n").split("\n") if "between" in piece]
    assert line == ["[stage] between"]


def _log_on_worker() -> str:
    from pipeline.log import log as worker_log

    worker_log.info("[worker] hello from a worker")
    return "done"


def test_dask_worker_lines_reach_the_client():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    keep = Keep()
    get_logger().addHandler(keep)
    try:
        with dask_client(None, 1) as client:
            assert client.submit(_log_on_worker, pure=False).result() == "done"
            client.run(lambda: None)  # a round trip after the task: the forwarded record has arrived
            deadline = time.monotonic() + 10
            while not any("hello from a worker" in r.getMessage() for r in records) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        get_logger().removeHandler(keep)
    assert any(r.getMessage() == "[worker] hello from a worker" for r in records)
