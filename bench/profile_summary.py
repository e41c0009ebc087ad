"""Flat summary of a pyinstrument session a bench server wrote (``--profile OUT`` →
``OUT.pyisession``): the main thread's busy time, then the functions with the most
inclusive and the most self time (idle ``epoll``/``select`` waits left out).

    python bench/profile_summary.py OUT.pyisession [--top 30] [--match genq]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from pyinstrument.session import Session

IDLE = {"poll", "select", "epoll.poll", "wait", "sleep"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("session")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--match", default="", help="only list functions whose file path contains this")
    args = p.parse_args()
    s = Session.load(args.session)
    root = s.root_frame()
    incl: dict[str, float] = defaultdict(float)
    selft: dict[str, float] = defaultdict(float)

    def rec(frame, stack):
        key = f"{frame.function}  {frame.file_path_short}:{frame.line_no}"
        if frame.function in IDLE or "poll" in frame.function or frame.function in ("select",):
            return
        if frame.function == "[self]":  # pyinstrument's synthetic self-time frame
            if stack:
                selft[stack[-1]] += frame.time
            return
        if key not in stack:
            incl[key] += frame.time
        if not frame.children:
            selft[key] += frame.time
        stack.append(key)
        for c in frame.children:
            rec(c, stack)
        stack.pop()

    rec(root, [])
    idle = 0.0

    def idle_time(frame):
        nonlocal idle
        if frame.function in IDLE or "poll" in frame.function or frame.function == "select":
            idle += frame.time
            return
        for c in frame.children:
            idle_time(c)

    idle_time(root)
    print(f"duration {s.duration:.2f} s, main thread idle (epoll/select) {idle:.2f} s, busy {s.duration - idle:.2f} s")
    print(f"\ntop {args.top} by inclusive time (s):")
    rows = [(t, k) for k, t in incl.items() if args.match in k]
    for t, k in sorted(rows, reverse=True)[: args.top]:
        print(f"  {t:8.3f}  {k}")
    print(f"\ntop {args.top} by self time (s):")
    rows = [(t, k) for k, t in selft.items() if args.match in k]
    for t, k in sorted(rows, reverse=True)[: args.top]:
        print(f"  {t:8.3f}  {k}")


if __name__ == "__main__":
    main()
