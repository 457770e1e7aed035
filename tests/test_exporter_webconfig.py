"""``--web.config.file`` and ``--web.listen-address`` as node_exporter reads them: TLS, mTLS with
a client CA, bcrypt basic_auth_users. Real TLS clients against the running exporter."""

from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mlwarden.exporter.app import Exporter, ExporterStartError
from mlwarden.exporter.cli import ExporterSettings
from test_exporter_server import start_exporter  # noqa: F401  (the fixture that starts a simulated exporter)

from mlwarden import cli, settings
from mlwarden.components import free_port, wait_until

REFUSED = (ssl.SSLError, ConnectionError, urllib.error.URLError, http.client.HTTPException)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA
    rogue_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, other_ca_key = _key(), _key()
    ca_path, _ = _write(directory, "ca", _cert("mlwarden test CA", ca_key, None, ca=True), ca_key)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    server = _write(directory, "server", _cert("exporter", server_key, ("mlwarden test CA", ca_key), server=True), server_key)
    client = _write(directory, "client", _cert("prometheus", client_key, ("mlwarden test CA", ca_key)), client_key)
    rogue = _write(directory, "rogue", _cert("prometheus", rogue_key, ("another CA", other_ca_key)), rogue_key)
    return Pki(ca_path, *server, *client, *rogue)


@pytest.fixture
def start(start_exporter: Callable[..., Exporter], tmp_path: Path) -> Callable[..., Exporter]:
    def run(web_config: str) -> Exporter:
        path = tmp_path / "web.yml"
        path.write_text(web_config)
        return start_exporter("--web.config.file", str(path))

    return run


def _client(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert and key:
        context.load_cert_chain(cert, key)
    return context


def _get(url: str, context: ssl.SSLContext | None = None, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metrics_served(url: str, context: ssl.SSLContext | None = None, auth: tuple[str, str] | None = None) -> bool:
    status, body = _get(url + "/metrics", context, auth)
    return status == 200 and "mlwarden_gpu_up" in body


def _tls_config(pki: Pki, policy: str | None) -> str:
    text = f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
    if policy:
        text += f"  client_auth_type: {policy}\n  client_ca_file: {pki.ca}\n"
    return text


def test_mtls_accepts_a_client_certificate_of_the_ca_and_refuses_others(start: Callable[..., Exporter], pki: Pki) -> None:
    exporter = start(_tls_config(pki, "RequireAndVerifyClientCert"))
    url = f"https://127.0.0.1:{exporter.port}"
    assert exporter.scheme == "https"
    wait_until(lambda: _metrics_served(url, _client(pki, pki.client_cert, pki.client_key)), 15, "metrics over mTLS")
    with pytest.raises(REFUSED):
        _get(url + "/metrics", _client(pki))  # no client certificate
    with pytest.raises(REFUSED):
        _get(url + "/metrics", _client(pki, pki.rogue_cert, pki.rogue_key))  # another CA's
    with pytest.raises(REFUSED):
        _get(f"http://127.0.0.1:{exporter.port}/metrics")  # plain HTTP


def test_verify_if_given_serves_clients_without_a_certificate_but_not_with_a_bad_one(
        start: Callable[..., Exporter], pki: Pki) -> None:
    exporter = start(_tls_config(pki, "VerifyClientCertIfGiven"))
    url = f"https://127.0.0.1:{exporter.port}"
    wait_until(lambda: _metrics_served(url, _client(pki)), 15, "metrics over TLS without a client certificate")
    assert _metrics_served(url, _client(pki, pki.client_cert, pki.client_key))
    with pytest.raises(REFUSED):
        _get(url + "/metrics", _client(pki, pki.rogue_cert, pki.rogue_key))


def test_bcrypt_users_are_accepted_and_others_refused(start: Callable[..., Exporter], pki: Pki, tmp_path: Path) -> None:
    prometheus = bcrypt.hashpw(b"scrape-secret", bcrypt.gensalt(rounds=4)).decode()
    # htpasswd -B writes $2y$: the same algorithm under another name
    grafana = "$2y$" + bcrypt.hashpw(b"other secret:with colon", bcrypt.gensalt(rounds=4)).decode()[4:]
    (tmp_path / "certs").mkdir()
    for source in (pki.server_cert, pki.server_key):  # relative paths are relative to the file
        (tmp_path / "certs" / source.name).write_bytes(source.read_bytes())
    exporter = start(
        f"tls_server_config:\n  cert_file: certs/{pki.server_cert.name}\n  key_file: certs/{pki.server_key.name}\n"
        f"basic_auth_users:\n  prometheus: '{prometheus}'\n  grafana: '{grafana}'\n"
    )
    url, context = f"https://127.0.0.1:{exporter.port}", _client(pki)
    wait_until(lambda: _metrics_served(url, context, ("prometheus", "scrape-secret")), 15, "metrics for a bcrypt user")
    assert _metrics_served(url, context, ("grafana", "other secret:with colon"))
    assert _metrics_served(url, context, ("prometheus", "scrape-secret"))  # again: the remembered outcome
    for user, password in (("prometheus", "wrong"), ("grafana", "scrape-secret"), ("nobody", "scrape-secret"),
                           ("prometheus", "x" * 100)):
        status, _ = _get(url + "/metrics", context, (user, password))
        assert status == 401, (user, password)
    assert _get(url + "/metrics", context)[0] == 401
    assert _get(url + "/healthz", context)[0] in (200, 503)  # health needs no credentials


@pytest.mark.parametrize("config, message", [
    ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
     "unsupported key(s) cipher_suites"),
    ("http_server_config:\n  http2: false\n", "unsupported key(s) http_server_config"),
    ("tls_server_config:\n  cert_file: a.crt\n", "needs both cert_file and key_file"),
    ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.crt\n",
     "accepts unverified client certificates"),
    ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  client_auth_type: RequireAndVerifyClientCert\n",
     "needs client_ca_file"),
    ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  client_ca_file: ca.crt\n",
     "client_ca_file is set but client_auth_type is NoClientCert"),
    ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  min_version: TLS10\n", "min_version 'TLS10' is not supported"),
    ("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n", "cannot load the TLS files"),
    ("basic_auth_users:\n  prometheus: plaintext-password\n", "basic_auth_users.prometheus is not a bcrypt hash"),
    ("basic_auth_users: [prometheus]\n", "basic_auth_users must map user names"),
    ("tls_server_config: [\n", "is not valid YAML"),
])
def test_a_bad_web_config_stops_the_exporter_with_one_line(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "web.yml"
    path.write_text(config)
    loaded = settings.load(ExporterSettings, "exporter", ["--gpu-backend", "simulated", "--web.config.file", str(path),
                                                          "--listen-address", f"127.0.0.1:{free_port()}"], {})
    with pytest.raises(ExporterStartError, match="web config") as caught:
        Exporter.from_settings(loaded)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert "plaintext-password" not in str(caught.value)


def test_web_config_and_the_old_flags_are_one_or_the_other(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLWARDEN_EXPORTER_BASIC_AUTH_PASSWORD", "pw")
    path = tmp_path / "web.yml"
    path.write_text("{}\n")
    code = cli.main(["exporter", "--web.config.file", str(path), "--basic-auth-user", "prom"])
    assert code == 2 and "use one or the other" in capsys.readouterr().err
    monkeypatch.delenv("MLWARDEN_EXPORTER_BASIC_AUTH_PASSWORD")
    assert cli.main(["exporter", "--web.config.file", str(tmp_path / "absent.yml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_web_listen_address_is_the_listen_address() -> None:
    loaded = settings.load(ExporterSettings, "exporter", ["--web.listen-address", ":19945"], {})
    assert loaded.listen_address == settings.load(ExporterSettings, "exporter", ["--listen-address", ":19945"], {}).listen_address


def test_a_mistyped_web_flag_gets_a_suggestion() -> None:
    with pytest.raises(settings.SettingsError, match="did you mean --web.listen-address"):
        settings.load(ExporterSettings, "exporter", ["--web.listen-adress", ":19945"], {})
