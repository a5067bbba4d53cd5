"""Shared pytest fixtures. Keep this file small: one fixture per shared need."""
import pytest


@pytest.fixture(scope="session")
def lrpt_cache(tmp_path_factory):
    """A cache directory for the embedded corpus, private to this test session and shared by
    its tests (building the corpus takes seconds; build it at most once per session). Tests
    point `LRPT_CACHE` at it with `monkeypatch.setenv("LRPT_CACHE", str(lrpt_cache))`."""
    return tmp_path_factory.mktemp("lrpt-cache")


def pytest_addoption(parser):
    parser.addoption("--trials", type=int, default=10,
                     help="kill -9 trials in tests/test_faults.py (a soak: --trials 200; replay one: LRPT_FAULT_SEED)")
