"""Lake maintenance: compact the cluster layout, then vacuum what rewrites left behind.

Every re-curation leaves files no commit references any more: an overwrite of ``dedup_scores``,
``clusters`` or a recipe's ``subsets`` partition, a layout rebuild (``concept_clusters`` mode
``retrain``: the whole ``pool_by_cluster``, 20 GB at 10M), a compaction (the buckets it
rewrote). Nothing in the curation path deletes them (only the ingest vacuums ``samples`` and
``quarantine``), so without maintenance the disk grows with every wave. And every incremental
update appends a file to each bucket it touches, so the files per bucket, and with them what a
topical update reads (docs/benchmarks.md), grow too.

:func:`maintain_lake` does both, in this order:

1. :func:`curation.select.layout.compact_layout` of the buckets holding at least
   ``compact_min_files`` files (one conflict-checked commit that changes no row);
2. :meth:`curation.storage.lake.Lake.vacuum` of every table: files no commit references and
   older than ``retention_hours`` (younger ones may belong to a write in flight, and readers of
   an older version may still read them).

It is what ``lake_maintenance_job`` runs (:mod:`assets.maintenance`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from curation.select.layout import LAYOUT_TABLE, buckets_to_compact, compact_layout, layout_files_per_bucket
from curation.storage.lake import TABLES, VACUUM_RETENTION_HOURS, Lake

log = logging.getLogger(__name__)


@dataclass
class TableVacuum:
    """One table's vacuum: files deleted (or, in a dry run, that would be), counted as they
    were on disk just before, and their bytes (None on an object store, where the files are not
    looked up: there ``files`` counts every tombstone past the retention, deleted before or not)."""

    table: str
    files: int
    bytes: int | None


@dataclass
class MaintenanceReport:
    """What :func:`maintain_lake` did.

    Attributes:
        compacted_buckets: buckets rewritten (or, in a dry run, that would be).
        layout_files_before / layout_files_after: data files of ``pool_by_cluster`` (None: no layout).
        compaction_skipped: why no compaction ran ("" when it ran or had nothing to do).
        vacuums: one :class:`TableVacuum` per existing table.
        dry_run: nothing was changed.
        seconds: wall time.
    """

    compacted_buckets: list[str] = field(default_factory=list)
    layout_files_before: int | None = None
    layout_files_after: int | None = None
    compaction_skipped: str = ""
    vacuums: list[TableVacuum] = field(default_factory=list)
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def files_vacuumed(self) -> int:
        return sum(v.files for v in self.vacuums)

    @property
    def bytes_freed(self) -> int | None:
        sizes = [v.bytes for v in self.vacuums if v.files]
        return None if any(b is None for b in sizes) else sum(sizes)


def _on_disk(lake: Lake, table: str, paths: list[str]) -> tuple[int, int | None]:
    """How many of ``paths`` (relative to ``table``) still exist, and their bytes, on a local
    lake (a vacuum lists every tombstone past the retention, also those an earlier vacuum
    already deleted); elsewhere ``(len(paths), None)``: the sizes are not looked up."""
    if not lake.is_local:
        return len(paths), None
    root = lake.uri(table)
    n = total = 0
    for p in paths:
        try:
            total += os.path.getsize(p if os.path.isabs(p) else os.path.join(root, p))
            n += 1
        except OSError:  # deleted before (an earlier vacuum): not freed now
            pass
    return n, total


def maintain_lake(
    lake: Lake,
    compact_min_files: int | None = 2,
    retention_hours: int = VACUUM_RETENTION_HOURS,
    tables=None,
    dry_run: bool = False,
    skip_compaction: str = "",
) -> MaintenanceReport:
    """Compact the layout, then vacuum the lake's tables (see the module docstring).

    Args:
        compact_min_files: compact the ``pool_by_cluster`` buckets holding at least this many
            data files (>= 2); None: no compaction.
        retention_hours: vacuum only unreferenced files older than this (>= 0). Delta's default
            is a week; a shorter one frees a rebuild's or compaction's old files sooner but a
            reader still on an older table version then loses them.
        tables: the tables to vacuum (default: every table of the lake that exists).
        dry_run: change nothing; report the buckets that would be compacted and the files
            (and bytes) a vacuum would delete.
        skip_compaction: a reason not to compact now (e.g. a layout writer is running); reported.

    Raises:
        ValueError: an unknown table, ``compact_min_files`` < 2 or ``retention_hours`` < 0.
    """
    if compact_min_files is not None and int(compact_min_files) < 2:
        raise ValueError(f"compact_min_files: got {compact_min_files}; expected >= 2 or None")
    if int(retention_hours) < 0:
        raise ValueError(f"retention_hours: got {retention_hours}; expected >= 0")
    names = list(TABLES) if tables is None else list(tables)
    unknown = sorted(set(names) - set(TABLES))
    if unknown:
        raise ValueError(f"tables: got unknown tables {unknown}; expected some of {sorted(TABLES)}")
    t = time.perf_counter()
    rep = MaintenanceReport(dry_run=dry_run, compaction_skipped=skip_compaction)
    if lake.exists(LAYOUT_TABLE):
        counts = layout_files_per_bucket(lake)
        rep.layout_files_before = rep.layout_files_after = sum(counts.values())
        if compact_min_files is None:
            rep.compaction_skipped = rep.compaction_skipped or "compact_min_files is None"
        elif not skip_compaction:
            todo = buckets_to_compact(counts, compact_min_files)
            if dry_run:
                rep.compacted_buckets = todo
            elif todo:
                done = compact_layout(lake, int(compact_min_files), buckets=todo)
                rep.compacted_buckets = done.buckets
                rep.layout_files_after = done.layout_files
                log.info("maintenance: compacted %d buckets of %s (%d -> %d files) in %.1f s", len(done.buckets),
                         LAYOUT_TABLE, done.files_before, done.files_after, done.seconds)
    for name in names:
        if not lake.exists(name):
            continue
        listed = lake.vacuum(name, retention_hours=int(retention_hours), dry_run=True)
        files, size = _on_disk(lake, name, listed)
        if files and not dry_run:
            lake.vacuum(name, retention_hours=int(retention_hours))
        rep.vacuums.append(TableVacuum(name, files, size))
    rep.seconds = time.perf_counter() - t
    log.info("maintenance: %d unreferenced files %s%s", rep.files_vacuumed, "found" if dry_run else "deleted",
             "" if rep.bytes_freed is None else f" ({rep.bytes_freed / 2**20:.1f} MiB)")
    return rep
