"""Compare-and-set: the one way a job's row changes after its INSERT. ``_cas`` runs on
the store's connection inside a grouped write; the SET clauses it needs are built once per
set of changed fields and cached, so SQLite's statement cache keeps them compiled."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from typing import Any

from genq.models import MUTABLE_FIELDS, Job, cas_allows

from .schema import _DATA_FIELDS, _NEXT_REV, _deadline_at, _encode_data, _row_to_job

def _evolved(job: Job, **changes: Any) -> Job:
    """``job.evolve(**changes)`` without ``dataclasses.replace``'s trip through ``__init__``
    (a third of a compare-and-set's Python time): a copy of its fields with ``changes``
    over them. Job has no ``__post_init__`` to skip."""
    new = object.__new__(Job)
    fields = new.__dict__
    fields.update(job.__dict__)
    fields.update(changes)
    return new


#: What a change of each updatable field writes: (column, value of the new job) pairs;
#: every field kept in the JSON blob rewrites ``data``.
_CAS_COLUMNS: dict[str, tuple[tuple[str, Callable[[Job], Any]], ...]] = {
    **{f: ((f, lambda j, f=f: getattr(j, f)),) for f in sorted(MUTABLE_FIELDS) if f not in _DATA_FIELDS},
    **{f: (("data", _encode_data),) for f in _DATA_FIELDS if f in MUTABLE_FIELDS},
    "status": (("status", lambda j: j.status.value), ("deadline_at", _deadline_at)),
    "started_at": (("started_at", lambda j: j.started_at), ("deadline_at", _deadline_at)),
    "deadline_seconds": (("data", _encode_data), ("deadline_at", _deadline_at)),
}


def _cas_sets(changes: dict[str, Any], requeue: bool) -> tuple[str, tuple[tuple[str, Callable[[Job], Any]], ...]]:
    """The SET clause of a compare-and-set changing ``changes``' fields, and how to get
    each ``?``'s value from the new job. Same fields, same text: SQLite's statement cache
    keeps the few shapes the callers use compiled."""
    return _cas_sets_for(tuple(sorted(changes)), requeue)


@functools.lru_cache(maxsize=256)
def _cas_sets_for(fields: tuple[str, ...], requeue: bool) -> tuple[str, tuple[tuple[str, Callable[[Job], Any]], ...]]:
    cols: dict[str, Callable[[Job], Any]] = {}
    for field in fields:
        for col, get in _CAS_COLUMNS[field]:
            cols[col] = get
    sets = [f"{col} = ?" for col in cols]
    sets += ["version = version + 1", f"rev = {_NEXT_REV}"]
    if requeue:
        sets.append("seq = (SELECT MAX(seq) + 1 FROM jobs)")
    return ", ".join(sets), tuple(cols.items())


def _cas(
    conn: sqlite3.Connection,
    job_id: str,
    expect: list[str] | None,
    version: int | None,
    guard: Callable[[Job], bool] | None,
    requeue: bool,
    changes: dict[str, Any],
    known: Job | None = None,
) -> Job | None:
    """Compare-and-set. The ``version = ?`` in the UPDATE keeps it atomic against writers
    in other processes; on a lost race the row is read afresh and the expectation checked
    again. Safe to run again from the start when SQLite answers SQLITE_BUSY.

    ``known``, a committed state of the job seen lately, is tried first without reading
    the row: the UPDATE's ``version = ?`` confirms it is still the row's, and on a miss
    the row is read as usual. A worker's claim and finish write a job this process just
    read or wrote: each saves a SELECT and a row parse."""
    for i in range(6):
        if i == 0:
            if known is None or not cas_allows(known, expect, version, guard):
                continue  # decided on the row itself, never on a guess
            current = known
        else:
            # fetchall, not fetchone: a statement stepped to its end is reset at once, so
            # an UPDATE ... RETURNING commits here and not whenever its cursor is collected.
            rows = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchall()
            if not rows:
                return None
            current = _row_to_job(rows[0])
        if not cas_allows(current, expect, version, guard):
            return None
        # The row after the write is the one read with ``changes`` applied and the version
        # bumped (``WHERE version = ?`` makes that so): built here, not read back and parsed.
        new = _evolved(current, **changes, version=current.version + 1)
        sets, getters = _cas_sets(changes, requeue)
        cur = conn.execute(
            f"UPDATE jobs SET {sets} WHERE id = ? AND version = ?{' RETURNING seq' if requeue else ''}",
            (*(get(new) for _, get in getters), job_id, current.version),
        )
        if requeue:
            written = cur.fetchall()
            if written:
                return _evolved(new, seq=written[0][0])
        elif cur.rowcount == 1:  # an UPDATE without RETURNING runs to its end (and commits) in execute
            return new
        if version is not None:
            return None
    return None
