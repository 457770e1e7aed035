"""The exporter-toolkit web configuration file, read as node_exporter reads ``--web.config.file``.

Every Prometheus exporter user has one of these already::

    tls_server_config:
      cert_file: server.crt          # paths relative to this file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # mTLS; or VerifyClientCertIfGiven
      client_ca_file: clients-ca.crt
      min_version: TLS12             # TLS12 (default) or TLS13
      max_version: TLS13
    basic_auth_users:                # user: bcrypt hash (htpasswd -nBC 10 USER)
      prometheus: $2y$10$...

An unknown key, an unsupported value or a file that cannot be read stops the exporter with one
line naming it, as the toolkit does. Two of the toolkit's client-auth policies accept a client
certificate without verifying it (``RequestClientCert``, ``RequireAnyClientCert``); Python's TLS
cannot, so they are refused rather than silently verified. Unlike the toolkit, the file is read
once at start: restart the exporter after changing it.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlwarden.auth import AuthCheck

_TOP_LEVEL = ("tls_server_config", "basic_auth_users")
_TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version")
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_BCRYPT = re.compile(rb"\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}")


class WebConfigError(ValueError):
    """The web configuration file is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class WebConfig:
    tls: ssl.SSLContext | None
    auth: AuthCheck | None


def load(path: Path) -> WebConfig:
    """Read and check the whole file; raises :class:`WebConfigError` with one clear line."""
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise WebConfigError(f"cannot read web config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise WebConfigError(f"web config {path} is not valid YAML{where}: {getattr(exc, 'problem', None) or 'unreadable'}") from None
    section = _mapping(document, path, "the file", _TOP_LEVEL)
    tls = None
    if section.get("tls_server_config") is not None:
        tls = _tls_context(_mapping(section["tls_server_config"], path, "tls_server_config", _TLS_KEYS), path)
    auth = None
    if section.get("basic_auth_users"):
        auth = AuthCheck(bcrypt_users=_users(section["basic_auth_users"], path))
    return WebConfig(tls, auth)


def _mapping(value: Any, path: Path, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WebConfigError(f"web config {path}: {where} must be a mapping")
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        raise WebConfigError(
            f"web config {path}: {where} has unsupported key(s) {', '.join(unknown)} (supported: {', '.join(allowed)})"
        )
    return value


def _text(config: dict[str, Any], key: str, path: Path, default: str = "") -> str:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise WebConfigError(f"web config {path}: tls_server_config.{key} must be a string")
    return value


def _tls_context(config: dict[str, Any], path: Path) -> ssl.SSLContext:
    base = path.parent
    cert_file, key_file = _text(config, "cert_file", path), _text(config, "key_file", path)
    if not cert_file or not key_file:
        raise WebConfigError(f"web config {path}: tls_server_config needs both cert_file and key_file")
    policy = _text(config, "client_auth_type", path, "NoClientCert")
    if policy in _UNVERIFIED_CLIENT_AUTH:
        raise WebConfigError(
            f"web config {path}: client_auth_type {policy} accepts unverified client certificates, which "
            "mlwarden does not support; use RequireAndVerifyClientCert (or VerifyClientCertIfGiven)"
        )
    if policy not in _CLIENT_AUTH:
        raise WebConfigError(f"web config {path}: invalid client_auth_type {policy!r} (one of {', '.join(_CLIENT_AUTH)})")
    client_ca = _text(config, "client_ca_file", path)
    if client_ca and policy == "NoClientCert":
        raise WebConfigError(f"web config {path}: client_ca_file is set but client_auth_type is NoClientCert")
    if not client_ca and policy != "NoClientCert":
        raise WebConfigError(f"web config {path}: client_auth_type {policy} needs client_ca_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _version(config, "min_version", "TLS12", path)
    context.maximum_version = _version(config, "max_version", "TLS13", path)
    try:
        context.load_cert_chain(base / cert_file, base / key_file)
        if client_ca:
            context.load_verify_locations(cafile=base / client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise WebConfigError(f"web config {path}: cannot load the TLS files: {exc}") from None
    context.verify_mode = _CLIENT_AUTH[policy]
    return context


def _version(config: dict[str, Any], key: str, default: str, path: Path) -> ssl.TLSVersion:
    name = _text(config, key, path, default)
    if name not in _VERSIONS:
        raise WebConfigError(f"web config {path}: {key} {name!r} is not supported (TLS12 or TLS13)")
    return _VERSIONS[name]


def _users(value: Any, path: Path) -> dict[str, bytes]:
    if not isinstance(value, dict):
        raise WebConfigError(f"web config {path}: basic_auth_users must map user names to bcrypt hashes")
    users = {}
    for user, hashed in value.items():
        # The hash is not a secret in the usual sense, but it stays out of the message anyway.
        if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed.encode()):
            raise WebConfigError(f"web config {path}: basic_auth_users.{user} is not a bcrypt hash")
        users[str(user)] = hashed.encode()
    return users
