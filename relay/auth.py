"""Inbound authentication: a bearer token, or HTTP basic credentials, through the shared check."""

from __future__ import annotations

from mlwarden.auth import AuthCheck


class Credentials(AuthCheck):
    """The relay's settings: a token, one basic-auth user, or both (an empty one is off)."""

    def __init__(self, token: str = "", username: str = "", password: str = "") -> None:
        super().__init__(tokens=(token,), users={username: password})
