"""OpenID Connect single sign-on for the Studio's browsers (``studio serve`` only).

Configured by the ``oidc_*`` settings (``STUDIO_OIDC_ISSUER``, ``STUDIO_OIDC_CLIENT_ID``, ...).
A browser signs in with the authorization code flow:

1. ``GET /login/oidc?next=/path``: the provider's endpoints come from its discovery document
   (``<issuer>/.well-known/openid-configuration``, whose ``issuer`` must be the configured one).
   The Studio makes a random ``state`` and ``nonce``, keeps them (with ``next``) in a short-lived
   signed cookie, and sends the browser to the provider's authorization endpoint with a PKCE
   challenge (S256). The PKCE verifier is kept nowhere: it is an HMAC of the state under a key
   derived from the studio's token, so the cookie carries nothing a reader could use.
2. ``GET /oauth/callback?code=...&state=...``: the ``state`` must be the one in the cookie (a
   forged or replayed callback is refused); the code is exchanged at the token endpoint with the
   client secret and the PKCE verifier; the ID token's signature is checked against the
   provider's keys (JWKS, fetched again once for an unknown key id) and its ``iss``, ``aud``,
   ``exp``, ``iat`` and ``nonce`` (authlib's ``CodeIDToken`` over ``joserfc``, which authlib's
   own clients use). Claims the ID token lacks (e-mail, groups, user name) are taken from the
   userinfo endpoint when the provider has one, for the same ``sub``.
3. The user is let in when any rule says so: the e-mail's domain is allowed (and the provider did
   not say the address is unverified), the user is in an allowed group, or in the admin group.
   With no rule at all the server refuses to start unless ``oidc_allow_any_user`` says so.
   The user's name is the username claim (``preferred_username``), else the e-mail's local part,
   lower-cased; a name that does not fit the users directory's pattern is refused, never
   rewritten, and so is a name that is a built-in user's or another account's (another e-mail
   address). The user is created or updated in the users directory (with an admin group, the
   role is ``admin`` in it and ``user`` outside it, at every sign-in; without one it stays what
   an administrator set), and the gate sets the Studio's own cookie, tells the audit trail, and
   the browser goes on to ``next`` (a path on this server only).

The client secret is a ``SecretStr`` read only when the code is exchanged: it is never logged,
never put in a page or an API answer. API clients (Livy clients, CI, ``studio run``) do not use
this flow: they send personal tokens. The session service (``studio livy``) has no OIDC routes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import html
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import httpx2
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from studio.errors import StudioError
from studio.paths import is_loopback

if TYPE_CHECKING:
    from studio.config import Settings

log = logging.getLogger("studio.auth.oidc")

START_PATH = "/login/oidc"
CALLBACK_PATH = "/oauth/callback"
FLOW_SECONDS = 600  # a sign-in at the provider must come back within 10 minutes
METADATA_SECONDS = 3600  # discovery document and keys are fetched again after an hour
HTTP_TIMEOUT = 10.0
# Signature algorithms an ID token may use: asymmetric only (never "none", never an HMAC whose key
# would be the client secret, which the keys in the JWKS cannot confuse for a public key).
ASYMMETRIC_ALGS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)
# The name the studio's token holder has; no provider's user may take it.
RESERVED_NAMES = frozenset({"admin"})
# The users directory's names (studio.auth.users): what becomes the Spark user and part of paths.
NAME_PATTERN = re.compile(r"^[a-z_][a-z0-9._-]{0,63}$")


class UserDirectory(Protocol):
    """What single sign-on needs of the users directory (``studio.auth.users.Directory``)."""

    def get_user(self, name: str) -> Any: ...

    def upsert_oidc_user(self, name: str, email: str | None, role: str | None = None) -> Any: ...


class OidcConfigError(ValueError):
    """The ``oidc_*`` settings cannot work; the message says which and why."""


class SignInRefused(Exception):
    """The provider signed someone in whom the Studio does not let in (a page says why)."""

    def __init__(self, message: str, status: int = 403, user: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.user = user


@dataclass(frozen=True)
class OidcConfig:
    issuer: str
    client_id: str
    client_secret: str = field(repr=False)
    scopes: str
    allowed_domains: frozenset[str]
    allowed_groups: frozenset[str]
    admin_group: str
    allow_any_user: bool
    groups_claim: str
    username_claim: str
    provider_name: str
    redirect_url: str

    @classmethod
    def from_settings(cls, settings: "Settings") -> "OidcConfig | None":
        """None when single sign-on is not configured; OidcConfigError when it is, wrongly."""
        issuer = settings.oidc_issuer.strip()
        if not issuer:
            if settings.oidc_client_id or settings.oidc_client_secret is not None:
                raise OidcConfigError("STUDIO_OIDC_CLIENT_ID/SECRET are set but STUDIO_OIDC_ISSUER is not.")
            return None
        issuer_problem = url_problem(issuer, "STUDIO_OIDC_ISSUER")
        if issuer_problem:
            raise OidcConfigError(issuer_problem)
        if not settings.oidc_client_id.strip():
            raise OidcConfigError("STUDIO_OIDC_ISSUER is set but STUDIO_OIDC_CLIENT_ID is not.")
        secret = settings.oidc_client_secret.get_secret_value() if settings.oidc_client_secret is not None else ""
        if not secret:
            raise OidcConfigError(
                "STUDIO_OIDC_CLIENT_SECRET is not set: the Studio is a confidential client and exchanges the code "
                "with its secret."
            )
        domains = frozenset(d.strip().lower().lstrip("@") for d in settings.oidc_allowed_domains if d.strip())
        groups = frozenset(g.strip() for g in settings.oidc_allowed_groups if g.strip())
        admin_group = settings.oidc_admin_group.strip()
        if not domains and not groups and not settings.oidc_allow_any_user:
            raise OidcConfigError(
                "single sign-on would let in everyone the provider signs in: set STUDIO_OIDC_ALLOWED_DOMAINS "
                "and/or STUDIO_OIDC_ALLOWED_GROUPS, or STUDIO_OIDC_ALLOW_ANY_USER=true if that is what you mean."
            )
        redirect = settings.oidc_redirect_url.strip()
        if redirect:
            problem = url_problem(redirect, "STUDIO_OIDC_REDIRECT_URL")
            if problem:
                raise OidcConfigError(problem)
            if urlsplit(redirect).path != CALLBACK_PATH:
                raise OidcConfigError(f"STUDIO_OIDC_REDIRECT_URL must end in {CALLBACK_PATH}, not {redirect}.")
        scopes = settings.oidc_scopes.split()
        if "openid" not in scopes:
            scopes.insert(0, "openid")
        return cls(
            issuer=issuer,
            client_id=settings.oidc_client_id.strip(),
            client_secret=secret,
            scopes=" ".join(scopes),
            allowed_domains=domains,
            allowed_groups=groups,
            admin_group=admin_group,
            allow_any_user=settings.oidc_allow_any_user,
            groups_claim=settings.oidc_groups_claim.strip() or "groups",
            username_claim=settings.oidc_username_claim.strip() or "preferred_username",
            provider_name=settings.oidc_provider_name.strip() or (urlsplit(issuer).hostname or issuer),
            redirect_url=redirect,
        )


def url_problem(url: str, name: str) -> str | None:
    """Why ``url`` is no place to send codes and secrets to: https, or http on a loopback address."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return f"{name} must be an https:// URL, not {url!r}."
    if parts.query or parts.fragment:
        return f"{name} must have no query or fragment: {url!r}."
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        return f"{name} must use https (http only on a loopback address such as 127.0.0.1): {url!r}."
    return None


def login_for(settings: "Settings", secret: str) -> "OidcLogin | None":
    """The sign-in routes for ``studio serve`` (None without single sign-on). The users directory
    of ``settings.identity_dir`` is opened at the first sign-in, and kept for the server's life."""
    config = OidcConfig.from_settings(settings)
    if config is None:
        return None
    return OidcLogin(config, secret, _LazyDirectory(settings))


class _LazyDirectory:
    def __init__(self, settings: "Settings") -> None:
        self.settings = settings
        self._directory: Any = None

    def _open(self) -> Any:
        if self._directory is None:
            from studio.auth.users import Directory

            self._directory = Directory.for_settings(self.settings)
        return self._directory

    def get_user(self, name: str) -> Any:
        return self._open().get_user(name)

    def upsert_oidc_user(self, name: str, email: str | None, role: str | None = None) -> Any:
        return self._open().upsert_oidc_user(name, email, role)


def check_settings(settings: "Settings") -> str | None:
    """The problem with the ``oidc_*`` settings, for ``studio serve`` to refuse to start with, or None."""
    try:
        OidcConfig.from_settings(settings)
    except OidcConfigError as exc:
        return f"single sign-on: {exc}"
    return None


# -- the user's name and the rules ---------------------------------------------------------------


def user_name(claims: dict[str, Any], username_claim: str) -> str:
    """The Studio name for these claims: the username claim, else the e-mail's local part, lower-cased."""
    raw = claims.get(username_claim)
    if not isinstance(raw, str) or not raw.strip():
        email = claims.get("email")
        raw = email.split("@", 1)[0] if isinstance(email, str) and "@" in email else None
    if not raw:
        raise SignInRefused(
            f"The provider sent neither a '{username_claim}' claim nor an e-mail address, so the Studio has no "
            "name for this account.",
        )
    name = raw.strip().lower()
    if "@" in name and username_claim != "email":  # e.g. Azure's preferred_username is an address
        name = name.split("@", 1)[0]
    if not NAME_PATTERN.match(name):
        raise SignInRefused(
            f"The account name {raw!r} does not fit the Studio's user names (a letter or '_', then up to 63 of a-z, "
            "0-9, '.', '_' or '-'). Ask the administrator to set STUDIO_OIDC_USERNAME_CLAIM to a claim that does.",
        )
    if name in RESERVED_NAMES:
        raise SignInRefused(f"The name '{name}' is reserved in the Studio; no single sign-on account may take it.")
    return name


def groups_of(claims: dict[str, Any], groups_claim: str) -> set[str]:
    value = claims.get(groups_claim)
    if isinstance(value, str):
        return {part for part in re.split(r"[,\s]+", value) if part}
    if isinstance(value, list):
        return {str(item) for item in value if isinstance(item, (str, int))}
    return set()


def decide(config: OidcConfig, claims: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(name, e-mail, role) for an allowed user; SignInRefused with the reason otherwise. With an
    admin group the group decides the role at every sign-in; without one the role is left as the
    directory has it (``user`` for a new user, or what an administrator set)."""
    name = user_name(claims, config.username_claim)
    email_claim = claims.get("email")
    email = email_claim.strip() if isinstance(email_claim, str) and "@" in email_claim else None
    groups = groups_of(claims, config.groups_claim)
    is_admin = bool(config.admin_group) and config.admin_group in groups
    domain = email.rsplit("@", 1)[1].lower() if email else None
    # An address the provider says it has not verified proves nothing about its domain.
    verified = claims.get("email_verified") not in (False, "false")
    by_domain = domain is not None and verified and domain in config.allowed_domains
    by_group = bool(groups & config.allowed_groups)
    if not (config.allow_any_user or is_admin or by_domain or by_group):
        rules = []
        if config.allowed_domains:
            rules.append("an e-mail address in " + ", ".join(sorted(config.allowed_domains)))
        if config.allowed_groups:
            rules.append("membership of " + ", ".join(sorted(config.allowed_groups)))
        who = f"{name} ({email})" if email else name
        unverified = " (the provider says the address is not verified)" if email and not verified else ""
        raise SignInRefused(
            f"{who} is not allowed to use this Studio{unverified}: it lets in "
            + " or ".join(rules)
            + ". Ask its administrator for access.",
            user=name,
        )
    return name, email, ("admin" if is_admin else "user") if config.admin_group else None


# -- the flow cookie -------------------------------------------------------------------------------


class FlowSigner:
    """Signs the short-lived flow cookie ({state, nonce, next, exp}) and derives PKCE verifiers."""

    def __init__(self, secret: str) -> None:
        self._key = hmac.new(secret.encode(), b"spark-studio oidc flow v1", hashlib.sha256).digest()
        self._pkce = hmac.new(secret.encode(), b"spark-studio oidc pkce v1", hashlib.sha256).digest()

    def sign(self, data: dict[str, Any]) -> str:
        payload = _b64(json.dumps(data, separators=(",", ":")).encode())
        return f"{payload}.{_b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())}"

    def verify(self, value: str) -> dict[str, Any] | None:
        payload, _, signature = value.partition(".")
        try:
            expected = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
            if not payload or not hmac.compare_digest(_unb64(signature), expected):
                return None
            data = json.loads(_unb64(payload))
        except (ValueError, TypeError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("exp"), int) or data["exp"] < time.time():
            return None
        return data

    def verifier(self, state: str) -> str:
        """The PKCE code verifier of the flow with this state: 43 characters, as RFC 7636 asks."""
        return _b64(hmac.new(self._pkce, state.encode(), hashlib.sha256).digest())


def _key_set(jwks: dict[str, Any]) -> KeySet:
    return KeySet.import_key_set(jwks)  # type: ignore[arg-type]  # a JWKS, checked to hold "keys" when fetched


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- the provider ----------------------------------------------------------------------------------


class ProviderError(Exception):
    """The provider could not be reached or answered something unusable."""


@dataclass
class _Provider:
    metadata: dict[str, Any]
    jwks: dict[str, Any]
    fetched: float


class OidcLogin:
    """The two routes of the flow, for the gate to call (it owns the Studio's cookie)."""

    def __init__(
        self,
        config: OidcConfig,
        secret: str,
        directory: UserDirectory,
    ) -> None:
        self.config = config
        self.signer = FlowSigner(secret)
        self.directory = directory
        self._provider: _Provider | None = None
        self._lock = asyncio.Lock()

    @property
    def button_label(self) -> str:
        return f"Sign in with {self.config.provider_name}"

    def _http(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=False)

    async def provider(self, refresh_keys: bool = False) -> _Provider:
        """The discovery document and keys, fetched at the first sign-in and again after an hour."""
        async with self._lock:
            cached = self._provider
            if cached is not None and time.monotonic() - cached.fetched < METADATA_SECONDS and not refresh_keys:
                return cached
            url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                async with self._http() as http:
                    response = await http.get(url)
                    response.raise_for_status()
                    metadata = response.json()
                    if not isinstance(metadata, dict):
                        raise ProviderError(f"{url} is not a discovery document")
                    issuer = metadata.get("issuer")
                    if not isinstance(issuer, str) or issuer.rstrip("/") != self.config.issuer.rstrip("/"):
                        raise ProviderError(f"the discovery document names the issuer {issuer!r}, not {self.config.issuer!r}")
                    for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                        value = metadata.get(key)
                        problem = url_problem(value, key) if isinstance(value, str) else f"{key} is missing"
                        if problem:
                            raise ProviderError(f"the discovery document is unusable: {problem}")
                    keys = await http.get(metadata["jwks_uri"])
                    keys.raise_for_status()
                    jwks = keys.json()
            except (httpx2.HTTPError, ValueError) as exc:
                raise ProviderError(f"{url}: {exc}") from exc
            if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
                raise ProviderError(f"{metadata['jwks_uri']} is not a JSON Web Key Set")
            self._provider = _Provider(metadata, jwks, time.monotonic())
            return self._provider

    def redirect_uri(self, request: Request) -> str:
        if self.config.redirect_url:
            return self.config.redirect_url
        return f"{request.url.scheme}://{request.url.netloc}{CALLBACK_PATH}"

    def cookie_name(self, request: Request) -> str:
        # Cookies do not tell ports apart: one name per server, as the gate's own cookie.
        server = request.scope.get("server") or ("", 0)
        return f"spark-studio-oidc-{server[1]}"

    # -- GET /login/oidc -----------------------------------------------------------------------

    async def start(self, request: Request, target: str) -> Response:
        try:
            provider = await self.provider()
        except ProviderError as exc:
            log.warning("single sign-on: the provider is unusable: %s", exc)
            return page("The sign-in provider cannot be reached", f"{exc}. Try again later.", 502)
        state, nonce = generate_token(32), generate_token(32)
        async with self._client(request) as client:
            url, _ = client.create_authorization_url(
                provider.metadata["authorization_endpoint"],
                state=state,
                code_verifier=self.signer.verifier(state),
                nonce=nonce,
            )
        response = RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"})
        flow = {"s": state, "n": nonce, "next": target, "exp": int(time.time() + FLOW_SECONDS)}
        response.set_cookie(
            self.cookie_name(request),
            self.signer.sign(flow),
            max_age=FLOW_SECONDS,
            httponly=True,
            # Lax, not Strict (the Studio's own cookie is Strict): the provider sends the browser back
            # to /oauth/callback from its own site, as a top-level GET navigation; a Strict cookie is
            # not sent with such a request and the state could never be checked. Lax sends it with a
            # top-level GET only, never with a cross-site POST, image or fetch; the cookie lives ten
            # minutes, is sent only to the callback path, and is good for one sign-in.
            samesite="lax",
            secure=request.url.scheme == "https",
            path=CALLBACK_PATH,
        )
        return response

    def _client(self, request: Request) -> AsyncOAuth2Client:
        provider = self._provider
        methods = (provider.metadata.get("token_endpoint_auth_methods_supported") if provider else None) or [
            "client_secret_basic"
        ]
        method = "client_secret_basic" if "client_secret_basic" in methods else "client_secret_post"
        return AsyncOAuth2Client(
            client_id=self.config.client_id,
            client_secret=self.config.client_secret,
            token_endpoint_auth_method=method,
            scope=self.config.scopes,
            redirect_uri=self.redirect_uri(request),
            code_challenge_method="S256",
            timeout=HTTP_TIMEOUT,
        )

    # -- GET /oauth/callback -------------------------------------------------------------------

    async def callback(self, request: Request, directory: UserDirectory | None = None) -> tuple[Response, str | None, str]:
        """(response, the signed-in user or None, the name the provider's account was given or "").
        The gate sets its cookie on the response for the user and tells the audit trail; the flow
        cookie is dropped either way. ``directory``: the users' directory the gate already holds."""
        client_address = request.client.host if request.client else "?"
        try:
            name, target = await self._sign_in(request, directory or self.directory)
        except SignInRefused as exc:
            log.warning("single sign-on refused from %s: %s", client_address, exc.message)
            response = page("Sign-in refused", exc.message, exc.status)
            self._drop_flow(request, response)
            return response, None, exc.user or ""
        log.info("single sign-on: %s signed in from %s", name, client_address)
        # A page that moves on by itself rather than a redirect: this request came from the provider's
        # site, and browsers do not send the Studio's SameSite=Strict cookie along a redirect chain
        # that began on another site; a navigation from this page is same-site.
        response = moving_on(target)
        self._drop_flow(request, response)
        return response, name, name

    def _drop_flow(self, request: Request, response: Response) -> None:
        response.delete_cookie(self.cookie_name(request), path=CALLBACK_PATH, httponly=True, samesite="lax")

    async def _sign_in(self, request: Request, directory: UserDirectory) -> tuple[str, str]:
        params = request.query_params
        cookie = request.cookies.get(self.cookie_name(request))
        flow = self.signer.verify(cookie) if cookie else None
        state = params.get("state", "")
        if flow is None or not state or not hmac.compare_digest(str(flow.get("s", "")), state):
            # No flow cookie (expired, another browser, cookies off) or another state: a forged callback,
            # a replayed one, or a second sign-in started in another tab since.
            raise SignInRefused(
                "This sign-in cannot be completed: its state does not match a sign-in started in this browser in "
                "the last ten minutes. Start again from the sign-in page.",
                status=400,
            )
        target = str(flow.get("next") or "/")
        if params.get("error"):
            description = params.get("error_description") or ""
            raise SignInRefused(
                f"The provider did not sign you in: {params['error']}" + (f" ({description})" if description else "") + ".",
            )
        code = params.get("code")
        if not code:
            raise SignInRefused("The provider sent no authorization code.", status=400)
        claims = await self._claims(request, code, state, str(flow.get("n", "")))
        name, email, role = decide(self.config, claims)
        await asyncio.to_thread(self._enter, directory, name, email, role)
        return name, target

    @staticmethod
    def _enter(directory: UserDirectory, name: str, email: str | None, role: str | None) -> None:
        """Create or update the user, unless the name is someone else's: a built-in user (with a
        password and tokens of its own), or a single sign-on user with another e-mail address (two
        accounts whose names fold to the same Studio name, e.g. the same local part in two domains)."""
        existing = directory.get_user(name)
        if existing is not None and getattr(existing, "source", "oidc") != "oidc":
            raise SignInRefused(
                f"The Studio already has a built-in user '{name}', so single sign-on does not sign in as it. An "
                "administrator can remove that user (studio users remove) to let the single sign-on account take the name.",
                user=name,
            )
        known = getattr(existing, "email", None) if existing is not None else None
        if known and email and known.lower() != email.lower():
            raise SignInRefused(
                f"The Studio name '{name}' belongs to another single sign-on account ({known}), not to {email}.",
                user=name,
            )
        try:
            directory.upsert_oidc_user(name, email, role)
        except StudioError as exc:
            raise SignInRefused(f"{name} cannot sign in by single sign-on: {exc.msg}", user=name) from exc

    async def _claims(self, request: Request, code: str, state: str, nonce: str) -> dict[str, Any]:
        try:
            provider = await self.provider()
            async with self._client(request) as client:
                token = await client.fetch_token(
                    provider.metadata["token_endpoint"],
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=self.signer.verifier(state),
                )
        except ProviderError as exc:
            raise SignInRefused(f"The sign-in provider cannot be reached: {exc}", status=502) from exc
        except (OAuthError, httpx2.HTTPError, ValueError) as exc:
            log.warning("single sign-on: the code exchange failed: %s", exc)
            raise SignInRefused(f"The provider refused the sign-in code: {exc}", status=502) from exc
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise SignInRefused("The provider sent no ID token (is 'openid' among its scopes?).", status=502)
        claims = await self._verified(id_token, token.get("access_token"), nonce)
        missing = [c for c in ("email", self.config.groups_claim, self.config.username_claim) if c not in claims]
        userinfo_url = provider.metadata.get("userinfo_endpoint")
        if missing and isinstance(userinfo_url, str) and isinstance(token.get("access_token"), str):
            claims = {**await self._userinfo(userinfo_url, token["access_token"], claims["sub"]), **claims}
        return claims

    async def _verified(self, id_token: str, access_token: Any, nonce: str) -> dict[str, Any]:
        provider = await self.provider()
        offered = provider.metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = [alg for alg in offered if alg in ASYMMETRIC_ALGS] or ["RS256"]
        registry = JWSRegistry(algorithms=algorithms, strict_check_header=False)
        try:
            try:
                decoded = jwt.decode(id_token, _key_set(provider.jwks), registry=registry)
            except InvalidKeyIdError:  # the provider rotated its keys since they were fetched
                provider = await self.provider(refresh_keys=True)
                decoded = jwt.decode(id_token, _key_set(provider.jwks), registry=registry)
            params: dict[str, Any] = {"nonce": nonce, "client_id": self.config.client_id}
            if isinstance(access_token, str):
                params["access_token"] = access_token
            claims = CodeIDToken(
                decoded.claims,
                decoded.header,
                {
                    "iss": {"essential": True, "value": provider.metadata["issuer"]},
                    "aud": {"essential": True, "value": self.config.client_id},
                    "exp": {"essential": True},
                    "nonce": {"essential": True, "value": nonce},
                },
                params,
            )
            claims.validate(leeway=60)
        except (JoseError, ValueError) as exc:
            log.warning("single sign-on: an ID token was refused: %s", exc)
            raise SignInRefused(f"The provider's ID token is not valid for this Studio: {exc}", status=400) from exc
        return dict(claims)

    async def _userinfo(self, url: str, access_token: str, sub: str) -> dict[str, Any]:
        try:
            async with self._http() as http:
                response = await http.get(url, headers={"Authorization": f"Bearer {access_token}"})
                response.raise_for_status()
                info = response.json()
        except (httpx2.HTTPError, ValueError) as exc:
            log.warning("single sign-on: userinfo failed: %s", exc)
            return {}
        if not isinstance(info, dict) or info.get("sub") != sub:  # OIDC Core 5.3.2: same subject or ignored
            return {}
        return info


# -- pages -----------------------------------------------------------------------------------------

_STYLE = """body{font-family:system-ui,sans-serif;background:#f5f6f8;margin:0;display:flex;min-height:100vh;
align-items:center;justify-content:center}main{background:#fff;padding:28px 32px;border-radius:8px;
box-shadow:0 1px 4px #0002;width:min(520px,90vw)}h1{font-size:20px;margin:0 0 10px}p{color:#333;font-size:15px}"""


def page(title: str, message: str, status: int) -> HTMLResponse:
    """A plain page saying what went wrong, with the way back to the sign-in page."""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} · Spark Studio</title>
<style>{_STYLE}</style></head>
<body><main><h1>{html.escape(title)}</h1><p class="error" role="alert">{html.escape(message)}</p>
<p><a href="/login">Back to the sign-in page</a></p></main></body></html>
"""
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


def moving_on(target: str) -> HTMLResponse:
    quoted = html.escape(target, quote=True)
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="0;url={quoted}">
<title>Signed in · Spark Studio</title><style>{_STYLE}</style></head>
<body><main><h1>Signed in</h1><p><a href="{quoted}">Continue to the Studio</a></p></main></body></html>
"""
    return HTMLResponse(body, headers={"Cache-Control": "no-store"})
