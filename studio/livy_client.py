"""A small Livy client on httpx (no Livy client library, no ``requests``): the one the kernel,
``studio run`` and ``studio bench`` use. It lives outside ``studio.kernel`` so that those two
import it without the kernel, and it stays light (httpx and the credentials only): the kernel
imports it at start-up, which counts in a notebook's first result.

Every call goes through ``map_livy_errors``, so callers see one ``LivyError`` that names the
method, URL, status and the server's ``msg``. Against Spark Studio's own service the client
long-polls statements (``?wait=``); against any other Livy it polls with a short backoff.

A service restarts (an upgrade, a crash) and its sessions survive it, so with
``reconnect_timeout`` set (the kernel sets it while it has a session) a call that cannot reach
the service is tried again for that long, if repeating it is harmless: GETs, DELETE, cancel,
and statement submits, which carry an ``Idempotency-Key`` so that one whose answer was lost
runs once.
"""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from typing import Any, Callable, Iterator

import httpx

from studio.auth.credentials import authorization as auth_header
from studio.auth.credentials import credentials_for

FINAL_STATEMENT_STATES = ("available", "cancelled", "error")
FINAL_SESSION_STATES = ("dead", "error", "killed", "success")


class LivyError(Exception):
    """A failed call to the session service."""

    def __init__(
        self, message: str, *, method: str = "", url: str = "", status: int | None = None, transport: bool = False
    ) -> None:
        super().__init__(message)
        self.method = method
        self.url = url
        self.status = status
        self.transport = transport  # no answer at all (refused, reset): the service may be restarting


@contextlib.contextmanager
def map_livy_errors(method: str, url: str) -> Iterator[None]:
    """Translate transport and HTTP failures into LivyError (httpx's choke-point pattern)."""
    try:
        yield
    except httpx.ConnectError as exc:
        raise LivyError(
            f"Cannot reach the Spark session service at {url}: {exc}.", method=method, url=url, transport=True
        ) from None
    except httpx.TimeoutException as exc:
        raise LivyError(f"The Spark session service at {url} did not answer in time ({exc}).", method=method, url=url) from None
    except httpx.TransportError as exc:  # the connection broke before an answer (a server that stopped)
        raise LivyError(f"{method} {url} failed: {exc}", method=method, url=url, transport=True) from None
    except httpx.HTTPError as exc:
        raise LivyError(f"{method} {url} failed: {exc}", method=method, url=url) from None


_FIND = object()  # LivyClient's default: find the credentials for the URL (studio.auth.credentials)


class LivyClient:
    def __init__(self, url: str, timeout: float = 30.0, authorization: Any = _FIND) -> None:
        """``authorization``: the Authorization header to send; by default found for ``url`` (see
        ``studio.auth.credentials``); None sends none."""
        self.url = url.rstrip("/")
        if authorization is _FIND:
            authorization = auth_header(*credentials_for(self.url))
        self.authorization: str | None = authorization
        self.timeout = timeout
        self.reconnect_timeout = 0.0  # seconds to retry repeatable calls the service does not answer
        self.on_reconnect: Callable[[str], None] | None = None  # told when it starts and stops retrying
        # Asked while retrying: where the service is now (a workspace's compute may have moved when the
        # Studio restarted), as (url, authorization), or None to keep trying here.
        self.relocate: Callable[[], tuple[str, str | None] | None] | None = None
        self.http = self._client()
        self._studio: bool | None = None

    def _client(self) -> httpx.Client:
        # TCP_NODELAY: httpx writes a POST's headers and body apart, and Nagle's algorithm would
        # hold the body for the server's delayed ACK (~40 ms per statement).
        # Certificates are loaded only for an https:// service: building a verifying SSL context
        # costs ~0.1-0.2 s, a large part of a notebook's first Spark result, and a plain http://
        # service never uses it.
        transport = httpx.HTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            verify=self.url.lower().startswith("https://"),
        )
        return httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(self.timeout, connect=5.0),
            transport=transport,
            headers={
                "X-Requested-By": "spark-studio-kernel",
                **({"Authorization": self.authorization} if self.authorization else {}),
            },
        )

    def close(self) -> None:
        self.http.close()

    # -- plumbing ---------------------------------------------------------------------------

    def request(
        self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201), retry: bool | None = None, **kwargs: Any
    ) -> Any:
        """One call; ``retry`` (default: for GET and DELETE) says repeating it is harmless, so it is
        tried again for ``reconnect_timeout`` seconds while the service does not answer."""
        repeatable = method in ("GET", "DELETE") if retry is None else retry
        response = self._send(method, path, repeatable, kwargs)
        url = self.url + path
        if response.status_code not in ok:
            try:
                message = response.json().get("msg") or response.text
            except ValueError:
                message = response.text.strip() or response.reason_phrase
            raise LivyError(f"{message}", method=method, url=url, status=response.status_code)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.content

    def _send(self, method: str, path: str, repeatable: bool, kwargs: dict[str, Any]) -> httpx.Response:
        deadline: float | None = None
        delay = 0.1
        next_relocate = 0.0
        while True:
            try:
                with map_livy_errors(method, self.url + path):
                    response = self.http.request(method, path, **kwargs)
            except LivyError as exc:
                if not (exc.transport and repeatable and self.reconnect_timeout > 0):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.reconnect_timeout
                    next_relocate = now + 3.0
                    self._tell(
                        f"The Spark session service at {self.url} does not answer; it may be restarting. "
                        f"Trying again for up to {self.reconnect_timeout:.0f} s."
                    )
                if now >= deadline:
                    raise LivyError(
                        f"{exc} It did not come back within {self.reconnect_timeout:.0f} s.",
                        method=method,
                        url=exc.url,
                        transport=True,
                    ) from None
                if self.relocate is not None and now >= next_relocate:
                    next_relocate = now + 5.0
                    self._move(self.relocate())
                time.sleep(delay)
                delay = min(1.0, delay * 1.5)
                continue
            if deadline is not None:
                self._tell(f"The Spark session service at {self.url} answers again.")
            return response

    def _tell(self, text: str) -> None:
        if self.on_reconnect is not None:
            try:
                self.on_reconnect(text)
            except Exception:  # noqa: BLE001, S110 - telling must never break the call
                pass

    def _move(self, where: tuple[str, str | None] | None) -> None:
        """Point this client at ``where`` (url, authorization) if that is somewhere else."""
        if where is None:
            return
        url, authorization = where[0].rstrip("/"), where[1]
        if url == self.url and authorization == self.authorization:
            return
        self._tell(f"The Spark session service moved to {url}.")
        self.http.close()
        self.url, self.authorization = url, authorization
        self.http = self._client()

    @property
    def is_studio(self) -> bool:
        """True when the server is Spark Studio's session service (it long-polls statements)."""
        if self._studio is None:
            try:
                version = self.request("GET", "/version")
            except LivyError:
                return False  # unknown for now (not reachable yet): asked again next time
            self._studio = "spark-studio" in str(version.get("revision", ""))
        return self._studio

    def whoami(self) -> str | None:
        """Who the service takes this client for (the ``owner`` of its sessions); None when it cannot say."""
        if not self.is_studio:
            return None
        try:
            return str(self.request("GET", "/studio/whoami").get("user"))
        except LivyError:
            return None

    # -- sessions ---------------------------------------------------------------------------

    def create_session(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/sessions", json=body)

    def get_session(self, session_id: int | str) -> dict[str, Any]:
        """By id, or by name (our service and Livy 0.7+ look a session up by its name too)."""
        return self.request("GET", f"/sessions/{session_id}")

    def check_session(self, body: dict[str, Any]) -> bool:
        """Whether the service accepts ``body`` for POST /sessions, asked without starting anything
        (Spark Studio's ``POST /studio/sessions/check``). True: accepted; False: this service cannot
        check (a plain Livy); LivyError with status 400 and the reason: refused."""
        if not self.is_studio:
            return False
        try:
            self.request("POST", "/studio/sessions/check", json=body, ok=(200,))
        except LivyError as exc:
            if exc.status in (404, 405, 501):  # a service from before the check existed
                return False
            raise
        return True

    def list_sessions(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/sessions", params={"size": 1000}).get("sessions", []))

    def delete_session(self, session_id: int | str) -> None:
        self.request("DELETE", f"/sessions/{session_id}", ok=(200, 404))

    def log(self, session_id: int, size: int = 1000) -> list[str]:
        return list(self.request("GET", f"/sessions/{session_id}/log", params={"size": size}).get("log", []))

    def wait_for_session(self, session_id: int, timeout: float, on_wait: Any = None) -> dict[str, Any]:
        """Poll until the session is idle; raise LivyError if it ends or the timeout passes."""
        started = time.monotonic()
        delay = 0.05
        while True:
            session = self.get_session(session_id)
            state = session["state"]
            if state == "idle":
                return session
            if state in FINAL_SESSION_STATES:
                raise LivyError(f"Session {session_id} is {state}.", status=None)
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                raise LivyError(f"Session {session_id} did not become idle in {timeout:.0f}s (it is {state}).")
            if on_wait is not None:
                on_wait(session, elapsed)
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)

    # -- statements -------------------------------------------------------------------------

    def submit(self, session_id: int, code: str, kind: str | None = None, wait: float = 0.0) -> dict[str, Any]:
        """A new statement; with Spark Studio's service and ``wait``, the answer waits up to that many
        seconds for it to finish (one request for a quick statement)."""
        body: dict[str, Any] = {"code": code}
        if kind:
            body["kind"] = kind
        params = {"wait": wait} if wait and self.is_studio else None
        # The key makes a submit that is sent again (its answer was lost in a restart) run once. Only
        # Spark Studio's service knows it, so only there is the submit repeated.
        studio = bool(self.reconnect_timeout) and self.is_studio
        headers = {"Idempotency-Key": uuid.uuid4().hex} if studio else {}
        return self.request(
            "POST", f"/sessions/{session_id}/statements", json=body, params=params, headers=headers, retry=studio
        )

    def statement(
        self, session_id: int, statement_id: int, wait: float = 0.0, stream: int | None = None, detail: bool = True
    ) -> dict[str, Any]:
        """The statement; with Spark Studio's service, wait up to ``wait`` seconds for it to finish,
        and with ``stream`` (a character offset) also for what it prints from there on, which comes
        back as ``stream`` and ends the wait as soon as there is some. ``detail`` adds its Spark jobs."""
        params: dict[str, Any] = {"detail": 1} if detail else {}
        if wait and self.is_studio:
            params["wait"] = wait
        if stream is not None and self.is_studio:
            params["stream"] = stream
        return self.request("GET", f"/sessions/{session_id}/statements/{statement_id}", params=params)

    def cancel(self, session_id: int, statement_id: int) -> None:
        self.request("POST", f"/sessions/{session_id}/statements/{statement_id}/cancel", json={}, retry=True)

    def describe_session(self, session_id: int) -> dict[str, Any] | None:
        """Spark Studio's view of a session (``GET /studio/sessions/{id}``): why it ended, how long an
        idle one has left; None from any other Livy, or when it cannot say."""
        if not self.is_studio:
            return None
        try:
            return dict(self.request("GET", f"/studio/sessions/{session_id}", retry=False))
        except LivyError:
            return None

    def arrow(self, session_id: int, statement_id: int) -> bytes:
        url = f"/sessions/{session_id}/statements/{statement_id}/arrow"
        with map_livy_errors("GET", self.url + url):
            response = self.http.get(url, timeout=600)
        if response.status_code != 200:
            raise LivyError(response.text, method="GET", url=self.url + url, status=response.status_code)
        return response.content

    def completion(self, session_id: int, code: str, cursor: int) -> list[str]:
        reply = self.request(
            "POST", f"/sessions/{session_id}/completion", json={"code": code, "kind": "pyspark", "cursor": cursor}, timeout=5
        )
        return list(reply.get("candidates", []))

    def inspect(self, session_id: int, code: str, cursor: int, detail_level: int) -> dict[str, Any]:
        return self.request(
            "POST",
            f"/sessions/{session_id}/inspect",
            json={"code": code, "cursor": cursor, "detail_level": detail_level},
            timeout=5,
        )
