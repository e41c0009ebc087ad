"""What ``genq.jsonlimits.loads`` costs beside a plain ``json.loads``, on the bodies a
client may send: a small submit (the hot path), the issue's 10 KB body nested 5,000 deep,
100,000 keys, three 20 MB base64 images, and the refused kinds. Pure CPU, one process.

    python bench/json_limits.py [--repeat 5]

Each case is timed ``--repeat`` times (best of, per call) for both readers; a refusal's
reason is printed. No target: the issue asks for refusals "in microseconds" and for the
accepted path to stay cheap.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time

from genq import jsonlimits


def cases() -> list[tuple[str, bytes]]:
    image = "data:image/png;base64," + base64.b64encode(os.urandom(20 * 1024 * 1024)).decode()
    return [
        ("small submit", json.dumps({"tool": "echo", "params": {"text": "make [the] sky {blue}", "seed": 42},
                                     "priority": "high"}).encode()),
        ("nested 32 (the limit)", b"[" * 32 + b"]" * 32),
        ("10 KB nested 5,000 deep", b'{"tool":"echo","params":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}"),
        ("nested 100,000, never closed", b"[" * 100_000),
        ("9,000 keys", json.dumps({"tool": "echo", "params": {f"k{i}": i for i in range(9000)}}).encode()),
        ("100,000 keys (1.3 MB)", json.dumps({"tool": "echo", "params": {f"k{i}": i for i in range(100_000)}}).encode()),
        ("3 x 20 MB images (84 MB)", json.dumps({"tool": "echo", "inputs": {"images": [image] * 3}}).encode()),
        ("NaN", b'{"tool":"echo","params":{"a":NaN}}'),
        ("5,000-digit integer", b'{"a":1' + b"0" * 5000 + b"}"),
        ("duplicate key", b'{"tool":"echo","tool":"upscale"}'),
        ("lone surrogate", b'{"a":"\\ud800"}'),
    ]


def best(fn, data: bytes, repeat: int) -> tuple[float, str]:
    n = max(1, min(20_000, int(2e6 // max(len(data), 1))))
    times, what = [], "ok"
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            try:
                fn(data)
            except (ValueError, RecursionError) as e:
                what = getattr(e, "message", type(e).__name__)
        times.append((time.perf_counter() - t0) / n)
    return min(times), what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"{'body':30s} {'bytes':>10s} {'jsonlimits':>12s} {'json.loads':>12s}  answer")
    for name, data in cases():
        ours, what = best(jsonlimits.loads, data, args.repeat)
        plain, plain_what = best(json.loads, data, args.repeat)
        print(f"{name:30s} {len(data):>10,d} {ours * 1e6:>10.1f}µs {plain * 1e6:>10.1f}µs  {what[:70]}"
              + (f" (json.loads: {plain_what})" if plain_what != "ok" else ""))


if __name__ == "__main__":
    main()
