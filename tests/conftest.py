"""Fixtures of the whole suite.

The real-process tier shares one warm session service (``warm_service``) among the modules that
need nothing special of it: a Spark driver takes 10-20 s to start here, and every module starting
its own pool paid that again. A module takes it through ``shared_service``, which waits for the
warm workers the module counts on and, at the module's end, deletes the sessions and batches the
module left, so the next module finds the service as this one did. Modules whose tests need their
own settings (limits, timeouts, misbehaving workers, another working folder) start their own.

Every service's drivers use one class-data archive (``class_data_archive``), and the modules start
heaviest first (``pytest_collection_modifyitems``), so that the two test processes end together.
"""

import asyncio
import threading
from collections.abc import Iterator

import pytest

from helpers import CACHE_DIR, DRIVER_JAVA_OPTIONS, ServiceProcess

WARM_POOL = 2  # warm workers of the shared service


@pytest.fixture(scope="session")
def test_root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("studio")
    yield root


def start_service(root, name: str, env: dict[str, str] | None = None, args: list[str] | None = None) -> ServiceProcess:
    return ServiceProcess(root / name, env=env, args=args).start()


@pytest.fixture(scope="session")
def warm_service(test_root) -> Iterator[ServiceProcess]:
    """`studio livy` with a warm pool of ``WARM_POOL`` and default settings, for the whole run."""
    service = start_service(test_root, "warm", env={"STUDIO_POOL_SIZE": str(WARM_POOL), "STUDIO_POOL_WARMUP_SECONDS": "3"})
    yield service
    assert service.stop() == 0
    assert not service.leftovers()


def shared_service(service: ServiceProcess, ready: int = WARM_POOL) -> Iterator[ServiceProcess]:
    """Body of a module-scoped fixture (``yield from shared_service(warm_service)``): ``ready`` warm
    workers first; at the end, the sessions and batches the module left are deleted."""
    service.wait_pool(ready)
    with service.http() as http:
        before = {kind: _ids(http, kind) for kind in ("sessions", "batches")}
    yield service
    with service.http(timeout=60) as http:
        for kind, ids in before.items():
            for item_id in _ids(http, kind) - ids:
                http.delete(f"/{kind}/{item_id}")


@pytest.fixture(scope="module")
def browser():
    """Headless chromium under Playwright, one for the module that asks (see browser_helpers)."""
    pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
    from browser_helpers import chromium

    with chromium() as launched:
        yield launched


@pytest.fixture
def context(browser):
    """A fresh browser context (no cookies) with a laptop's viewport; actions wait up to 60 s."""
    context = browser.new_context(viewport={"width": 1366, "height": 860})
    context.set_default_timeout(60_000)
    yield context
    context.close()


def _ids(http, kind: str) -> set[int]:
    response = http.get(f"/{kind}", params={"size": 10_000})
    assert response.status_code == 200, response.text
    return {item["id"] for item in response.json()["sessions"]}


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind(test_root):
    """Every worker, JVM and batch a test service started must be gone at the end."""
    yield
    from helpers import processes_under

    left = processes_under(test_root)
    assert not left, f"processes left behind: {left}"


# Modules heaviest first (their minutes in a full run on 2 cores, roughly: JVMs to start, timeouts
# to run out), then the rest in their usual order, the fast tier's seconds-long ones filling the end.
# scripts/test.sh deals modules out to two processes (--dist loadfile), each taking the next when it
# is nearly done with its own: a heavy module dealt out last would leave the other process idle for
# its whole length. xdist's own order (most tests first) would deal the heaviest, which have few
# tests, last; pytest_configure turns that off.
HEAVIEST_FIRST = (
    "test_load.py",
    "test_applications.py",
    "test_restart.py",
    "test_executions.py",
    "test_livy_api.py",
    "test_kernel.py",
    "test_batches.py",
    "test_studio_browser.py",
    "test_jobruns.py",
    "test_workspaces_api.py",
    "test_hardening.py",
    "test_run.py",
    "test_livy_access.py",
    "test_standalone_cluster.py",
)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's --loadscope-reorder (on by default)
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: n for n, name in enumerate(HEAVIEST_FIRST)}

    def place(item: pytest.Item) -> int:
        return rank.get(item.path.name, len(rank) + (item.path.parent.name == "fast"))  # the fast tier last

    items.sort(key=place)  # stable: each module's own order stays


@pytest.fixture(scope="session", autouse=True)
def class_data_archive(request: pytest.FixtureRequest) -> Iterator[None]:
    """The class-data archive (AppCDS) every test service's drivers use (helpers.CACHE_DIR), built
    in the background at the start of the first run that starts services, as `studio livy` itself
    would on its first start (but at normal priority: a driver started meanwhile goes without it).
    Kept between runs; the run that builds it waits for the build at its end (a minute or two)."""
    if all(item.path.parent.name == "fast" for item in request.session.items):
        yield
        return
    from studio.config import Settings
    from studio.livy.cds import CdsArchive

    archive = CdsArchive(Settings(cds=True, cache_dir=CACHE_DIR, java_options=DRIVER_JAVA_OPTIONS))
    builder = None
    if archive.enabled and not archive.exists():  # another test process may be building it: then this one's build returns at once
        builder = threading.Thread(target=lambda: asyncio.run(archive.build(nice=0)), name="class-data archive", daemon=True)
        builder.start()
    yield
    if builder is not None:
        builder.join(660)
