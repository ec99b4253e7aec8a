"""The gate in front of both web servers (``studio serve`` and ``studio livy``).

Every request passes the same checks, in this order, before any route sees it:

1. **Host.** The ``Host`` header must name this server: a loopback name or address, the address
   it is bound to, or a name the operator allows (``STUDIO_ALLOWED_HOSTS``). A page on an
   attacker's domain that re-resolves to 127.0.0.1 (DNS rebinding) is refused.
2. **Open routes.** Only ``GET /version``, ``GET /health`` and the login page answer without
   credentials.
3. **No cross-site requests.** A request that changes something (any method but GET, HEAD and
   OPTIONS) is refused when its ``Origin`` is another origin or ``null``, or when the browser
   says ``Sec-Fetch-Site: cross-site``/``same-site`` (another port on 127.0.0.1 is same-site but
   another origin). POST, PUT and PATCH must also say ``Content-Type: application/json`` (or
   carry Livy's ``X-Requested-By``): a web page can send a cross-site form or ``text/plain``
   POST without asking, but not a JSON one. A DELETE needs no body, as Livy's clients send it.
   These checks apply also when the request carries a valid cookie or HTTP Basic credentials
   (which browsers remember and send by themselves); only a request that carries a Bearer token
   in its ``Authorization`` header, which no page can make a browser add, may skip the JSON rule.
4. **Authentication**, against the studio's token and the users' directory
   (``studio.auth.users``, shared by both servers and looked up again on every request):

   * ``Authorization: Bearer <token>`` (also Jupyter's ``token <token>``): the studio's token is
     the built-in ``admin``; a personal, kernel or execution token is its user (unexpired, not
     revoked, the user still there).
   * HTTP Basic (sparkmagic's ``Basic_Access``, the ``livy`` client's ``auth=``, ``curl -u``):
     ``<user>:<password>``, or ``<user>:<token of that user>`` (the name must be the token's);
     with the studio's token as the password it is ``admin`` whatever the name (as before users).
   * The browser's session cookie (``HttpOnly``, ``SameSite=Strict``, signed with a key derived
     from the studio's token), which a browser gets from the sign-in form (user name and password;
     ``admin`` with the studio's token), from single sign-on, or by opening a URL with
     ``?token=<studio token>``. It names a user, who is looked up on every request: a removed
     user is signed out at once and a changed role applies at the next request.

   Without them: 401 with ``WWW-Authenticate`` and a Livy-shaped ``{"msg"}``; a browser
   navigating to a page is sent to the sign-in page instead. Every browser sign-in, failed
   sign-in and sign-out is told to ``on_sign_in`` (the audit trail connects it).

The authenticated ``Principal`` is ``request.user`` (``scope["user"]``); the owner of what a
request creates comes from it, never from a header the client chooses. A principal may be
restricted to some routes (a workspace's kernels may only ask for their own compute).
"""

from __future__ import annotations

import asyncio
import html
import logging
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from starlette.authentication import BaseUser
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from studio.auth.tokens import TOKEN_PREFIX, CookieSigner, same_secret
from studio.paths import is_loopback

if TYPE_CHECKING:
    from pathlib import Path

    from studio.auth.users import Directory
    from studio.auth.oidc import OidcLogin
    from studio.config import Settings

log = logging.getLogger("studio.auth")

ADMIN = "admin"  # the name of whoever holds the studio's token
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/version", "/health"})
LOGIN_PATH = "/login"
LOGOUT_PATH = "/logout"
OIDC_START_PATH = "/login/oidc"  # = studio.auth.oidc.START_PATH, CALLBACK_PATH (not imported: authlib stays out of studio livy)
OIDC_CALLBACK_PATH = "/oauth/callback"
MAX_LOGIN_BODY = 16 * 1024
# Headers every response gets unless the route set its own: no framing (clickjacking), no MIME
# sniffing, and no Referer to another site that could carry a ?token= URL ("same-origin", not
# "no-referrer": under no-referrer browsers send `Origin: null` with the page's own forms).
SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)


@dataclass(frozen=True)
class Principal(BaseUser):
    """Who a request acts for. ``routes``: the only (method, path) pairs it may use, when restricted."""

    name: str
    kind: str = "token"
    routes: frozenset[tuple[str, str]] | None = None
    role: str = "admin"  # "admin" (every object, users, computes) or "user" (its own and what is shared with it)
    scope: str | None = None  # a kernel or execution token's scope ("workspace:7", "execution:3")

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def display_name(self) -> str:
        return self.name

    @property
    def identity(self) -> str:
        return self.name

    def may(self, method: str, path: str) -> bool:
        return self.routes is None or (method, path) in self.routes


# Extra bearer credentials an app recognises besides the studio's token (a workspace's kernels).
TokenLookup = Callable[[str], "Principal | None"]
# Told of every browser sign-in: on_sign_in(user, client, outcome, method, scope=scope) with outcome
# "ok", "failed" or "signed-out" and method "password", "token" (a personal one), "studio-token",
# "token-url", "oidc" or "logout". ``user`` is the name that was given ("" when none). It must not
# raise (an error is logged and the sign-in goes on) and must not block for long.
SignInHook = Callable[..., None]


@dataclass
class GateSettings:
    """What the gate needs to know; built by each app from its Settings."""

    token: str
    realm: str  # "Spark Studio" or "Spark Studio session service"
    bound_host: str
    allowed_hosts: list[str] = field(default_factory=list)
    auth_enabled: bool = True
    cookie_max_age: float = 7 * 86400
    basic_challenge: bool = False  # the Livy service also invites HTTP Basic, as Livy's LDAP mode does
    extra_tokens: TokenLookup | None = None
    identity_dir: "Path | None" = None  # the users' directory (studio.auth.users); None: the studio's token only
    on_sign_in: SignInHook | None = None
    oidc: "OidcLogin | None" = None  # single sign-on (studio serve only): GET /login/oidc and /oauth/callback are open


def host_names(bound_host: str, allowed: list[str]) -> tuple[set[str], bool]:
    """(names besides loopback ones that may appear in Host, whether any name may)."""
    if "*" in allowed:
        return set(), True
    names = {name.strip().lower() for name in allowed if name.strip()}
    bound = bound_host.strip("[]").lower()
    if bound in ("0.0.0.0", "::", ""):  # noqa: S104 - recognises such a bind, binds nothing
        # Bound to every address: this machine's names and addresses are its names.
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        try:
            names |= {str(info[4][0]).lower() for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
    else:
        names.add(bound)
    return names, False


class Gate:
    """ASGI middleware: Host, cross-site and authentication checks (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: GateSettings) -> None:
        self.app = app
        self.settings = settings
        self.signer = CookieSigner(settings.token)
        self.hosts, self.any_host = host_names(settings.bound_host, settings.allowed_hosts)
        self.on_sign_in: SignInHook | None = settings.on_sign_in
        self._directory: Directory | None = None

    @property
    def directory(self) -> "Directory | None":
        """The users' directory, opened at the app's start (or at the first request that needs it)."""
        if self._directory is None and self.settings.identity_dir is not None and self.settings.auth_enabled:
            from studio.auth.users import Directory

            self._directory = Directory(self.settings.identity_dir)
        return self._directory

    async def lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Open the users' directory with the app (a file it cannot open stops the start) and close it after."""
        _ = self.directory

        async def closing(message: Message) -> None:
            await send(message)
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed") and self._directory:
                self._directory.close()
                self._directory = None

        await self.app(scope, receive, closing)

    # -- the checks ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(scope, receive, send)
            return
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        send = _with_security_headers(send)
        headers = Headers(scope=scope)
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        path = scope["path"]
        host = headers.get("host", "")

        problem = self.host_problem(host)
        if problem:
            await _refuse(403, problem, scope, receive, send)
            return
        if method in ("GET", "HEAD") and path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if method not in SAFE_METHODS:
            problem = self.cross_site_problem(headers, host)
            if problem:
                await _refuse(403, problem, scope, receive, send)
                return
        if path == LOGIN_PATH:
            await self.login(scope, receive, send, method)
            return
        if path == LOGOUT_PATH and method == "POST":
            await self.logout(scope, receive, send)
            return
        if self.settings.oidc is not None and method == "GET" and path in (OIDC_START_PATH, OIDC_CALLBACK_PATH):
            await self.single_sign_on(scope, receive, send, path)
            return
        if method not in SAFE_METHODS and scope["type"] == "http" and not _bearer(headers):
            problem = content_type_problem(method, headers)
            if problem:
                await _refuse(415, problem, scope, receive, send)
                return

        principal = await self.authenticate(scope, headers)
        if principal is None:
            token = _query_token(scope) if method in ("GET", "HEAD") else None
            if token is not None and self.is_token(token):
                # A ready-to-click URL with ?token=: trade it for a cookie and drop it from the URL.
                response = RedirectResponse(_url_without_token(scope), status_code=303)
                self.set_cookie(response, scope, ADMIN)
                self.signed_in(scope, ADMIN, "ok", "token-url")
                await response(scope, receive, send)
                return
            if token is not None:
                self.signed_in(scope, "", "failed", "token-url")
            await self.unauthenticated(scope, receive, send, headers, method, token is not None)
            return
        if not principal.may(method, path):
            await _refuse(403, f"This credential may not use {method} {path}.", scope, receive, send)
            return
        scope["user"] = principal
        await self.app(scope, receive, send)

    def host_problem(self, host: str) -> str | None:
        if self.any_host:
            return None
        if not host:
            return "The request has no Host header."
        name = (urlsplit(f"//{host}").hostname or "").lower()
        if is_loopback(name) or name in self.hosts:
            return None
        return (
            f"Host '{host}' is not a name of this server; open it at http://127.0.0.1 or add the name to "
            "STUDIO_ALLOWED_HOSTS."
        )

    @staticmethod
    def cross_site_problem(headers: Headers, host: str) -> str | None:
        origin = headers.get("origin")
        if origin is not None:
            if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
                return f"Cross-origin request from {origin} refused."
        fetch_site = headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return f"Cross-site request refused (Sec-Fetch-Site: {fetch_site})."
        return None

    async def authenticate(self, scope: Scope, headers: Headers) -> Principal | None:
        if not self.settings.auth_enabled:
            return Principal(ADMIN, kind="unauthenticated")
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        scheme, credential = scheme.lower(), credential.strip()
        if scheme in ("bearer", "token") and credential:
            return self.principal_for(credential)
        if scheme == "basic" and credential:
            pair = _basic_credentials(credential)
            return await self.basic_principal(*pair) if pair is not None else None
        cookie = _cookies(headers).get(self.cookie_name(scope))
        if cookie:
            user = self.signer.verify(cookie)
            if user is not None:
                return self.cookie_principal(user)
        return None

    def principal_for(self, secret: str) -> Principal | None:
        """A bearer secret: the studio's token (admin), a token of the users' directory, or one the app knows."""
        if self.is_token(secret):
            return Principal(ADMIN)
        directory = self.directory
        if directory is not None and secret.startswith(TOKEN_PREFIX):
            found = directory.principal_for_token(secret)
            if found is not None:
                return found
        if self.settings.extra_tokens is not None:
            return self.settings.extra_tokens(secret)
        return None

    async def basic_principal(
        self, user: str, password: str, *, kinds: frozenset[str] | None = None, studio_token: bool = True
    ) -> Principal | None:
        """HTTP Basic (and the sign-in form): the studio's token (unless ``studio_token`` is False), a
        token of this user, or this user's password. ``kinds``: the token kinds accepted (default: all)."""
        if studio_token and self.is_token(password.strip()):
            return Principal(ADMIN)  # the bootstrap credential, whatever name comes with it
        directory = self.directory
        name = user.strip().lower()
        if directory is not None and password.startswith(TOKEN_PREFIX):
            found = directory.principal_for_token(password)
            if found is not None:
                if found.name != name or (kinds is not None and found.kind not in kinds):
                    return None  # a token of someone else (or of another kind) is no password
                return found
        if self.settings.extra_tokens is not None and kinds is None:
            found = self.settings.extra_tokens(password)
            if found is not None:
                return found
        if directory is None or not name or name == ADMIN:
            return None
        # argon2 takes tens of milliseconds on purpose: off the event loop
        known = await asyncio.to_thread(directory.check_password, name, password)
        return Principal(known.name, kind="password", role=known.role) if known is not None else None

    def cookie_principal(self, name: str) -> Principal | None:
        """The user a valid cookie names, as the directory has it now (removed: nobody)."""
        directory = self.directory
        if directory is None:
            return Principal(ADMIN, kind="cookie") if name == ADMIN else None
        user = directory.get_user(name)
        if user is None:
            return None
        return Principal(user.name, kind="cookie", role=user.role)

    def signed_in(self, scope: Scope, user: str, outcome: str, method: str) -> None:
        """Tell ``on_sign_in`` (the audit trail) about a browser sign-in, a failed one or a sign-out."""
        hook = self.on_sign_in
        if hook is None:
            return
        client = str((scope.get("client") or ("?",))[0])
        try:
            hook(user, client, outcome, method, scope=scope)
        except Exception:  # noqa: BLE001 - the sign-in is decided; its record is the hook's business
            log.exception("on_sign_in failed for %s (%s, %s)", user or "-", outcome, method)

    def is_token(self, secret: str) -> bool:
        return same_secret(secret, self.settings.token)

    # -- answers ------------------------------------------------------------------------------

    async def unauthenticated(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers, method: str, bad_token: bool
    ) -> None:
        if method == "GET" and _wants_page(headers):
            target = LOGIN_PATH + "?" + urlencode({"next": _local_target(scope["path"], scope.get("query_string", b""))})
            if bad_token:
                target += "&failed=1"
            await RedirectResponse(target, status_code=303)(scope, receive, send)
            return
        given = "authorization" in headers or bad_token
        message = (
            "Authentication failed: the credential is not valid for this server."
            if given
            else "Authentication required: send a personal token (or the studio's token) as 'Authorization: Bearer "
            "<token>', or a user name with its password or personal token as HTTP Basic."
        )
        challenges = [f'Bearer realm="{self.settings.realm}"']
        if self.settings.basic_challenge:
            challenges.insert(0, f'Basic realm="{self.settings.realm}", charset="UTF-8"')
        response = JSONResponse({"msg": message}, status_code=401)
        for challenge in challenges:
            response.headers.append("WWW-Authenticate", challenge)
        await response(scope, receive, send)

    def cookie_name(self, scope: Scope) -> str:
        # Cookies do not tell ports apart, and every server here lives on 127.0.0.1: one name each.
        server = scope.get("server") or ("", 0)
        return f"spark-studio-{server[1]}"

    def set_cookie(self, response: Response, scope: Scope, user: str) -> None:
        response.set_cookie(
            self.cookie_name(scope),
            self.signer.sign(user, self.settings.cookie_max_age),
            max_age=int(self.settings.cookie_max_age),
            httponly=True,
            samesite="strict",
            secure=scope.get("scheme") == "https",
            path="/",
        )

    async def login(self, scope: Scope, receive: Receive, send: Send, method: str) -> None:
        """GET shows the form; POST (a same-origin form) checks the user name and password (or a
        personal token of that user; ``admin``: the studio's token) and sets the cookie."""
        request = Request(scope, receive)
        target = _safe_next(request.query_params.get("next", "/"))
        if method in ("GET", "HEAD"):
            failed = request.query_params.get("failed") == "1"
            await login_page(self.settings.realm, target, failed, single_sign_on=self.sso_label)(scope, receive, send)
            return
        if method != "POST":
            await _refuse(405, f"Method {method} is not allowed on {LOGIN_PATH}", scope, receive, send)
            return
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY:
                await _refuse(413, "The login form is too large.", scope, receive, send)
                return
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        target = _safe_next(form.get("next", target))
        user = form.get("user", "").strip()
        secret = form.get("password") or form.get("token", "")
        principal = None
        if not user or user.lower() == ADMIN:
            principal = Principal(ADMIN) if self.is_token(secret.strip()) else None
        if principal is None and user:
            # a password, or a personal token of this user (never a kernel's or a notebook run's)
            principal = await self.basic_principal(user, secret, kinds=frozenset({"personal"}), studio_token=False)
        how = "studio-token" if principal is not None and principal.kind == "token" else (
            "token" if secret.startswith(TOKEN_PREFIX) else "password"
        )
        if principal is None:
            self.signed_in(scope, user, "failed", how)
            # The typed name goes to the log only when it is a user's: a name field can hold a
            # password or a token pasted into the wrong box.
            known = user.lower() == ADMIN or (self.directory is not None and self.directory.get_user(user.lower()) is not None)
            log.warning("failed sign-in%s from %s", f" as {user.lower()!r}" if user and known else "", (scope.get("client") or ("?",))[0])
            await asyncio.sleep(0.2)  # a little friction for guessing (the token itself is 256 random bits)
            await login_page(self.settings.realm, target, failed=True, status_code=401, single_sign_on=self.sso_label)(
                scope, receive, send
            )
            return
        response = RedirectResponse(target, status_code=303)
        self.set_cookie(response, scope, principal.name)
        self.signed_in(scope, principal.name, "ok", how)
        await response(scope, receive, send)

    @property
    def sso_label(self) -> str:
        """The sign-in page's "Sign in with <provider>" when single sign-on is configured, else empty."""
        return self.settings.oidc.button_label if self.settings.oidc is not None else ""

    async def single_sign_on(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        """``GET /login/oidc?next=``: off to the provider; ``GET /oauth/callback``: back, checked
        (studio.auth.oidc), and signed in with the Studio's own cookie for the user it names."""
        oidc = self.settings.oidc
        assert oidc is not None
        request = Request(scope, receive)
        if path == OIDC_START_PATH:
            response = await oidc.start(request, _safe_next(request.query_params.get("next", "/")))
        else:
            response, user, attempted = await oidc.callback(request, self.directory)
            if user is not None:
                self.set_cookie(response, scope, user)
            self.signed_in(scope, user or attempted, "ok" if user is not None else "failed", "oidc")
        await response(scope, receive, send)

    async def logout(self, scope: Scope, receive: Receive, send: Send) -> None:
        cookie = _cookies(Headers(scope=scope)).get(self.cookie_name(scope))
        user = self.signer.verify(cookie) if cookie else None
        if user is not None:
            self.signed_in(scope, user, "signed-out", "logout")
        response = RedirectResponse(LOGIN_PATH, status_code=303)
        response.delete_cookie(self.cookie_name(scope), path="/", httponly=True, samesite="strict")
        await response(scope, receive, send)


# -- helpers ----------------------------------------------------------------------------------------


def content_type_problem(method: str, headers: Headers) -> str | None:
    """Why an unsafe request's body could have come from a cross-site form, or None."""
    if headers.get("x-requested-by"):
        return None  # Livy's CSRF convention: a custom header no cross-site page can add unasked
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    is_json = media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
    if method == "DELETE":
        has_body = headers.get("transfer-encoding") or headers.get("content-length", "0") not in ("", "0")
        if not has_body or is_json:
            return None
        return "A DELETE body must be JSON (Content-Type: application/json), or send none."
    if is_json:
        return None
    return (
        f"{method} requests must send Content-Type: application/json (an empty JSON object is fine)"
        + (f", not {media}" if media else "")
        + "; Livy clients may send X-Requested-By instead."
    )


def _bearer(headers: Headers) -> bool:
    """The request carries a token in ``Authorization`` itself. A browser never adds one on its own
    (unlike cookies and remembered HTTP Basic), so such a request cannot be a cross-site forgery
    and needs no JSON content type (``curl -X POST -H 'Authorization: Bearer …' …/start`` works)."""
    scheme = headers.get("authorization", "").partition(" ")[0].lower()
    return scheme in ("bearer", "token")


def _basic_credentials(credential: str) -> tuple[str, str] | None:
    """(user name, password) of an HTTP Basic credential, or None when it is not one."""
    import base64
    import binascii

    try:
        decoded = base64.b64decode(credential, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def _cookies(headers: Headers) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in headers.get("cookie", "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name not in found:
            found[name] = value.strip().strip('"')
    return found


def _query_token(scope: Scope) -> str | None:
    for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
        if name == "token":
            return value
    return None


def _url_without_token(scope: Scope) -> str:
    query = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True) if k != "token"]
    return quote(scope["path"]) + ("?" + urlencode(query) if query else "")


def _local_target(path: str, query: bytes) -> str:
    pairs = [(k, v) for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True) if k != "token"]
    return path + ("?" + urlencode(pairs) if pairs else "")


def _safe_next(target: str) -> str:
    """Only a path on this server: no scheme, no other host, no ``//host`` (open redirects)."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _wants_page(headers: Headers) -> bool:
    """A browser navigating (not a script or a Livy client): it asks for HTML."""
    mode = headers.get("sec-fetch-mode")
    if mode is not None:
        return mode == "navigate"
    accept = headers.get("accept", "")
    return "text/html" in accept and "application/json" not in accept.split(",")[0]


async def _refuse(status: int, message: str, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    await JSONResponse({"msg": message}, status_code=status)(scope, receive, send)


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            present = {name.lower() for name, _ in message.get("headers", [])}
            extra = [(name, value) for name, value in SECURITY_HEADERS if name not in present]
            if extra:
                message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


def login_page(
    realm: str, target: str, failed: bool = False, status_code: int = 200, single_sign_on: str = ""
) -> HTMLResponse:
    """A self-contained sign-in form (no script, no external asset); ``single_sign_on`` is the label
    of a link to the provider's sign-in (``GET /login/oidc?next=``), shown first when configured."""
    error = (
        '<p class="error" role="alert">That user name and password (or token) are not valid for this server.</p>'
        if failed
        else ""
    )
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · {html.escape(realm)}</title>
<style>
body{{font-family:system-ui,sans-serif;background:#f5f6f8;margin:0;display:flex;min-height:100vh;align-items:center;justify-content:center}}
form{{background:#fff;padding:28px 32px;border-radius:8px;box-shadow:0 1px 4px #0002;width:min(420px,90vw)}}
h1{{font-size:20px;margin:0 0 6px}} p{{color:#555;font-size:14px}} label{{display:block;font-size:14px;margin:14px 0 6px}}
input[type=password],input[type=text]{{width:100%;box-sizing:border-box;padding:8px;font-size:15px;border:1px solid #bbb;border-radius:4px}}
button{{margin-top:16px;padding:8px 18px;font-size:15px;background:#2f6fd8;color:#fff;border:0;border-radius:4px;cursor:pointer}}
.error{{color:#b00020}} code{{background:#eef;padding:1px 4px;border-radius:3px}}
</style></head>
<body><form method="post" action="{LOGIN_PATH}">
<h1>{html.escape(realm)}</h1>
{_sso_link(single_sign_on, target)}
<p>Use your user name and password. The administrator <code>admin</code> signs in with the
studio's token (leave the user name empty): it is in the URL the server printed when it started, and in
the file <code>token</code> of its state directory.</p>
{error}
<label for="user">User name</label>
<input id="user" name="user" type="text" autocomplete="username" autocapitalize="none" spellcheck="false" maxlength="64" autofocus>
<label for="token">Password or token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<input type="hidden" name="next" value="{html.escape(target)}">
<button type="submit">Sign in</button>
</form></body></html>
"""
    return HTMLResponse(body, status_code=status_code, headers={"Cache-Control": "no-store"})


def _sso_link(label: str, target: str) -> str:
    if not label:
        return ""
    href = OIDC_START_PATH + "?" + urlencode({"next": target})
    return (
        f'<p><a class="sso" href="{html.escape(href)}" style="display:block;text-align:center;padding:9px;'
        f'background:#2f6fd8;color:#fff;border-radius:4px;text-decoration:none;font-size:15px">{html.escape(label)}</a></p>'
        '<p style="text-align:center">or</p>'
    )


def settings_token(settings: "Settings") -> str:
    """The studio's token for these settings: STUDIO_TOKEN, else the one kept in the state directory."""
    from studio.auth.tokens import load_or_create_token

    configured = settings.token.get_secret_value() if settings.token is not None else None
    return load_or_create_token(settings.state_dir, configured)


def gate(
    app: ASGIApp,
    settings: "Settings",
    *,
    realm: str,
    bound_host: str,
    basic_challenge: bool = False,
    extra_tokens: TokenLookup | None = None,
    on_sign_in: SignInHook | None = None,
    oidc: "OidcLogin | None" = None,
) -> Gate:
    """Put ``app`` behind the gate configured from the studio's settings."""
    return Gate(
        app,
        GateSettings(
            token=settings_token(settings),
            realm=realm,
            bound_host=bound_host,
            allowed_hosts=list(settings.allowed_hosts),
            auth_enabled=not settings.insecure_no_auth,
            cookie_max_age=settings.session_cookie_days * 86400,
            basic_challenge=basic_challenge,
            extra_tokens=extra_tokens,
            identity_dir=settings.identity_dir,
            on_sign_in=on_sign_in,
            oidc=oidc,
        ),
    )
