"""The fast tier: pure logic in-process, and HTTP shapes through Starlette's TestClient against the
real ``create_app`` of each server, with no pool and no session service (no JVM, no child process).

Run it alone with ``python3 -m pytest tests/fast``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from helpers import TEST_TOKEN, auth_headers
from studio.config import Settings

TOKEN = TEST_TOKEN
AUTH = auth_headers(TOKEN)
LIVY_BASE = "http://127.0.0.1:8998"


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings in ``tmp_path`` that start nothing: no warm worker, no class-data archive build."""
    values: dict[str, object] = {
        "state_dir": tmp_path / "state",
        "cache_dir": tmp_path / "cache",
        "root": tmp_path / "notebooks",
        "token": TOKEN,
        "pool_size": 0,
        "cds": False,
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def livy(settings: Settings) -> Iterator[TestClient]:
    """The session service's app (``studio livy``) with its real lifespan, authenticated with the token."""
    from studio.livy.app import create_app

    with TestClient(create_app(settings), base_url=LIVY_BASE, headers=AUTH) as client:
        yield client


@pytest.fixture
def anonymous(settings: Settings) -> Iterator[TestClient]:
    """The same app without credentials (for the gate's answers)."""
    from studio.livy.app import create_app

    with TestClient(create_app(settings), base_url=LIVY_BASE) as client:
        yield client


STUDIO_BASE = "http://127.0.0.1:8890"


@pytest.fixture
def studio(tmp_path: Path) -> Iterator[TestClient]:
    """The workspace server's app (``studio serve``) pointed at a Livy URL where nothing listens, so
    it starts no session service; workspaces are records and folders until one is started."""
    from studio.workspaces.app import create_app

    settings = make_settings(tmp_path, livy_url="http://127.0.0.1:9", compute_timeout=2)
    with TestClient(create_app(settings, STUDIO_BASE), base_url=STUDIO_BASE, headers=AUTH) as client:
        yield client
