"""Pure builders of the Kubernetes objects a ToolPool owns: its worker Deployment and the
ConfigMap that carries the pool's spec to the workers as their ``genq.yaml``.

Nothing here does I/O: given a pool (a ToolPool object as a dict, or a
:class:`~genq.tools.ToolSpec`) each function returns the object as a dict, ready for a
server-side apply. Names, labels and annotations come from :mod:`genq.constants`.
Neighbours: :mod:`genq.operator.handlers` applies these; :mod:`genq.operator.scaling`
decides the replica count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import yaml

from genq import constants
from genq.tools import ToolSpec

#: Seconds added to the tool's activeDeadlineSeconds for the pod's grace period: the
#: worker drains for the deadline, then hands back what is left and closes its
#: connections, which takes a few seconds.
TERMINATION_MARGIN_SECONDS = 30
#: Grace period when the tool has no deadline: a long generation still gets to finish.
DEFAULT_TERMINATION_GRACE_SECONDS = 3600
#: A model load (downloading weights, moving them to the GPU) may take many minutes;
#: the startup probe allows this long before liveness takes over.
STARTUP_SECONDS = 1800


def pool_spec(pool: Mapping[str, Any] | ToolSpec) -> ToolSpec:
    """The validated spec of a ToolPool object (or the spec itself)."""
    if isinstance(pool, ToolSpec):
        return pool
    spec = pool.get("spec", pool) if isinstance(pool, Mapping) else pool
    return ToolSpec.model_validate(dict(spec))


def selector_labels(tool: str) -> dict[str, str]:
    """The worker pods' selector (immutable on the Deployment, so only the tool)."""
    return {constants.LABEL_TOOL: tool}


def selector_string(tool: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(tool).items())


def common_labels(tool: str) -> dict[str, str]:
    return {
        **selector_labels(tool),
        constants.LABEL_COMPONENT: "worker",
        constants.LABEL_PART_OF: "genq",
        constants.LABEL_MANAGED_BY: constants.FIELD_MANAGER,
    }


def owner_reference(pool: Mapping[str, Any]) -> dict[str, Any] | None:
    """The controller ownerReference to a ToolPool object (None without a uid, e.g. a
    bare spec): the garbage collector deletes what it owns with it."""
    meta = pool.get("metadata") or {}
    if not meta.get("uid") or not meta.get("name"):
        return None
    return {
        "apiVersion": f"{constants.API_GROUP}/{constants.API_VERSION}",
        "kind": "ToolPool",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(name: str, namespace: str, tool: str, pool: Mapping[str, Any] | ToolSpec) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": common_labels(tool)}
    owner = owner_reference(pool) if isinstance(pool, Mapping) else None
    if owner:
        meta["ownerReferences"] = [owner]
    return meta


def worker_config(spec: ToolSpec) -> str:
    """The workers' ``genq.yaml``: this one tool, in the pool's own (camelCase) schema."""
    tool = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    return yaml.safe_dump({"tools": [tool]}, sort_keys=False)


def spec_hash(spec: ToolSpec) -> str:
    data = json.dumps(spec.model_dump(by_alias=True, mode="json"), sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def build_worker_config_map(pool: Mapping[str, Any] | ToolSpec, namespace: str) -> dict[str, Any]:
    spec = pool_spec(pool)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(constants.worker_deployment_name(spec.name), namespace, spec.name, pool),
        "data": {constants.WORKER_CONFIG_FILE: worker_config(spec)},
    }


def termination_grace_seconds(spec: ToolSpec) -> int:
    """At least the tool's deadline: on SIGTERM a worker finishes what it runs (it
    drains for as long as the deadline) before the kubelet kills it."""
    if spec.active_deadline_seconds is None:
        return DEFAULT_TERMINATION_GRACE_SECONDS
    return int(-(-spec.active_deadline_seconds // 1)) + TERMINATION_MARGIN_SECONDS


def _quantity(v: Any) -> str:
    return str(v)


def build_worker_deployment(
    pool: Mapping[str, Any] | ToolSpec,
    namespace: str,
    image_default: str,
    *,
    replicas: int | None = None,
    env: Mapping[str, str] | None = None,
    env_secret: str | None = "genq-worker",
    service_account: str | None = "genq-worker",
    probes: bool = True,
) -> dict[str, Any]:
    """The worker Deployment of a pool: ``genq worker --tool NAME`` in the pool's image
    (or ``image_default``) with its resources as requests and limits, node selector,
    tolerations, ``GENQ_*`` settings (``env``; the pool's ``genq.yaml`` mounted from its
    ConfigMap), probes, and a grace period of at least the tool's deadline.

    ``replicas`` None leaves the field out (the scaler owns it). ``env_secret`` names an
    optional Secret whose keys become environment variables (S3 credentials and such).
    ``probes`` adds HTTP startup/liveness/readiness probes on the worker's health port
    (``/healthz``, ``/readyz``).
    """
    spec = pool_spec(pool)
    tool = spec.name
    name = constants.worker_deployment_name(tool)
    labels = common_labels(tool)
    config_path = f"{constants.WORKER_CONFIG_DIR}/{constants.WORKER_CONFIG_FILE}"

    container_env: list[dict[str, Any]] = [
        {"name": "GENQ_CONFIG", "value": config_path},
        {"name": "GENQ_STORE", "value": "kubernetes"},
        # A worker drains on SIGTERM for as long as a job may run, so scale-in and
        # rollouts never cut a job short (terminationGracePeriodSeconds is longer still).
        {"name": "GENQ_DRAIN_SECONDS", "value": str(termination_grace_seconds(spec) - TERMINATION_MARGIN_SECONDS)},
        {"name": "GENQ_KUBE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "GENQ_WORKER_HEALTH_PORT", "value": str(constants.WORKER_HEALTH_PORT)},
    ]
    taken = {e["name"] for e in container_env}
    container_env += [{"name": k, "value": str(v)} for k, v in sorted((env or {}).items()) if k not in taken]

    resources = {k: _quantity(v) for k, v in spec.resources.items()}
    container: dict[str, Any] = {
        "name": constants.WORKER_CONTAINER,
        "image": spec.image or image_default,
        "args": ["worker", "--tool", tool],
        "env": container_env,
        "ports": [{"name": "health", "containerPort": constants.WORKER_HEALTH_PORT}],
        "volumeMounts": [{"name": "config", "mountPath": constants.WORKER_CONFIG_DIR, "readOnly": True}],
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "health"},
            "periodSeconds": 10,
            "failureThreshold": STARTUP_SECONDS // 10,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "health"},
            "periodSeconds": 20,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        # Ready once the default variant's model is loaded: a rollout waits for it.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "health"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if not probes:
        for k in ("startupProbe", "livenessProbe", "readinessProbe", "ports"):
            container.pop(k)
    if resources:
        container["resources"] = {"requests": dict(resources), "limits": dict(resources)}
    if env_secret:
        container["envFrom"] = [{"secretRef": {"name": env_secret, "optional": True}}]

    pod_spec: dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "volumes": [{"name": "config", "configMap": {"name": name}}],
        "enableServiceLinks": False,
    }
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]

    annotations = {constants.ANNOTATION_SPEC_HASH: spec_hash(spec)}
    if spec.model:
        annotations[constants.ANNOTATION_MODEL] = spec.model

    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, namespace, tool, pool),
        "spec": {
            "selector": {"matchLabels": selector_labels(tool)},
            # Never fewer ready workers during a rollout: one extra pod at a time.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }
    if replicas is not None:
        deployment["spec"]["replicas"] = replicas
    return deployment
