"""Reachability of the configured services: their own health or readiness endpoint answers 2xx."""

from __future__ import annotations

from typing import Protocol

import httpx
from mlwarden.jobs.health.result import Result, Status


class ServiceSettings(Protocol):
    exporter_url: str | None
    relay_url: str | None
    pushgateway: str | None
    prometheus_url: str | None
    http_timeout: float


def endpoints(settings: ServiceSettings) -> dict[str, str]:
    """service -> URL of its health endpoint, for the services that are configured."""
    candidates = {
        "exporter": (settings.exporter_url, "/healthz"),
        "relay": (settings.relay_url, "/readyz"),
        "pushgateway": (settings.pushgateway, "/-/ready"),
        "prometheus": (settings.prometheus_url, "/-/ready"),
    }
    return {name: base + path for name, (base, path) in candidates.items() if base}


def check(settings: ServiceSettings) -> list[Result]:
    results = []
    with httpx.Client(timeout=settings.http_timeout, follow_redirects=False) as client:
        for name, url in endpoints(settings).items():
            path = httpx.URL(url).path  # never the host part: it may carry credentials
            try:
                response = client.get(url)
            except httpx.HTTPError as exc:
                results.append(Result(f"service:{name}", Status.CRITICAL, f"unreachable ({type(exc).__name__})"))
                continue
            status = Status.OK if response.is_success else Status.CRITICAL
            results.append(Result(f"service:{name}", status, f"HTTP {response.status_code} from {path}"))
    return results
