"""Inbound authentication: a bearer token, or HTTP basic credentials, compared in constant time."""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass


@dataclass(frozen=True)
class Credentials:
    token: str = ""
    username: str = ""
    password: str = ""

    def __repr__(self) -> str:
        return "Credentials(***)"

    def allows(self, authorization: str | None) -> bool:
        """Whether the ``Authorization`` header carries the configured token or basic credentials."""
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.token:
            return hmac.compare_digest(value.encode(), self.token.encode())
        if scheme.lower() == "basic" and self.password:
            try:
                decoded = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return False
            user, _, password = decoded.partition(b":")
            # Both comparisons always run, so the timing does not say which part was wrong.
            user_ok = hmac.compare_digest(user, self.username.encode())
            password_ok = hmac.compare_digest(password, self.password.encode())
            return user_ok and password_ok
        return False
