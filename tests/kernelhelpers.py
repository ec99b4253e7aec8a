"""Driving the PySpark kernel through jupyter_client, as JupyterLab and nbclient do."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from helpers import TEST_TOKEN
from studio.kernel.install import write_kernelspec


@dataclass
class Result:
    reply: dict[str, Any]
    outputs: list[dict[str, Any]] = field(default_factory=list)  # iopub messages: {"msg_type", "content", "at" (seconds in)}
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return self.reply["status"]

    @property
    def stdout(self) -> str:
        return "".join(o["content"]["text"] for o in self.outputs if o["msg_type"] == "stream" and o["content"]["name"] == "stdout")

    @property
    def error(self) -> dict[str, Any] | None:
        return next((o["content"] for o in self.outputs if o["msg_type"] == "error"), None)

    def data(self, mime: str) -> list[Any]:
        return [
            o["content"]["data"][mime]
            for o in self.outputs
            if o["msg_type"] in ("display_data", "execute_result", "update_display_data") and mime in o["content"]["data"]
        ]

    def text(self) -> str:
        """Everything a reader would see as text: streams and text/plain of displays."""
        parts = [self.stdout] + [str(t) for t in self.data("text/plain")]
        if self.error:
            parts.append(f"{self.error['ename']}: {self.error['evalue']}")
        return "\n".join(parts)


class Kernel:
    """A running PySpark kernel with its own kernelspec folder and environment."""

    def __init__(self, folder: Path, env: dict[str, str], cwd: Path | None = None) -> None:
        write_kernelspec(folder / "jupyter")
        self.env = {**os.environ, "JUPYTER_PATH": str(folder / "jupyter"), "STUDIO_LIVY_TOKEN": TEST_TOKEN, **env}
        # The kernelspec is looked up in this process, so it must come from the folder written
        # here, never from whatever `pyspark` kernelspec the machine happens to have installed.
        specs = KernelSpecManager(kernel_dirs=[str(folder / "jupyter" / "kernels")])
        self.manager = KernelManager(kernel_name="pyspark", kernel_spec_manager=specs)
        self.manager.start_kernel(env=self.env, cwd=str(cwd or folder))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 300.0, interrupt_after: float | None = None) -> Result:
        started = time.monotonic()
        msg_id = self.client.execute(code)
        interrupted = False
        outputs = []
        while True:
            remaining = timeout - (time.monotonic() - started)
            if interrupt_after is not None and not interrupted and time.monotonic() - started > interrupt_after:
                self.manager.interrupt_kernel()
                interrupted = True
            wait = 0.1 if interrupt_after is not None and not interrupted else max(0.1, remaining)
            try:
                message = self.client.get_iopub_msg(timeout=wait)
            except Exception:  # noqa: BLE001 - queue.Empty
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"cell did not finish in {timeout}s: {code[:80]!r}") from None
                continue
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "status":
                if message["content"]["execution_state"] == "idle":
                    break
                continue
            outputs.append({"msg_type": message["msg_type"], "content": message["content"], "at": time.monotonic() - started})
        reply = self.client.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.client.get_shell_msg(timeout=30)
        return Result(reply["content"], outputs, time.monotonic() - started)

    def ok(self, code: str, **kwargs: Any) -> Result:
        result = self.run(code, **kwargs)
        assert result.status == "ok", result.text()
        return result

    def request(self, method: str, *args: Any) -> dict[str, Any]:
        msg_id = getattr(self.client, method)(*args)
        reply = self.client.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.client.get_shell_msg(timeout=30)
        return reply["content"]

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)
