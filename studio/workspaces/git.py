"""Cloning a workspace's repository, and what a clone URL may be.

* Only ``https://`` and ssh (``ssh://``, or scp-like ``[user@]host:path``) repositories by
  default; local paths and ``file://`` only when the operator allows them
  (``STUDIO_GIT_ALLOW_LOCAL``), since they read whatever the server's user can read. git itself is
  held to the same list (``GIT_ALLOW_PROTOCOL``, ``protocol.file.allow=never``), so a redirect or a
  transport helper (``ext::``) cannot widen it. Plain ``http://`` and ``git://`` are refused: they
  carry code without integrity.
* Credentials in a URL (``https://user:secret@host/repo.git``) are taken out of it: the URL without
  them is what is stored, returned, logged and written into the clone's ``.git/config``; the
  secret reaches git through a credential helper that reads it from git's environment (never its
  command line, which ``ps`` shows to every user) and answers only for the URL's own host.
* A clone has a time budget (``STUDIO_GIT_CLONE_TIMEOUT``) and a size budget
  (``STUDIO_GIT_CLONE_MAX_BYTES``); a clone over either is killed and its folder removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from studio.auth.credentials import without_secrets
from studio.config import Settings
from studio.errors import InvalidRequestError, StudioError
from studio.process import ChildProcess
from studio.urls import split_credentials

REMOTE_SCHEMES = {"https": "https", "ssh": "ssh", "git+ssh": "ssh", "ssh+git": "ssh"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TRANSPORT_HELPER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")
# scp-like ssh: [user@]host:path, with no slash before the first colon (git's own rule)
_SCP_LIKE = re.compile(r"^(?:(?P<user>[^@/:\s]+)@)?(?P<host>[^@/:\s]+):(?P<path>.*)$")
SIZE_CHECK_INTERVAL = 0.25

# Answers `git credential fill` for the URL's own host only, from the environment: the secret is
# on no command line, and a redirect to another host gets nothing.
CREDENTIAL_HELPER = (
    '!f() { test "$1" = get || return 0; p=; h=; '
    "while IFS= read -r line && test -n \"$line\"; do case \"$line\" in "
    'protocol=*) p="${line#protocol=}";; host=*) h="${line#host=}";; esac; done; '
    'test "$p" = https && test "$h" = "$STUDIO_GIT_HOST" || return 0; '
    "printf 'username=%s\\npassword=%s\\n' \"$STUDIO_GIT_USERNAME\" \"$STUDIO_GIT_PASSWORD\"; }; f"
)


@dataclass(frozen=True)
class GitSource:
    """A repository to clone: ``url`` (safe to store and show) and, apart, its credentials."""

    url: str
    kind: str  # "https", "ssh" or "local"
    username: str | None = field(default=None, repr=False)  # kept out of any repr, log or traceback
    password: str | None = field(default=None, repr=False)

    def scrub(self, text: str) -> str:
        """``text`` with the credentials taken out, should anything echo them."""
        for secret in (self.password, self.username if self.kind == "https" else None):
            if secret:
                text = text.replace(secret, "***")
        return text


def check_repository_url(text: str, allow_local: bool) -> GitSource:
    """The repository a workspace may clone, or InvalidRequestError saying why not."""
    raw = text.strip()
    if not raw:
        raise InvalidRequestError("Repository URL is empty.")
    if any(ord(char) < 0x20 or char == "\x7f" for char in raw):
        raise InvalidRequestError("Repository URL contains control characters.")
    shown, user, password = split_credentials(raw)
    scheme_match = _SCHEME.match(raw)
    if scheme_match:
        scheme = scheme_match.group(1).lower()
        parts = urlsplit(shown)
        if scheme == "file":
            if not allow_local:
                raise _local_refused(shown)
            return GitSource(shown, "local")
        if scheme not in REMOTE_SCHEMES:
            hint = " Use https:// instead." if scheme in ("http", "git") else ""
            raise InvalidRequestError(
                f"Repository URL '{shown}' uses {scheme}://; workspaces clone https:// and ssh repositories only.{hint}"
            )
        if not parts.hostname or parts.hostname.startswith("-"):
            raise InvalidRequestError(f"Repository URL '{shown}' has no valid host.")
        username = unquote(user) if user else None
        secret = unquote(password) if password else None
        if any(value and ("\n" in value or "\0" in value) for value in (username, secret)):
            raise InvalidRequestError("Repository URL credentials contain a line break.")
        if REMOTE_SCHEMES[scheme] == "ssh":
            # ssh authenticates with keys: the user name stays in the URL, a password is dropped.
            netloc = f"{user}@{parts.netloc}" if user else parts.netloc
            return GitSource(f"{scheme}://{netloc}{parts.path}" + (f"?{parts.query}" if parts.query else ""), "ssh")
        return GitSource(urlunsplit(parts._replace(scheme="https")), "https", username, secret)
    if _TRANSPORT_HELPER.match(raw):
        raise InvalidRequestError("Repository URL names a git transport helper (scheme::address); use https:// or ssh.")
    scp = _SCP_LIKE.match(raw)
    if scp and not raw.startswith(("/", ".", "~")):
        if scp["host"].startswith("-") or (scp["user"] or "").startswith("-"):
            raise InvalidRequestError(f"Repository URL '{raw}' has no valid host.")
        return GitSource(raw, "ssh")
    if not allow_local:
        raise _local_refused(raw)
    if not os.path.isabs(raw):
        raise InvalidRequestError(f"Repository path '{raw}' is not absolute; give the full path of a local repository.")
    return GitSource(raw, "local")


def _local_refused(url: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Repository '{url}' is a local path or file:// URL; workspaces clone https:// and ssh repositories only. "
        "The operator can allow local repositories with STUDIO_GIT_ALLOW_LOCAL=true."
    )


def clone_command(source: GitSource, folder: Path, allow_local: bool) -> tuple[list[str], dict[str, str]]:
    """The ``git clone`` command and its environment (credentials in the environment only)."""
    env = {
        **without_secrets(dict(os.environ)),  # git runs helpers and ssh: none of them needs the studio's token
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ALLOW_PROTOCOL": "https:ssh:file" if allow_local else "https:ssh",
    }
    # Nothing may ask anyone for a password: no terminal (a new session, stdin closed), no askpass program.
    for name in ("GIT_ASKPASS", "SSH_ASKPASS"):
        env.pop(name, None)
    config = [
        "-c", f"protocol.file.allow={'always' if allow_local else 'never'}",
        # only our helper: none of the user's (a `store` helper would write the secret to disk)
        "-c", "credential.helper=",
        "-c", "core.askPass=",
        "-c", "core.fsmonitor=false",
    ]  # fmt: skip
    if source.kind == "https" and (source.username or source.password):
        config += ["-c", f"credential.helper={CREDENTIAL_HELPER}"]
        env["STUDIO_GIT_HOST"] = urlsplit(source.url).netloc
        env["STUDIO_GIT_USERNAME"] = source.username or ""
        env["STUDIO_GIT_PASSWORD"] = source.password or ""
    # --no-local: a local repository is read through git's transport, not copied or hard-linked
    # (which would follow symbolic links inside it). "--" keeps a URL that starts with "-" a URL.
    command = ["git", *config, "clone", "--quiet", "--no-local", "--", source.url, str(folder)]
    return command, env


async def clone(settings: Settings, source: GitSource, folder: Path) -> None:
    """``git clone`` within the time and size budgets; any failure is a StudioError without secrets."""
    timeout, max_bytes = settings.git_clone_timeout, settings.git_clone_max_bytes
    folder.parent.mkdir(parents=True, exist_ok=True)
    command, env = clone_command(source, folder, settings.git_allow_local)
    with tempfile.TemporaryFile() as output:  # what git says, read back for the error message
        # A session of its own: no terminal to ask for a password on, and one group to kill.
        process = ChildProcess(command, name=f"git clone of {source.url}", env=env, output=output)
        try:
            process.start()
        except OSError as exc:
            raise StudioError(f"git clone could not run: {exc}.") from None
        exited = asyncio.ensure_future(process.wait())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        problem, interval = None, SIZE_CHECK_INTERVAL
        try:
            while not exited.done():
                await asyncio.wait({exited}, timeout=min(interval, max(0.0, deadline - loop.time())))
                if exited.done():
                    break
                if loop.time() >= deadline:
                    problem = f"did not finish within {timeout:g} s (STUDIO_GIT_CLONE_TIMEOUT)"
                else:
                    measured = loop.time()
                    if await asyncio.to_thread(disk_usage, folder) > max_bytes:
                        problem = f"was stopped: it grew beyond {max_bytes:,} bytes (STUDIO_GIT_CLONE_MAX_BYTES)"
                    # a checkout of many files makes the walk slow: never spend more than a fifth of the time on it
                    interval = max(SIZE_CHECK_INTERVAL, 4 * (loop.time() - measured))
                if problem:
                    await process.kill()
                    await asyncio.to_thread(shutil.rmtree, folder, True)
                    raise StudioError(f"git clone of {source.url} {problem}; nothing was kept.")
        finally:
            if not exited.done():  # cancelled: the clone goes with the request
                exited.cancel()
                await process.kill()
        output.seek(0)
        said = output.read().decode(errors="replace")
    code = exited.result()
    if code != 0:
        await asyncio.to_thread(shutil.rmtree, folder, True)
        message = source.scrub(said.strip()) or f"exit code {code}"
        raise StudioError(f"git clone of {source.url} failed: {message}")
    if disk_usage(folder) > max_bytes:  # finished between two checks
        await asyncio.to_thread(shutil.rmtree, folder, True)
        raise StudioError(f"git clone of {source.url} was stopped: it grew beyond {max_bytes:,} bytes (STUDIO_GIT_CLONE_MAX_BYTES); nothing was kept.")


def disk_usage(folder: Path) -> int:
    """Bytes of the files under ``folder`` (links not followed); 0 when it does not exist yet."""
    total = 0
    for top, _dirs, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_size
    return total
