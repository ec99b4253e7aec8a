import pytest

from helpers import ServiceProcess


@pytest.fixture(scope="session")
def test_root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("studio")
    yield root


def start_service(root, name: str, env: dict[str, str] | None = None, args: list[str] | None = None) -> ServiceProcess:
    return ServiceProcess(root / name, env=env, args=args).start()


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind(test_root):
    """Every worker, JVM and batch a test service started must be gone at the end."""
    yield
    from helpers import processes_under

    left = processes_under(test_root)
    assert not left, f"processes left behind: {left}"
