"""Shared test setup. Area-specific fixtures live in their own test modules."""

import os
import uuid

# No model hub here: everything loads from local directories or packaged weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect API (SQLite) for the whole session; flows run against it.

    Started once because a cold start costs ~10 s; only tests that ask for it pay.
    """
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield home


@pytest.fixture
def no_orphans():
    """A token for the processes this test starts (`tagged_env(token)`, tests/processes.py): any of
    them, or of their children, still running when the test ends fails the test (and is killed)."""
    from processes import describe, survivors

    token = uuid.uuid4().hex
    yield token
    left = survivors(token)
    for p in left:
        p.kill()
    assert not left, f"processes outlived the test: {describe(left)}"


def pytest_collection_modifyitems(items):
    """End-to-end tests (several Prefect starts, real processes) get a longer pytest-timeout than the
    300 s default in pyproject.toml, unless they set their own."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(900))
