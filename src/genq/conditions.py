"""Kubernetes status conditions (``metav1.Condition``), built once for every resource.

A GenerationJob's ``Queued`` / ``Started`` / ``Succeeded`` (written by the job store) and
a ToolPool's ``Ready`` / ``Active`` (written by the operator) are the same Kubernetes
idea, so they share one builder: CamelCase reasons, ``observedGeneration``, a message
the apiserver accepts (at most 32 KiB) and a ``lastTransitionTime`` in whole seconds
(``metav1.Time``) that moves only when the condition's status does.

Neighbours: below :mod:`genq.adapters.kubernetes` and :mod:`genq.operator.conditions`
(imports neither, nor the Kubernetes client); the types and reasons of job conditions
are in :mod:`genq.constants`, the ToolPool's in :mod:`genq.operator.conditions`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from genq.models import rfc3339

#: ``metav1.Condition.message`` is at most 32768 characters.
MESSAGE_LIMIT = 32768

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"


def transition_time(at: float | None) -> str:
    """A condition's ``lastTransitionTime``: whole seconds (``metav1.Time``), now if None."""
    return rfc3339(time.time() if at is None else at, digits=0)  # type: ignore[return-value]


def condition(type_: str, status: str, reason: str, *, at: float | None, generation: int,
              message: str = "") -> dict[str, Any]:
    """One condition, as written whole (the job store rewrites every condition)."""
    return {
        "type": type_, "status": status, "reason": reason, "message": message[:MESSAGE_LIMIT],
        "lastTransitionTime": transition_time(at), "observedGeneration": generation,
    }


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    *,
    generation: int,
    now: float,
) -> list[dict[str, Any]]:
    """``conditions`` with ``type_`` set; ``lastTransitionTime`` moves only when the
    status does (metav1.Condition semantics). Returns a new list; order is kept."""
    out: list[dict[str, Any]] = []
    found = False
    for c in conditions or ():
        c = dict(c)
        if c.get("type") == type_:
            found = True
            changed = c.get("status") != status
            c.update(status=status, reason=reason, message=message[:MESSAGE_LIMIT], observedGeneration=generation)
            if changed or not c.get("lastTransitionTime"):
                c["lastTransitionTime"] = transition_time(now)
        out.append(c)
    if not found:
        out.append(condition(type_, status, reason, at=now, generation=generation, message=message))
    return out


def find(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any]:
    """The condition of type ``type_`` ({} if there is none)."""
    return next((c for c in conditions or () if c.get("type") == type_), {})
