"""Which event loop genq's processes run on (``GENQ_EVENT_LOOP``).

``auto`` (the default) is uvloop where it is installed (it comes with ``uvicorn[standard]``,
a dependency), else the standard library's loop; ``uvloop`` insists on it; ``asyncio``
keeps the standard loop (a debugging aid: the stdlib loop's debug mode, or a library that
misbehaves on uvloop). uvloop is what ``uvicorn`` picks on its own, so ``genq api`` ran on
it already; ``genq up`` and ``genq worker`` spent 7-10 % more CPU per job on the standard
loop (BENCHMARKS.md §5).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Choice = Literal["auto", "uvloop", "asyncio"]

log = logging.getLogger("genq.eventloop")


def resolve(choice: Choice) -> Literal["uvloop", "asyncio"]:
    """The loop ``choice`` means on this machine; ``uvloop`` when it is not installed is an
    error, not a silent fallback."""
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError("GENQ_EVENT_LOOP=uvloop, but uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T], choice: Choice = "auto") -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    loop = resolve(choice)
    log.debug("event loop: %s", loop)
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
