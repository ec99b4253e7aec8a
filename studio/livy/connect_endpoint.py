"""The Spark Connect endpoint: any Connect client reaches its user's shared driver with the studio's credentials.

A gRPC server on 127.0.0.1 (``STUDIO_CONNECT_PORT``) that knows no Spark Connect message: one
generic handler takes every method of ``spark.connect.SparkConnectService`` as a stream-stream
call of raw bytes (gRPC frames unary and streaming calls alike, so one shape carries all of them)
and forwards it to the caller's own driver (``studio.livy.connect_drivers``):

* who: the ``authorization: Bearer <secret>`` metadata (what pyspark sends for ``;token=``) goes to
  ``authenticate`` (the service passes ``Gate.principal_for``: the studio's token, a personal
  token); none or an unknown one is UNAUTHENTICATED, before anything else happens;
* which application: the ``x-studio-application`` metadata (pyspark sends every connection-string
  parameter it does not know as metadata, so ``sc://host:port/;token=T;x-studio-application=NAME``),
  default the default application; an unknown one is NOT_FOUND, a DEDICATED one (sessions with a
  driver of their own, nothing to share) FAILED_PRECONDITION;
* forwarded: ``drivers.ensure(application, principal.identity)`` (started on demand, which the
  first call waits for), the caller's metadata without its credentials, and the driver's own
  token in their place. The caller never learns the driver's token or port.

Nothing is buffered: responses of ExecutePlan are passed on as they come, AddArtifacts' chunks
as the client sends them, with gRPC's flow control on both legs. A cancelled client call cancels
the forwarded one; a driver's error comes back with its code, message and rich details
(``grpc-status-details-bin``, which pyspark turns into its exceptions) unchanged.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable

import grpc  # type: ignore[import-untyped, unused-ignore]
import grpc.aio  # type: ignore[import-untyped, unused-ignore]

from studio.config import Settings
from studio.errors import NotFoundError, StudioError
from studio.livy.connect_drivers import CHANNEL_OPTIONS, SERVICE, ConnectDrivers

if TYPE_CHECKING:
    from studio.auth.gate import Principal
    from studio.livy.applications import Application

log = logging.getLogger("studio.livy.connect_endpoint")

APPLICATION_KEY = "x-studio-application"
# Request metadata that is not the caller's to pass on: its credentials, our own routing key, and what
# gRPC itself owns (pseudo-headers, grpc-*, the user agent it sets on the forwarded call).
_NOT_FORWARDED = frozenset({"authorization", APPLICATION_KEY, "user-agent", "te", "content-type"})
_STATUS_DETAILS = "grpc-status-details-bin"

Authenticate = Callable[[str], "Principal | None"]
ApplicationFor = Callable[[str | None], "Application | Awaitable[Application]"]


def _forwarded(metadata: Iterable[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    kept = []
    for key, value in metadata or ():
        name = key.lower()
        if name in _NOT_FORWARDED or name.startswith(":") or (name.startswith("grpc-") and name != _STATUS_DETAILS):
            continue
        kept.append((key, value))
    return kept


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, secret = value.strip().partition(" ")
            if scheme.lower() == "bearer" and secret.strip():
                return secret.strip()
    return None


def _value(metadata: Iterable[tuple[str, Any]] | None, wanted: str) -> str | None:
    for key, value in metadata or ():
        if key.lower() == wanted and isinstance(value, str) and value.strip():
            return value.strip()
    return None


def is_shared(app: Any) -> bool:
    shared = getattr(app, "shared", None)
    if shared is not None:
        return bool(shared)
    return getattr(getattr(app, "definition", None), "driverMode", "DEDICATED") == "SHARED"


class _Handler:
    """A grpc generic handler (gRPC asks only for ``service``): every Spark Connect method, forwarded."""

    def __init__(self, endpoint: "ConnectEndpoint") -> None:
        self.endpoint = endpoint

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = str(handler_call_details.method)
        if not method.startswith(f"/{SERVICE}/"):
            return None  # UNIMPLEMENTED: only Spark Connect passes

        async def forward(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            async for response in self.endpoint.forward(method, requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(forward)  # no (de)serializers: raw bytes both ways


class ConnectEndpoint:
    def __init__(
        self,
        settings: Settings,
        drivers: ConnectDrivers,
        authenticate: Authenticate,
        application_for: ApplicationFor,
    ) -> None:
        self.settings = settings
        self.drivers = drivers
        self.authenticate = authenticate
        self.application_for = application_for
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self, port: int | None = None) -> int:
        """Listen on 127.0.0.1 (``port``, else ``settings.connect_port``; 0: a free one); the bound port."""
        wanted = int(getattr(self.settings, "connect_port", 15002)) if port is None else port
        if wanted < 0:
            raise ValueError("the Spark Connect endpoint is turned off (STUDIO_CONNECT_PORT=-1)")
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        server.add_generic_rpc_handlers((_Handler(self),))
        # Local credentials: plaintext as pyspark's client speaks it to localhost with a token, and only
        # from this machine's own addresses whatever the binding.
        bound = server.add_secure_port(f"127.0.0.1:{wanted}", grpc.local_server_credentials(grpc.LocalConnectionType.LOCAL_TCP))
        await server.start()
        self._server, self.port = server, bound
        log.info("Spark Connect endpoint on sc://localhost:%d", bound)
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace=2.0)

    async def _application(self, name: str | None) -> Any:
        found = self.application_for(name)
        return await found if inspect.isawaitable(found) else found

    async def forward(self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        metadata = list(context.invocation_metadata() or ())
        secret = bearer(metadata)
        # ``authenticate`` sees a missing token too (as ""): a service without authentication lets everyone in.
        principal = await asyncio.to_thread(self.authenticate, secret or "")
        if principal is None and secret is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "Spark Studio needs a token: connect with sc://localhost:PORT/;token=<your personal token>.",
            )
        if principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Spark Studio does not know this token (expired or revoked?).")
        name = _value(metadata, APPLICATION_KEY)
        try:
            app = await self._application(name)
        except NotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, exc.msg)
        except StudioError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.msg)
        if not is_shared(app):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Application {app.name} runs each session on a driver of its own (driverMode DEDICATED); "
                "Spark Connect reaches shared drivers only: use an application with driverMode SHARED, "
                "or this one through its Livy endpoint.",
            )
        if not getattr(app, "accepts_work", True):
            state = getattr(getattr(app, "state", None), "value", "stopped")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"Application {app.name} is {state}; start it first.")
        user = principal.identity  # type: ignore[union-attr]
        try:
            driver = await self.drivers.ensure(app, user)
        except StudioError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"Your Spark driver could not start: {exc.msg}")
        forwarded = [*_forwarded(metadata), ("authorization", f"Bearer {driver.token()}")]

        async def upstream() -> AsyncIterator[bytes]:
            async for request in requests:
                yield request

        with driver.in_use():
            call = driver.channel().stream_stream(method)(upstream(), metadata=forwarded, timeout=context.time_remaining())
            try:
                initial = _forwarded(await call.initial_metadata())
                if initial:
                    await context.send_initial_metadata(initial)
                async for response in call:
                    yield response
                trailing = _forwarded(await call.trailing_metadata())
                if trailing:
                    context.set_trailing_metadata(trailing)
            except grpc.aio.AioRpcError as exc:
                # The driver's own answer, unchanged: pyspark checks the rich details against code and message.
                await context.abort(exc.code(), exc.details() or "", tuple(_forwarded(exc.trailing_metadata())))
            finally:
                call.cancel()  # nothing when it ended; the forwarded call when the client went away
