"""The operator's pure decisions: the worker Deployment it builds, how many workers a pool
runs, which pods a scale-in may take, and the status it writes."""

from __future__ import annotations

import pytest

from genq import constants
from genq.operator import conditions, resources, scaling
from genq.tools import ToolSpec

NS = "genq"


def pool(**spec) -> dict:
    return {
        "apiVersion": "genq.io/v1alpha1",
        "kind": "ToolPool",
        "metadata": {"name": "upscale", "namespace": NS, "uid": "uid-1", "generation": 3},
        "spec": {
            "tool": {"kind": "upscale", "name": "upscale"},
            "model": "hf://ai-forever/Real-ESRGAN",
            "resources": {"nvidia.com/gpu": 1, "memory": "16Gi"},
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "maxWorkers": 4,
            "concurrencyPerWorker": 2,
            "activeDeadlineSeconds": 900,
            "scaleDownDelaySeconds": 60,
            **spec,
        },
    }


def spec(**kw) -> ToolSpec:
    return resources.pool_spec(pool(**kw))


# -- the worker Deployment ------------------------------------------------------------------


def test_deployment_runs_the_tools_worker_with_its_resources():
    d = resources.build_worker_deployment(pool(), NS, "genq-worker:1", env={"GENQ_NATS_URL": "nats://nats:4222"})
    assert d["metadata"]["name"] == "upscale-workers" and d["metadata"]["namespace"] == NS
    assert d["metadata"]["ownerReferences"] == [{
        "apiVersion": "genq.io/v1alpha1", "kind": "ToolPool", "name": "upscale", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True}]
    assert d["spec"]["selector"] == {"matchLabels": {constants.LABEL_TOOL: "upscale"}}
    assert "replicas" not in d["spec"]  # the scaler owns it
    tpl = d["spec"]["template"]
    assert tpl["metadata"]["labels"][constants.LABEL_TOOL] == "upscale"
    assert tpl["metadata"]["annotations"][constants.ANNOTATION_MODEL] == "hf://ai-forever/Real-ESRGAN"
    pod = tpl["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "genq-worker:1"
    assert c["args"] == ["worker", "--tool", "upscale"]
    assert c["resources"] == {"requests": {"nvidia.com/gpu": "1", "memory": "16Gi"},
                              "limits": {"nvidia.com/gpu": "1", "memory": "16Gi"}}
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["GENQ_NATS_URL"] == "nats://nats:4222"
    assert env["GENQ_CONFIG"] == "/etc/genq/genq.yaml" and env["GENQ_STORE"] == "kubernetes"
    assert env["GENQ_DRAIN_SECONDS"] == "900"
    assert {"livenessProbe", "readinessProbe", "startupProbe"} <= set(c)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # A worker being scaled in or rolled finishes its job: the grace period covers the deadline.
    assert pod["terminationGracePeriodSeconds"] >= 900
    assert pod["volumes"] == [{"name": "config", "configMap": {"name": "upscale-workers"}}]


def test_deployment_image_and_grace_period_follow_the_pool():
    d = resources.build_worker_deployment(pool(image="my/upscaler:2", activeDeadlineSeconds=7200), NS, "default:1", replicas=2)
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == "my/upscaler:2"
    assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 7200


def test_deployment_from_a_bare_spec_has_no_owner_and_optional_fields_are_left_out():
    s = ToolSpec.model_validate({"tool": {"kind": "upscale", "name": "up"}})
    d = resources.build_worker_deployment(s, NS, "img")
    assert "ownerReferences" not in d["metadata"]
    pod = d["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod and "resources" not in pod["containers"][0]


def test_probes_can_be_left_out():
    c = resources.build_worker_deployment(pool(), NS, "img", probes=False)["spec"]["template"]["spec"]["containers"][0]
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(c)


def test_a_spec_change_changes_the_pod_template():
    a = resources.build_worker_deployment(pool(), NS, "img")
    b = resources.build_worker_deployment(pool(maxAttempts=5), NS, "img")
    ha = a["spec"]["template"]["metadata"]["annotations"][constants.ANNOTATION_SPEC_HASH]
    hb = b["spec"]["template"]["metadata"]["annotations"][constants.ANNOTATION_SPEC_HASH]
    assert ha != hb


def test_config_map_carries_the_pool_as_the_workers_genq_yaml():
    import yaml

    from genq.tools import registry_from_dict

    cm = resources.build_worker_config_map(pool(), NS)
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    reg = registry_from_dict(yaml.safe_load(cm["data"]["genq.yaml"]))
    assert reg.names() == ["upscale"] and reg.get("upscale").concurrency_per_worker == 2


# -- how many workers -----------------------------------------------------------------------


@pytest.mark.parametrize("backlog, expected", [(0, 0), (1, 1), (2, 1), (3, 2), (8, 4), (100, 4)])
def test_backlog_over_concurrency_clamped_to_max(backlog, expected):
    assert scaling.desired_replicas(spec(), backlog, busy=0, idle_since=None, now=0) == expected


def test_min_workers_is_kept_when_idle():
    assert scaling.desired_replicas(spec(minWorkers=2), 0, 0, idle_since=0, now=1000, current=2) == 2


def test_scale_in_waits_for_the_delay():
    s = spec()  # scaleDownDelaySeconds 60
    assert scaling.desired_replicas(s, 0, 0, idle_since=None, now=100, current=3) == 3
    assert scaling.desired_replicas(s, 0, 0, idle_since=50, now=100, current=3) == 3
    assert scaling.desired_replicas(s, 0, 0, idle_since=40, now=100, current=3) == 0
    # partial scale-in too
    assert scaling.desired_replicas(s, 2, 0, idle_since=50, now=100, current=3) == 3
    assert scaling.desired_replicas(s, 2, 0, idle_since=40, now=100, current=3) == 1


def test_scale_up_is_immediate():
    assert scaling.desired_replicas(spec(), 6, 0, idle_since=None, now=0, current=1) == 3


def test_never_below_the_busy_workers():
    s = spec()
    assert scaling.desired_replicas(s, 0, busy=2, idle_since=0, now=1000, current=3) == 2
    # even with a lowered maxWorkers: the jobs finish first
    assert scaling.desired_replicas(spec(maxWorkers=1), 0, busy=3, idle_since=0, now=1000, current=3) == 3


def test_warm_keeps_one_up():
    s = spec()
    assert scaling.desired_replicas(s, 0, 0, idle_since=0, now=1000, warm_until=1001, current=1) == 1
    assert scaling.desired_replicas(s, 0, 0, idle_since=0, now=1000, warm_until=999, current=1) == 0
    assert scaling.desired_replicas(s, 0, 0, idle_since=None, now=1000, warm_until=1001, current=0) == 1


def test_idle_since_starts_when_workers_are_surplus_and_resets_when_needed():
    s = spec()
    assert scaling.idle_since_next(s, 0, current=2, idle_since=None, now=10) == 10
    assert scaling.idle_since_next(s, 0, current=2, idle_since=10, now=20) == 10
    assert scaling.idle_since_next(s, 4, current=2, idle_since=10, now=30) is None
    assert scaling.idle_since_next(s, 0, current=0, idle_since=None, now=30) is None


# -- which pods a scale-in takes ----------------------------------------------------------


def running_job(worker: str) -> dict:
    return {"spec": {"tool": "upscale"}, "status": {"worker": worker, "conditions": [
        {"type": "Started", "status": "True"}, {"type": "Succeeded", "status": "Unknown", "reason": "Running"}]}}


def test_running_jobs_are_recognised():
    assert scaling.is_running(running_job("w"))
    done = running_job("w")
    done["status"]["conditions"][1]["status"] = "True"
    assert not scaling.is_running(done)
    assert not scaling.is_running({"status": {"conditions": [{"type": "Queued", "status": "True"}]}})


def test_busy_pods_from_worker_ids():
    pods = ["upscale-workers-5d8f-abcde", "upscale-workers-5d8f-fghij", "upscale-workers-5d8f-klmno"]
    busy = scaling.busy_by_pod("upscale", [
        "upscale-upscale-workers-5d8f-abcde-1-0a1b2c", "upscale-upscale-workers-5d8f-abcde-1-ffffff",
        "upscale-upscale-workers-5d8f-klmno-7-123456", "upscale-elsewhere-1-aaaaaa"], pods)
    assert busy == {"upscale-workers-5d8f-abcde": 2, "upscale-workers-5d8f-klmno": 1}


def test_idle_pods_are_cheapest_to_delete():
    costs = scaling.deletion_costs(["a", "b", "c"], {"b": 2, "c": 1})
    assert costs["a"] < costs["c"] < costs["b"]
    assert costs["a"] == scaling.IDLE_COST and costs["c"] >= scaling.BUSY_COST


def test_only_changed_costs_are_patched():
    pods = [
        {"metadata": {"name": "a", "annotations": {constants.POD_DELETION_COST: "0"}}},
        {"metadata": {"name": "b", "annotations": {constants.POD_DELETION_COST: "0"}}},
        {"metadata": {"name": "c"}},
    ]
    assert scaling.cost_patches(pods, {"b": 1}) == {"b": str(scaling.BUSY_COST + 1), "c": "0"}


# -- status -------------------------------------------------------------------------------


def conds(status: dict) -> dict:
    return {c["type"]: c for c in status["conditions"]}


def test_status_reports_counts_and_conditions():
    dep = {"spec": {"replicas": 2}, "status": {"readyReplicas": 1}}
    st = conditions.pool_status(generation=3, previous=None, desired=2, deployment=dep, queued=5, running=1,
                                selector="genq.io/tool=upscale", now=0, avg_duration=2.5)
    assert st["replicas"] == 2 and st["readyReplicas"] == 1 and st["queued"] == 5 and st["running"] == 1
    assert st["observedGeneration"] == 3 and st["selector"] == "genq.io/tool=upscale"
    assert st["avgDurationSeconds"] == 2.5
    c = conds(st)
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", conditions.WORKERS_STARTING)
    assert (c["Active"]["status"], c["Active"]["reason"]) == ("True", conditions.JOBS_QUEUED)
    assert all(x["observedGeneration"] == 3 for x in c.values())


def test_status_when_idle_and_scaled_to_zero():
    st = conditions.pool_status(generation=1, previous=None, desired=0, deployment={"spec": {"replicas": 0}, "status": {}},
                                queued=0, running=0, selector="s", now=0)
    c = conds(st)
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("True", conditions.SCALED_TO_ZERO)
    assert (c["Active"]["status"], c["Active"]["reason"]) == ("False", conditions.IDLE)


def test_backlog_unknown_keeps_the_numbers():
    prev = {"queued": 4, "running": 2}
    st = conditions.pool_status(generation=1, previous=prev, desired=1, deployment={"status": {"readyReplicas": 1}},
                                queued=None, running=None, selector="s", now=0)
    assert st["queued"] == 4 and st["running"] == 2
    assert conds(st)["Active"]["status"] == "Unknown" and conds(st)["Ready"]["reason"] == conditions.WORKERS_READY


def test_transition_time_moves_only_with_the_status():
    a = conditions.set_condition([], "Ready", "True", "WorkersReady", "", generation=1, now=0)
    b = conditions.set_condition(a, "Ready", "True", "WorkersReady", "x", generation=2, now=100)
    assert b[0]["lastTransitionTime"] == a[0]["lastTransitionTime"] and b[0]["observedGeneration"] == 2
    c = conditions.set_condition(b, "Ready", "False", "WorkersStarting", "", generation=2, now=100)
    assert c[0]["lastTransitionTime"] != a[0]["lastTransitionTime"]


def test_reasons_are_camel_case():
    import re

    names = [v for k, v in vars(conditions).items() if k.isupper() and isinstance(v, str)]
    assert names and all(re.fullmatch(r"[A-Z][A-Za-z0-9]*", n) for n in names), names


def test_operator_settings_from_env_pass_genq_settings_to_workers(monkeypatch):
    import os

    from genq.settings import Settings

    for k in list(os.environ):  # only what this test sets
        if k.startswith("GENQ_") or k == "POD_NAMESPACE":
            monkeypatch.delenv(k)
    for k, v in {
        "GENQ_NATS_URL": "nats://nats:4222", "GENQ_S3_BUCKET": "b", "GENQ_ADMIN_KEY": "secret",
        "GENQ_OPERATOR_WORKER_IMAGE": "w:1", "GENQ_OPERATOR_NAMESPACES": "a,b", "GENQ_OPERATOR_WORKER_PROBES": "false",
        "HOME": "/root"}.items():
        monkeypatch.setenv(k, v)
    c = Settings().operator
    assert c.worker_env == {"GENQ_NATS_URL": "nats://nats:4222", "GENQ_S3_BUCKET": "b"}
    assert c.worker_image == "w:1" and c.namespaces == ["a", "b"] and c.worker_probes is False


def test_no_handler_puts_a_finalizer_on_toolpools():
    """helm uninstall deletes the operator with the ToolPools: a pool carrying the
    operator's finalizer then stays Terminating for ever (seen on the real node). The
    scaler's timer would make kopf add one; the registry must not ask for it."""
    import types

    from genq.operator.handlers import make_registry
    from genq.settings import OperatorSettings

    registry = make_registry(types.SimpleNamespace(), OperatorSettings())
    spawning = registry._spawning.get_all_handlers()
    assert spawning, "the scaler's timer is registered"
    assert not any(h.requires_finalizer for h in spawning)
    assert not any(h.requires_finalizer for h in registry._changing.get_all_handlers())
