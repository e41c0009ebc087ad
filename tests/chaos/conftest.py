"""The reliability suite's options and fixtures.

``pytest tests/chaos`` runs the short form (CI); ``pytest tests/chaos --long`` runs every
scenario for minutes, with more faults and more load. Each test draws its faults from a
seeded random generator and prints the seed; ``--chaos-seed N`` (or ``GENQ_CHAOS_SEED=N``)
replays a run's choices.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

# Appended, not prepended: `import conftest` must keep meaning tests/conftest.py.
sys.path.append(str(Path(__file__).parent))


# --long and --chaos-seed are declared in tests/conftest.py: an option added here would
# exist only when this folder is named on the command line (`pytest --long` from the
# repository root would be refused).


@pytest.fixture
def long_form(request) -> bool:
    return bool(request.config.getoption("--long"))


@pytest.fixture
def rng(request) -> random.Random:
    seed = request.config.getoption("--chaos-seed", default=None)
    if seed is None and os.environ.get("GENQ_CHAOS_SEED"):
        seed = int(os.environ["GENQ_CHAOS_SEED"])
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    print(f"\n[chaos] {request.node.name}: seed {seed} (replay with --chaos-seed {seed})")
    rng = random.Random(seed)
    rng.chaos_seed = seed  # named in the ledger's summary, so in every failure message
    return rng


@pytest.fixture
def faults(long_form):
    """``faults(short, long)``: how many faults a scenario injects in this form.
    ``GENQ_CHAOS_FAULTS=N`` overrides it (a quick look while changing the suite)."""

    def pick(short: int, long: int) -> int:
        env = os.environ.get("GENQ_CHAOS_FAULTS")
        return int(env) if env else (long if long_form else short)

    return pick


def pytest_collection_modifyitems(config, items):
    # A bound that a hang cannot outlive by much, and room for the long form's minutes.
    long = config.getoption("--long", default=False)
    for item in items:
        if item.get_closest_marker("chaos") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(3600 if long else 600))
