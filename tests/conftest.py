"""Shared test setup: tiny and deterministic, never touching the user's real cache."""

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache dir via CNNEXPLAIN_CACHE unless it sets one itself."""
    monkeypatch.setenv("CNNEXPLAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
