"""Single sign-on's own logic (studio.auth.oidc): the settings it refuses, the Studio name it
makes of a provider's claims, who it lets in and with which role, and the signed flow cookie.
The flow against a real provider and a real `studio serve` is tests/test_oidc.py."""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient

from studio.auth.oidc import FlowSigner, OidcConfig, OidcConfigError, SignInRefused, check_settings, decide, user_name

from .conftest import LIVY_BASE, make_settings

SECRET = "client-secret-that-must-not-leak"


def oidc_settings(tmp_path, **overrides):
    values = {
        "oidc_issuer": "https://id.example.com/realms/studio",
        "oidc_client_id": "spark-studio",
        "oidc_client_secret": SECRET,
        "oidc_allowed_domains": "example.com, Example.ORG",
        **overrides,
    }
    return make_settings(tmp_path, **values)


def config(tmp_path, **overrides) -> OidcConfig:
    found = OidcConfig.from_settings(oidc_settings(tmp_path, **overrides))
    assert found is not None
    return found


# -- settings --------------------------------------------------------------------------------------


def test_not_configured_is_none_and_a_complete_configuration_reads_back(tmp_path):
    assert OidcConfig.from_settings(make_settings(tmp_path)) is None
    found = config(tmp_path, oidc_scopes="email profile", oidc_allowed_groups='["data", "ml"]')
    assert found.allowed_domains == {"example.com", "example.org"}
    assert found.allowed_groups == {"data", "ml"}
    assert found.scopes == "openid email profile"  # openid is always asked
    assert found.provider_name == "id.example.com"
    assert SECRET not in repr(found)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"oidc_issuer": "http://id.example.com"}, "must use https (http only on a loopback address"),
        ({"oidc_issuer": "ftp://id.example.com"}, "must be an https:// URL"),
        ({"oidc_issuer": "https://id.example.com/?x=1"}, "no query or fragment"),
        ({"oidc_client_id": ""}, "STUDIO_OIDC_CLIENT_ID is not"),
        ({"oidc_client_secret": None}, "STUDIO_OIDC_CLIENT_SECRET is not set"),
        ({"oidc_issuer": "", "oidc_client_id": "x"}, "STUDIO_OIDC_ISSUER is not"),
        ({"oidc_allowed_domains": ""}, "STUDIO_OIDC_ALLOW_ANY_USER=true if that is what you mean"),
        ({"oidc_redirect_url": "https://studio.example.com/callback"}, "must end in /oauth/callback"),
        ({"oidc_redirect_url": "http://studio.example.com/oauth/callback"}, "STUDIO_OIDC_REDIRECT_URL must use https"),
    ],
)
def test_settings_that_cannot_work_are_refused_in_one_line(tmp_path, overrides, message):
    settings = oidc_settings(tmp_path, **overrides)
    with pytest.raises(OidcConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        OidcConfig.from_settings(settings)
    problem = check_settings(settings)
    assert problem is not None and problem.startswith("single sign-on: ") and "\n" not in problem
    assert SECRET not in problem


def test_loopback_http_issuer_and_an_explicit_any_user_are_allowed(tmp_path):
    assert check_settings(oidc_settings(tmp_path, oidc_issuer="http://127.0.0.1:9400")) is None
    assert check_settings(oidc_settings(tmp_path, oidc_issuer="http://localhost:9400/")) is None
    open_to_all = config(tmp_path, oidc_allowed_domains="", oidc_allow_any_user=True)
    assert decide(open_to_all, {"sub": "1", "email": "someone@anywhere.test"})[0] == "someone"


def test_the_secret_is_not_in_the_settings_repr(tmp_path):
    assert SECRET not in repr(oidc_settings(tmp_path))
    assert SECRET not in str(oidc_settings(tmp_path).model_dump())


# -- the Studio name -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "name"),
    [
        ({"preferred_username": "Alice.Smith", "email": "a@example.com"}, "alice.smith"),
        ({"email": "Bob_Jones@example.com"}, "bob_jones"),  # no username claim: the e-mail's local part
        ({"preferred_username": "  ", "email": "carol@example.com"}, "carol"),
        ({"preferred_username": "dave@corp.example.com"}, "dave"),  # an address as user name (Azure)
    ],
)
def test_the_studio_name_comes_from_the_username_claim_or_the_email(claims, name):
    assert user_name(claims, "preferred_username") == name


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"preferred_username": "Eve Smith"}, "does not fit the Studio's user names"),
        ({"preferred_username": "../etc"}, "does not fit"),
        ({"preferred_username": "x" * 65}, "does not fit"),
        ({"preferred_username": "Admin"}, "'admin' is reserved"),
        ({"sub": "123"}, "neither a 'preferred_username' claim nor an e-mail address"),
    ],
)
def test_a_name_that_does_not_fit_is_refused_never_rewritten(claims, reason):
    with pytest.raises(SignInRefused, match=reason):
        user_name(claims, "preferred_username")


def test_another_username_claim(tmp_path):
    found = config(tmp_path, oidc_username_claim="nickname")
    assert decide(found, {"nickname": "frank", "preferred_username": "f.x", "email": "f@example.com"})[0] == "frank"


# -- who is let in, and as what ----------------------------------------------------------------------


def test_allowed_by_domain_group_or_admin_group(tmp_path):
    found = config(tmp_path, oidc_allowed_groups="data", oidc_admin_group="studio-admins")
    assert decide(found, {"preferred_username": "alice", "email": "alice@EXAMPLE.com"}) == ("alice", "alice@EXAMPLE.com", "user")
    assert decide(found, {"preferred_username": "bob", "email": "bob@partner.test", "groups": ["data"]})[2] == "user"
    assert decide(found, {"preferred_username": "root", "email": "r@partner.test", "groups": ["studio-admins"]})[2] == "admin"
    # a groups claim sent as one string
    assert decide(found, {"preferred_username": "ann", "groups": "x data"})[0] == "ann"
    with pytest.raises(SignInRefused) as refused:
        decide(found, {"preferred_username": "mallory", "email": "mallory@evil.test", "groups": ["other"]})
    assert refused.value.status == 403 and refused.value.user == "mallory"
    assert "mallory (mallory@evil.test) is not allowed to use this Studio" in refused.value.message
    assert "an e-mail address in example.com, example.org or membership of data" in refused.value.message


def test_an_unverified_address_proves_nothing_about_its_domain(tmp_path):
    found = config(tmp_path)
    with pytest.raises(SignInRefused, match="not verified"):
        decide(found, {"preferred_username": "eve", "email": "eve@example.com", "email_verified": False})
    assert decide(found, {"preferred_username": "eve", "email": "eve@example.com", "email_verified": True})[0] == "eve"


def test_without_an_admin_group_the_role_is_left_to_the_directory(tmp_path):
    assert decide(config(tmp_path), {"preferred_username": "alice", "email": "alice@example.com"})[2] is None


# -- the flow cookie and PKCE ------------------------------------------------------------------------


def test_the_flow_cookie_is_signed_and_short_lived():
    signer = FlowSigner("the studio's token")
    flow = {"s": "state", "n": "nonce", "next": "/", "exp": int(time.time() + 60)}
    value = signer.sign(flow)
    assert signer.verify(value) == flow
    assert FlowSigner("another token").verify(value) is None
    payload, _, signature = value.partition(".")
    assert signer.verify(payload[:-2] + "xx." + signature) is None
    assert signer.verify("garbage") is None and signer.verify("") is None
    assert signer.verify(signer.sign({"s": "state", "exp": int(time.time() - 1)})) is None


def test_the_pkce_verifier_is_derived_from_the_state_and_the_key():
    signer = FlowSigner("the studio's token")
    verifier = signer.verifier("state-1")
    assert len(verifier) == 43 and verifier == signer.verifier("state-1")  # RFC 7636: 43 to 128 characters
    assert verifier != signer.verifier("state-2")
    assert verifier != FlowSigner("another token").verifier("state-1")


# -- the gate's wiring (both real apps, no provider needed) -------------------------------------------


def studio_app(tmp_path, **overrides):
    from studio.workspaces.app import create_app

    from .conftest import STUDIO_BASE

    settings = make_settings(tmp_path, livy_url="http://127.0.0.1:9", compute_timeout=2, **overrides)
    return TestClient(create_app(settings, STUDIO_BASE), base_url=STUDIO_BASE)


def test_without_single_sign_on_its_paths_are_closed_and_the_page_has_no_button(tmp_path):
    with studio_app(tmp_path) as anonymous:
        assert "class=\"sso\"" not in anonymous.get("/login").text
        assert anonymous.get("/login/oidc", headers={"Accept": "application/json"}).status_code == 401
        assert anonymous.get("/oauth/callback?code=x&state=y", headers={"Accept": "application/json"}).status_code == 401


def test_with_single_sign_on_the_page_offers_it_and_the_callback_checks_the_state_first(tmp_path):
    sso = {
        "oidc_issuer": "https://id.example.invalid/realms/studio",  # never reached: the state is checked first
        "oidc_client_id": "spark-studio",
        "oidc_client_secret": SECRET,
        "oidc_allowed_domains": "example.com",
        "oidc_provider_name": "ACME <SSO>",
    }
    with studio_app(tmp_path, **sso) as anonymous:
        page = anonymous.get("/login", params={"next": "/api/workspaces"})
        assert '<a class="sso" href="/login/oidc?next=%2Fapi%2Fworkspaces"' in page.text
        assert "Sign in with ACME &lt;SSO&gt;</a>" in page.text
        assert SECRET not in page.text
        forged = anonymous.get("/oauth/callback", params={"code": "x", "state": "forged"})
        assert forged.status_code == 400 and "its state does not match" in forged.text
        assert not [name for name in anonymous.cookies if not name.startswith("spark-studio-oidc-")]
        assert anonymous.get("/api/workspaces", headers={"Accept": "application/json"}).status_code == 401
    # The session service has no single sign-on, configured or not: API clients use personal tokens.
    from studio.livy.app import create_app

    with TestClient(create_app(make_settings(tmp_path, **sso)), base_url=LIVY_BASE) as livy:
        assert livy.get("/login/oidc", headers={"Accept": "application/json"}).status_code == 401
        assert "class=\"sso\"" not in livy.get("/login").text
