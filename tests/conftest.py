"""Shared set-up.

Every grading uses the quick bundle shipped in reference/bundles/quick/ (checked by its
hash); nothing here builds one. SLIMGRADE_CACHE only keeps --bundle archives that tests
unpack inside the repo, never in the user's home.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SLIMGRADE_CACHE", str(REPO / ".cache" / "slimgrade"))


@pytest.fixture(scope="session")
def run_cache(tmp_path_factory) -> Path:
    """One run cache for the whole session, shared by the xdist workers.

    SLIMGRADE_TEST_RUN_CACHE keeps it across sessions (for work on the evaluation side
    only: a cached run does not notice changes to the executor or the runtime).
    """
    if os.environ.get("SLIMGRADE_TEST_RUN_CACHE"):
        return Path(os.environ["SLIMGRADE_TEST_RUN_CACHE"])
    root = tmp_path_factory.getbasetemp()
    shared = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "run-cache"
    shared.mkdir(parents=True, exist_ok=True)
    return shared


@pytest.fixture(scope="module")
def one_torch_thread():
    """The machine is shared: one torch thread for a module's tests, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
