"""`hp-pipe verify`: read every chunk of a store and check it, and record what is bad (docs/cache.md, "Integrity").

`hp-pipe features` only checks a store cheaply before calling it up to date (every chunk object present with its
recorded size; a COCO-scale store is over 100 GiB). This is the full read: every finished chunk of every array
decoded (its crc32c checksum codec) and its values compared with the digest recorded when it was written, several
chunks at a time. Bad chunks lose their done flag and are listed in the store's attributes, so that the next
`hp-pipe features` recomputes exactly them and readers refuse the store until then.

Exit codes: 0 every chunk of every store verifies; 1 something is bad or unfinished (named, one line each);
2 bad input (no store there, not an hp-pipe store, a schema without checksums).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import zarr

from cache import writer
from cache.integrity import SIZE, StoreCheck, mark_bad, read_records, record_arrays, summarize, verify_chunks
from cache.schema import SCHEMA_VERSION
from pipeline.errors import UserError
from pipeline.log import log
from pipeline.orchestration.locks import hold, store_lock


def require_store(url: str) -> zarr.Group:
    group = writer.open_group(url, mode="r")
    if group is None:
        raise UserError(f"no feature store at {url}; run `hp-pipe features` for this dataset and split first "
                        "(or pass the store's URL with --store)")
    return group


def verify_store(url: str, threads: int = 8) -> tuple[StoreCheck, int, dict]:
    """(what the full read found, bytes read, the store's attributes) for the store at `url`; bad chunks are
    recorded in the store."""
    group = require_store(url)
    attrs = dict(group.attrs)
    if "schema_version" not in attrs:
        raise UserError(f"{url} is not an hp-pipe feature store; pass the URL of one with --store")
    if attrs["schema_version"] != SCHEMA_VERSION:
        raise UserError(f"store {url} has schema version {attrs['schema_version']}, this hp-pipe verifies "
                        f"{SCHEMA_VERSION} (older stores carry no checksums); rebuild it with "
                        "`hp-pipe features --force`")
    check = verify_chunks(group, url, threads)
    read = 0
    if not check.missing_arrays:
        records = read_records(group)
        done = sorted(set(range(check.chunks)) - set(check.unfinished))
        read = int(records[done, :, SIZE].sum()) if done else 0
    if check.bad:
        mark_bad(writer.open_group(url, mode="r+"), check.bad)
    return check, read, {**attrs, "n_arrays": len(record_arrays(group))}


def report(check: StoreCheck, read: int, seconds: float, attrs: dict, log: Callable[[str], None],
           error: Callable[[str], None]) -> bool:
    """One line for a store that verifies; otherwise each bad chunk on its own line and one `error:` line."""
    url = check.url
    if check.missing_arrays:
        error(f"store {url}: array {', '.join(repr(n) for n in check.missing_arrays)} missing; "
              "`hp-pipe features` (same options as when the store was built) recreates it and recomputes the store")
        return False
    for bad in check.bad:
        log(f"{url}: bad: {bad}")
    if check.bad:
        fix = ("rerun `hp-pipe evaluate --force` for its run to rewrite the codes" if attrs.get("kind") == "codes"
               else "run `hp-pipe features` (same options as when the store was built) to recompute exactly them")
        error(f"store {url}: {len(check.bad_chunks)} of {check.chunks} chunks are bad: {summarize(check.bad)}; "
              f"they are recorded in the store: {fix}")
        return False
    if check.unfinished or check.recorded_bad:
        error(f"store {url} is incomplete: {len(check.unfinished)} of {check.chunks} chunks not written (or "
              "recorded bad and not yet recomputed), the others verify; run `hp-pipe features` (same options as "
              "when the store was built) to finish it")
        return False
    log(f"{url}: all {check.chunks} chunks of {attrs['n_arrays']} arrays verify "
        f"({read / 2**20:.1f} MiB read in {seconds:.1f} s)")
    return True


def run(urls: list[str], stage_dir: Path, threads: int = 8) -> int:
    """Verify each store (holding its writer lock, so no writer changes it meanwhile); the exit code."""
    ok = True
    for url in urls:
        require_store(url)  # before its lock: no lock file beside a store that is not there
        with hold([(store_lock(stage_dir, url), f"the store {url}")]):
            t0 = time.perf_counter()
            check, read, attrs = verify_store(url, threads)
            ok &= report(check, read, time.perf_counter() - t0, attrs, _out, _err)
    return 0 if ok else 1


def _out(message: str) -> None:
    log.info(f"[verify] {message}")


def _err(message: str) -> None:
    log.error(f"error: {message}")
