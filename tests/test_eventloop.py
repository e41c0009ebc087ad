"""``GENQ_EVENT_LOOP``: ``genq up`` runs on uvloop unless told otherwise, and a real process
shows which loop it loaded (its memory map), not just what a setting says."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from genq import eventloop
from hostile import GenqProcess


def test_run_picks_uvloop_unless_asked_for_the_standard_loop():
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert eventloop.run(loop_module()).startswith("uvloop")
    assert eventloop.run(loop_module(), "uvloop").startswith("uvloop")
    assert eventloop.run(loop_module(), "asyncio").startswith("asyncio")


def test_asking_for_uvloop_where_it_is_missing_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what Python answers for a package that is not there
    assert eventloop.resolve("auto") == "asyncio"
    with pytest.raises(RuntimeError, match="not installed"):
        eventloop.resolve("uvloop")


def _maps_uvloop(pid: int) -> bool:
    return "uvloop" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("setting, loaded", [(None, True), ("asyncio", False)])
def test_genq_up_runs_on_the_chosen_loop_and_serves(tmp_path, setting, loaded):
    g = GenqProcess(tmp_path, env={"GENQ_EVENT_LOOP": setting} if setting else {}).start()
    try:
        assert _maps_uvloop(g.proc.pid) is loaded
    finally:
        g.stop()
    assert g.proc.returncode == 0, g.log()[-2000:]
