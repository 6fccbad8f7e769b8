"""hp-pipe's messages go through `logging`, printed beside tqdm's progress bars without breaking them.

One logger, "hp_pipe": INFO lines (what a stage did: "[train-hp] up to date ...") go to stdout, warnings and errors
to stderr, each through `tqdm.write` so that an active progress bar is redrawn below the line instead of being cut
in two. The streams are looked up when a line is written, so redirected or captured output sees it. The command
line's `--quiet` (warnings only) and `--verbose` (debug lines too) set the level; the library never prints.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

LOGGER_NAME = "hp_pipe"
LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}


class TqdmHandler(logging.Handler):
    """A line per record, written with `tqdm.write` to stdout (below WARNING) or stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take the program down
            self.handleError(record)


def get_logger(name: str | None = None) -> logging.Logger:
    """The project's logger (or a child of it: `get_logger("dask")` -> "hp_pipe.dask")."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def set_verbosity(verbosity: str) -> None:
    """quiet | normal | verbose, for the whole run (the command line's --quiet / --verbose)."""
    get_logger().setLevel(LEVELS[verbosity])


def _install() -> None:
    logger = get_logger()
    if not any(isinstance(h, TqdmHandler) for h in logger.handlers):
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the lines are the user's output: never doubled by a root handler


_install()
log = get_logger()
