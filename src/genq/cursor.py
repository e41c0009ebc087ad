"""The opaque cursor of ``GET /v1/jobs`` pages: the id of the last job a page showed.

Every ``JobStore`` pages by job id (ULIDs sort by creation time), so one codec serves
them all and a cursor from one API replica works on another.

Neighbours: :class:`genq.ports.Page` carries the cursor; the SQLite and Kubernetes
stores (:mod:`genq.adapters`) encode and decode it.
"""

from __future__ import annotations

import base64


def encode_cursor(job_id: str) -> str:
    return base64.urlsafe_b64encode(job_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The job id in ``cursor``; ``ValueError`` for anything that is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except Exception as e:
        raise ValueError("invalid cursor") from e
    if not raw.isalnum() or len(raw) > 64:
        raise ValueError("invalid cursor")
    return raw
