"""A workspace's JupyterLab applies its idle timeout itself when no server watches it: the
jupyter_server settings it is started with, and how its log tells that it stopped itself."""

from __future__ import annotations

from pathlib import Path

from studio.workspaces.jupyter import idle_limits, self_shutdown


def test_the_limits_are_the_idle_timeout_plus_two_cull_intervals():
    assert idle_limits(3600, 30) == [
        "--ServerApp.shutdown_no_activity_timeout=3660",
        "--MappingKernelManager.cull_idle_timeout=3660",
        "--MappingKernelManager.cull_interval=30",
        "--MappingKernelManager.cull_connected=False",
        "--MappingKernelManager.cull_busy=False",
    ]
    # Whole seconds, never below the idle timeout; jupyter_server's interval is 1 s at least, 300 s at most.
    assert idle_limits(2.5, 0.5)[:3] == [
        "--ServerApp.shutdown_no_activity_timeout=4",
        "--MappingKernelManager.cull_idle_timeout=4",
        "--MappingKernelManager.cull_interval=1",
    ]
    assert idle_limits(86400, 900)[2] == "--MappingKernelManager.cull_interval=300"


def test_a_workspace_that_never_idles_out_gets_no_limits():
    assert idle_limits(0, 30) == []


def test_the_log_of_the_last_start_tells_a_self_shutdown(tmp_path: Path):
    log = tmp_path / "jupyterlab.log"
    assert self_shutdown(log) is None  # no log
    log.write_text(
        "\n--- 2026-01-01 10:00:00 starting JupyterLab on port 5000\n"
        "[I 2026-01-01 11:01:00.000 ServerApp] No kernels for 3661 seconds; shutting down.\n"
    )
    assert self_shutdown(log) == 3661
    # Started again since: that start's log has not said so (yet).
    with log.open("a") as handle:
        handle.write("\n--- 2026-01-01 12:00:00 starting JupyterLab on port 5001\n[I ServerApp] Jupyter Server is running\n")
    assert self_shutdown(log) is None
