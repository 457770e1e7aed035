"""The one check of an inbound ``Authorization`` header, for the relay and the exporter alike.

Accepted are bearer tokens and HTTP basic users; a basic user's password is either a secret
given in the settings or a bcrypt hash from an exporter-toolkit web configuration. Secrets
are kept only as keyed hashes (HMAC-SHA256 under a key made per process), so a memory dump
or a stray ``repr`` shows nothing reusable, and every comparison is of digests in constant
time. For settings secrets all candidates are compared, whatever matched first, so the time
taken does not tell whether the user name or the password was wrong. A bcrypt user name that
does not exist is checked against a hash too, as the exporter toolkit does.

bcrypt is slow on purpose (tens of milliseconds) and the servers check on their event loop,
so a bcrypt outcome is remembered per credentials presented, under their keyed hash (never
the password itself): Prometheus sends the same credentials every scrape.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from types import ModuleType

_OUTCOME_CACHE_LIMIT = 1024


class AuthCheck:
    """Whether an ``Authorization`` header carries one of the configured credentials."""

    def __init__(
        self,
        *,
        tokens: Iterable[str] = (),
        users: Mapping[str, str] | None = None,
        bcrypt_users: Mapping[str, bytes] | None = None,
    ) -> None:
        users, bcrypt_users = users or {}, bcrypt_users or {}
        both = sorted(set(users) & set(bcrypt_users))
        if both:
            raise ValueError(f"user(s) {', '.join(both)} given both a password and a bcrypt hash")
        self._key = secrets.token_bytes(32)
        self._tokens = tuple(self._digest(token.encode()) for token in tokens if token)
        self._users = tuple(self._digest(f"{name}:{password}".encode()) for name, password in users.items() if password)
        self._bcrypt_users = dict(bcrypt_users)
        self._absent = b""
        if bcrypt_users:
            bcrypt = _bcrypt()
            self._absent = bcrypt.hashpw(b"not a password of anyone", bcrypt.gensalt(rounds=10))
        self._outcomes: dict[bytes, bool] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(***)"

    @property
    def accepts_basic(self) -> bool:
        """Whether any basic user is configured (then a browser may be asked for credentials)."""
        return bool(self._users or self._bcrypt_users)

    def allows(self, authorization: str | bytes | None) -> bool:
        """Whether the header (as sent: ``Bearer <token>`` or ``Basic <base64>``) is accepted."""
        if not authorization:
            return False
        header = _raw(authorization)
        scheme, _, value = header.partition(b" ")
        value = value.strip()
        if scheme.lower() == b"bearer":
            return _any_equal(self._digest(value), self._tokens)
        if scheme.lower() == b"basic":
            try:
                decoded = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return False
            return self._allows_basic(decoded)
        return False

    def _allows_basic(self, decoded: bytes) -> bool:
        if _any_equal(self._digest(decoded), self._users):
            return True
        if not self._bcrypt_users:
            return False
        key = self._digest(decoded)
        known = self._outcomes.get(key)
        if known is None:
            known = self._check_bcrypt(decoded)
            if len(self._outcomes) >= _OUTCOME_CACHE_LIMIT:
                self._outcomes.clear()
            self._outcomes[key] = known
        return known

    def _check_bcrypt(self, decoded: bytes) -> bool:
        user, _, password = decoded.partition(b":")
        try:
            expected = self._bcrypt_users.get(user.decode())
        except UnicodeDecodeError:
            return False
        try:
            matches = _bcrypt().checkpw(password, expected or self._absent)
        except ValueError:  # a password bcrypt cannot take (longer than 72 bytes)
            return False
        return matches and expected is not None

    def _digest(self, value: bytes) -> bytes:
        return hmac.new(self._key, value, hashlib.sha256).digest()


def _bcrypt() -> ModuleType:
    """bcrypt, imported only where bcrypt users exist: the exporter keeps its memory for GPUs otherwise."""
    import bcrypt

    return bcrypt


def _raw(header: str | bytes) -> bytes:
    """The header's bytes: ASGI gives bytes, Starlette a str decoded as latin-1 (so this undoes it)."""
    if isinstance(header, bytes):
        return header
    try:
        return header.encode("latin-1")
    except UnicodeEncodeError:
        return header.encode()


def _any_equal(given: bytes, candidates: tuple[bytes, ...]) -> bool:
    """Compare against every candidate, not stopping at a match, so the timing says nothing."""
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(given, candidate)
    return found
