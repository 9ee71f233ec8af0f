"""Refuses to start the compose stack on missing, example or weak secrets.

compose.yaml runs this first (the ``preflight`` service); PostgreSQL, Redis and through them every
docqueue container wait until it exits 0. compose itself already refuses an unset secret (each is
``${VAR:?...}``); this catches what compose cannot: the values from ``example.env``, well-known
defaults, short ones, one secret used for two purposes, and passwords that would break the URLs
compose builds from them. Every problem is printed with the variable it concerns, never the value,
and the exit status is 1.

Standard library only: it runs in the docqueue image before anything else is up.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

#: Secrets compose.yaml reads, and whether compose puts the value into a URL.
SECRETS: dict[str, bool] = {
    "POSTGRES_PASSWORD": True,
    "REDIS_PASSWORD": True,
    "DOCQUEUE_DB_APP_PASSWORD": True,
    "DOCQUEUE_METRICS_TOKEN": False,
}
#: "user:password" pairs, comma-separated; each password is held to the same rules.
BASIC_AUTH = "DOCQUEUE_FLOWER_BASIC_AUTH"
APP_ROLE = "DOCQUEUE_DB_APP_ROLE"
MIN_LENGTH = 16
#: Placeholders the example file and documentation use; a value containing one is refused.
PLACEHOLDERS = ("change-me", "changeme", "change_me", "replace-me", "example", "placeholder")
#: Well-known defaults, refused whatever their case.
COMMON = frozenset(
    {"docqueue", "postgres", "redis", "admin", "password", "secret", "root", "flower", "test"}
    | {"123456", "12345678", "letmein", "qwerty", "passw0rd", "password123", "default"}
)
#: Characters a password may hold when compose writes it into a URL unescaped.
URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")
ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
HINT = "generate one with `openssl rand -hex 32` and set it in .env"


def weakness(value: str, *, in_url: bool) -> str | None:
    """Why ``value`` is not acceptable as a secret, or None."""
    if not value.strip():
        return "is empty"
    lowered = value.lower()
    if lowered in COMMON:
        return "is a well-known default"
    if any(p in lowered for p in PLACEHOLDERS):
        return "is still the example's placeholder"
    if len(value) < MIN_LENGTH:
        return f"is shorter than {MIN_LENGTH} characters"
    if in_url and not URL_SAFE.fullmatch(value):
        return "holds characters that break the URL compose builds from it (A-Z a-z 0-9 . _ ~ -)"
    return None


def problems(env: Mapping[str, str]) -> list[str]:
    """Every reason the secrets in ``env`` must not start a deployment, one line each."""
    found: list[str] = []
    seen: dict[str, str] = {}  # value -> the first variable that holds it

    def check(name: str, value: str, in_url: bool) -> None:
        why = weakness(value, in_url=in_url)
        if why is not None:
            found.append(f"{name} {why}: {HINT}")
        elif value in seen:
            found.append(f"{name} is the same as {seen[value]}: every secret must be its own")
        else:
            seen[value] = name

    for name, in_url in SECRETS.items():
        check(name, env.get(name, ""), in_url)
    pairs = [p for p in env.get(BASIC_AUTH, "").split(",") if p.strip()]
    if not pairs:
        found.append(f"{BASIC_AUTH} is empty: set user:password ({HINT})")
    for i, pair in enumerate(pairs, 1):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user:
            found.append(f"{BASIC_AUTH} entry {i} is not user:password")
            continue
        check(f"{BASIC_AUTH} (password of {user!r})", password, False)
    role = env.get(APP_ROLE, "docqueue_app")
    if not ROLE_NAME.fullmatch(role):
        found.append(f"{APP_ROLE} must be lowercase letters, digits and '_', not first a digit")
    elif role == "postgres":
        found.append(f"{APP_ROLE} must not be postgres: the application needs a role of its own")
    return found


def main() -> int:
    found = problems(os.environ)
    for line in found:
        print(f"preflight: {line}", file=sys.stderr)
    if found:
        print("preflight: refusing to start (see scripts/docker/example.env)", file=sys.stderr)
        return 1
    print("preflight: secrets set", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
