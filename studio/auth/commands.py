"""``studio users ...`` and ``studio tokens ...``: the users' directory from the command line.

They open ``<identity_dir>/users.db`` directly (SQLite WAL), so they work whether or not a server
runs on that state directory, and a running ``studio serve`` or ``studio livy`` sees the change at
its next request. A secret (a new token, a generated password) is printed once, on the last line
of the output and nowhere else, so ``TOKEN=$(studio users add bob | tail -n 1)`` works.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from studio.errors import StudioError

if TYPE_CHECKING:  # imported when a command runs, not for `studio --help`
    from studio.auth.users import Directory


def _directory(args: argparse.Namespace) -> "Directory":
    from studio import files
    from studio.auth.users import Directory
    from studio.config import Settings

    files.private_umask()
    overrides: dict[str, Any] = {}
    if args.state_dir is not None:
        overrides["state_dir"] = args.state_dir
    if args.identity_dir is not None:
        overrides["identity_dir"] = args.identity_dir
    return Directory.for_settings(Settings(**overrides))


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def _read_password(prompt_hint: str) -> str:
    """The password on standard input (one line; the line break is not part of it)."""
    if sys.stdin is None:
        raise StudioError(f"{prompt_hint}: no standard input to read the password from.")
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise StudioError(f"{prompt_hint}: the password on standard input is empty.")
    return password


def _quota(value: str) -> int | None | str:
    """N, 'none' (back to the role's default) or 'unlimited'."""
    text = value.strip().lower()
    if text in ("none", "default"):
        return "none"
    if text in ("unlimited", "no-limit"):
        return None
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number, 'none' or 'unlimited'") from None
    if number < 0:
        raise argparse.ArgumentTypeError("a quota is a number >= 0")
    return number


# -- users ------------------------------------------------------------------------------------------


def users_add(args: argparse.Namespace, directory: "Directory") -> None:
    password = _read_password(f"studio users add {args.name}") if args.password_stdin else None
    user, token = directory.add_user(args.name, role="admin" if args.admin else "user", password=password, email=args.email)
    _audit(directory, "studio users add", f"/api/users/{user.name}", role=user.role, login="password" if password else "token only")
    print(f"Added user {user.name} (role {user.role}{', with a password' if password else ', no password'}).")
    print("Its first personal token follows (shown only now): send it as 'Authorization: Bearer <token>',")
    print(f"or as the password of HTTP Basic with the user name {user.name}.")
    print(token)


def users_list(args: argparse.Namespace, directory: "Directory") -> None:
    users = directory.list_users()
    tokens: dict[str, int] = {}
    for token in directory.list_tokens(kind="personal"):
        if not token.expired:
            tokens[token.user] = tokens.get(token.user, 0) + 1
    rows: list[tuple[str, ...]] = [("NAME", "ROLE", "SOURCE", "PASSWORD", "TOKENS", "QUOTAS", "CREATED")]
    for user in users:
        quotas = ",".join(f"{k}={'unlimited' if v is None else v}" for k, v in sorted(user.quotas.items())) or "-"
        password = "studio token" if user.name == "admin" else ("yes" if user.has_password else "no")
        rows.append((user.name, user.role, user.source, password, str(tokens.get(user.name, 0)), quotas, _when(user.created_at)))
    _table(rows)


def users_remove(args: argparse.Namespace, directory: "Directory") -> None:
    directory.remove_user(args.name)
    _audit(directory, "studio users remove", f"/api/users/{args.name.strip().lower()}")
    print(f"Removed user {args.name.strip().lower()} and revoked every token of theirs.")


def users_reset_password(args: argparse.Namespace, directory: "Directory") -> None:
    from studio.auth.users import generate_password

    if args.password_stdin:
        directory.set_password(args.name, _read_password(f"studio users reset-password {args.name}"))
        _audit(directory, "studio users reset-password", f"/api/users/{args.name.strip().lower()}")
        print(f"Set a new password for {args.name.strip().lower()}.")
        return
    password = generate_password()
    directory.set_password(args.name, password)
    _audit(directory, "studio users reset-password", f"/api/users/{args.name.strip().lower()}", generated=True)
    print(f"Set a new password for {args.name.strip().lower()}; it follows (shown only now):")
    print(password)


def users_set_role(args: argparse.Namespace, directory: "Directory") -> None:
    directory.set_role(args.name, args.role)
    _audit(directory, "studio users set-role", f"/api/users/{args.name.strip().lower()}", role=args.role)
    print(f"{args.name.strip().lower()} is now {'an' if args.role == 'admin' else 'a'} {args.role}.")


def users_set_quota(args: argparse.Namespace, directory: "Directory") -> None:
    user = directory.get_user(args.name)
    if user is None:
        raise StudioError(f"No user '{args.name}'.")
    quotas = dict(user.quotas)
    given = {"sessions": args.sessions, "running_workspaces": args.running_workspaces, "executions": args.executions}
    if all(value is False for value in given.values()):
        raise StudioError("Say which quota to set: --sessions, --running-workspaces or --executions (N, none or unlimited).")
    for key, value in given.items():
        if value is False:
            continue
        if value == "none":
            quotas.pop(key, None)
        else:
            quotas[key] = value
    directory.set_quotas(user.name, quotas)
    _audit(directory, "studio users set-quota", f"/api/users/{user.name}", quotas=quotas)
    shown = ", ".join(f"{k}={'unlimited' if v is None else v}" for k, v in sorted(quotas.items())) or "the role's defaults"
    print(f"Quotas of {user.name}: {shown}.")


# -- tokens -----------------------------------------------------------------------------------------


def tokens_create(args: argparse.Namespace, directory: "Directory") -> None:
    expires = time.time() + args.expires_days * 86400 if args.expires_days is not None else None
    info, secret = directory.create_token(args.user, note=args.note or "", expires_at=expires)
    _audit(directory, "studio tokens create", f"/api/tokens/{info.id}", token_id=info.id, token_user=info.user, token_note=info.note)
    until = f", expires {_when(info.expires_at)}" if info.expires_at else ", no expiry"
    print(f"Token {info.id} for {info.user}{until}; it follows (shown only now):")
    print(secret)


def tokens_list(args: argparse.Namespace, directory: "Directory") -> None:
    tokens = directory.list_tokens(args.user, kind=None if args.all else "personal")
    rows: list[tuple[str, ...]] = [("ID", "USER", "KIND", "NOTE", "CREATED", "EXPIRES", "LAST USED")]
    for token in tokens:
        expires = _when(token.expires_at) + (" (expired)" if token.expired else "")
        kind = token.kind + (f" {token.scope}" if token.scope else "")
        rows.append((token.id, token.user, kind, token.note or "-", _when(token.created_at), expires, _when(token.last_used_at)))
    _table(rows)


def tokens_revoke(args: argparse.Namespace, directory: "Directory") -> None:
    if not directory.revoke_token(args.id):
        raise StudioError(f"No token '{args.id}'.")
    _audit(directory, "studio tokens revoke", f"/api/tokens/{args.id}", token_id=args.id)
    print(f"Revoked token {args.id}.")


def _audit(directory: "Directory", action: str, target: str, **detail: Any) -> None:
    """A change on the audit trail beside the users' directory (never a secret)."""
    from studio import audit

    audit.record_local(directory.path.parent, action, target, **detail)


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


# -- the parsers ------------------------------------------------------------------------------------


def _run(action: Callable[[argparse.Namespace, "Directory"], None]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        try:
            with _directory(args) as directory:
                action(args, directory)
        except StudioError as exc:
            print(f"studio: {exc.msg}", file=sys.stderr)
            return 1
        return 0

    return command


def _where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, help="state directory (default ~/.local/state/spark-studio; STUDIO_STATE_DIR)")
    parser.add_argument(
        "--identity-dir", type=Path, help="where users.db is (default: the state directory; STUDIO_IDENTITY_DIR)"
    )


def add_parsers(sub: Any) -> None:
    """``studio users`` and ``studio tokens`` on the ``studio`` command's subparsers."""
    users = sub.add_parser("users", help="the studio's users: add, list, remove, reset-password, set-role, set-quota")
    users_sub = users.add_subparsers(dest="users_command", required=True)

    add = users_sub.add_parser("add", help="add a user; prints its first personal token on the last line")
    add.add_argument("name", help="user name: lowercase letters, digits, '.', '_', '-' (it becomes the Spark user)")
    add.add_argument("--admin", action="store_true", help="with the role admin (default: user)")
    add.add_argument("--password-stdin", action="store_true", help="read the user's password from standard input")
    add.add_argument("--email", help="the user's e-mail address (shown to admins)")
    _where(add)
    add.set_defaults(func=_run(users_add))

    listing = users_sub.add_parser("list", help="every user with role, source and number of tokens")
    _where(listing)
    listing.set_defaults(func=_run(users_list))

    remove = users_sub.add_parser("remove", help="remove a user and revoke every token of theirs")
    remove.add_argument("name")
    _where(remove)
    remove.set_defaults(func=_run(users_remove))

    reset = users_sub.add_parser(
        "reset-password", help="set a new password: from standard input (--password-stdin), else a generated one, printed"
    )
    reset.add_argument("name")
    reset.add_argument("--password-stdin", action="store_true", help="read the new password from standard input")
    _where(reset)
    reset.set_defaults(func=_run(users_reset_password))

    role = users_sub.add_parser("set-role", help="make a user an admin or a user (at once, also for signed-in browsers)")
    role.add_argument("name")
    role.add_argument("role", choices=("admin", "user"))
    _where(role)
    role.set_defaults(func=_run(users_set_role))

    quota = users_sub.add_parser(
        "set-quota", help="a user's own quotas: N, 'none' (back to the role's default) or 'unlimited'"
    )
    quota.add_argument("name")
    quota.add_argument("--sessions", type=_quota, default=False, help="live Spark sessions and batches")
    quota.add_argument("--running-workspaces", type=_quota, default=False, help="running workspaces")
    quota.add_argument("--executions", type=_quota, default=False, help="queued or running notebook executions")
    _where(quota)
    quota.set_defaults(func=_run(users_set_quota))

    tokens = sub.add_parser("tokens", help="personal API tokens: create, list, revoke")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True)

    create = tokens_sub.add_parser("create", help="a new personal token for a user; printed once, on the last line")
    create.add_argument("--user", required=True, help="whose token it is")
    create.add_argument("--note", help="what it is for (shown in listings)")
    create.add_argument("--expires-days", type=float, help="days until it stops working (default: never)")
    _where(create)
    create.set_defaults(func=_run(tokens_create))

    tlist = tokens_sub.add_parser("list", help="tokens (never their secrets): id, user, note, expiry, last use")
    tlist.add_argument("--user", help="only this user's")
    tlist.add_argument("--all", action="store_true", help="also the kernel and execution tokens of running work")
    _where(tlist)
    tlist.set_defaults(func=_run(tokens_list))

    revoke = tokens_sub.add_parser("revoke", help="revoke a token by its id (it stops working at once)")
    revoke.add_argument("id")
    _where(revoke)
    revoke.set_defaults(func=_run(tokens_revoke))
