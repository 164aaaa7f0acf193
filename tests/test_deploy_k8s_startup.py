"""The overlays start on a fresh cluster (issue 15), checked on what the real kustomize renders.

Item by item: (1) the volume is laid out before anything needs it; (2, 7) start-up order and
one start-up budget; (5) a resubmitted RayJob resumes; (6) metrics are scraped with the key;
(8) the RWX claim names a class, pods do not re-chown the volume; (9) the Ray head's ports are
closed to other pods; (10) no replica count fights the HPA; and the labels, the submitter
pod and the GPU count in docs/deploy.md. The shell snippets run for real in
test_deploy_runtime.py.
"""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from _deploy_support import (
    REPO,
    SETTINGS,
    labels_match,
    pod_templates,
    settings_from_argv,
    submitter_template,
    trainer_config,
)
from test_deploy_k8s import OVERLAYS, by_kind, containers, probe_targets, render, workloads

RAY_PORTS = {6379, 8265, 10001}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def _settings(dep: dict, tmp_path, monkeypatch):
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    return settings_from_argv(dep["metadata"]["name"], c["args"], {**env, "CRS_API_KEY": "k"}, tmp_path, monkeypatch)


def _init(template: dict, name: str) -> dict:
    (c,) = [c for c in template["spec"].get("initContainers", []) if c["name"] == name]
    return c


# ---------------------------------------------------------------- (1) the volume


def test_volume_is_laid_out_before_anything_needs_it(rendered, tmp_path, monkeypatch):
    where, docs = rendered
    job = by_kind(docs, "Job")["prepare-volume"]
    (t,) = pod_templates(job)
    (c,) = t["spec"]["containers"]
    assert {m["mountPath"]: m.get("readOnly", False) for m in c["volumeMounts"]} == {"/data": False}
    assert t["spec"]["securityContext"]["runAsUser"] == 10001 and t["spec"]["securityContext"]["runAsNonRoot"]
    script = c["command"][2]
    assert re.search(r"for d in models datasets runs", script)
    assert "policy-gen" in workloads(docs)
    for name, dep in workloads(docs).items():
        s = _settings(dep, tmp_path, monkeypatch)
        wait = _init(dep["spec"]["template"], "wait-for-volume")["command"][2]
        model = c_args_value(dep, "--model-path")
        assert f"{model}/config.json" in wait, f"{where}/{name} must wait for its own model"
        if name == "policy-gen":
            assert s.adapter_root and "[ -d /data/runs ]" in wait, "--adapter-root must exist before policy_gen starts"
    (job_doc,) = by_kind(docs, "RayJob").values()
    head = pod_templates(job_doc)[0]
    wait = _init(head, "wait-for-volume")
    assert "[ -w /data/runs ]" in wait["command"][2], "the trainer writes its run folder there"


def c_args_value(dep: dict, flag: str) -> str:
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    return args[args.index(flag) + 1]


# ---------------------------------------------------------------- (2, 7) start-up order and budget


def test_one_start_up_budget_and_a_patient_rayjob(tmp_path, monkeypatch):
    docs = render("prod")
    policy = by_kind(docs, "StatefulSet")["policy-gen"]
    s = _settings(policy, tmp_path, monkeypatch)
    assert s.backend == "vllm"
    (c,) = policy["spec"]["template"]["spec"]["containers"]
    startup = c["startupProbe"]
    assert probe_targets(startup, s.port) == [(s.port, "/ready")], "/health answers at once: it guards nothing"
    probe_budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert s.vllm_startup_timeout_s <= probe_budget <= s.vllm_startup_timeout_s + 120, \
        "the probe outlasts vLLM's own deadline a little, so policy_gen's clear exit message comes first"
    (job,) = by_kind(docs, "RayJob").values()
    cfg = trainer_config(shlex.split(job["spec"]["entrypoint"]))
    assert cfg.run.step_timeout_s >= s.vllm_startup_timeout_s, "the trainer waits as long as vLLM may load"
    assert job["spec"]["backoffLimit"] >= 1, "a failed attempt is retried on a fresh cluster"
    assert job["spec"]["submitterConfig"]["backoffLimit"] >= 1
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # The image and compose use the same budget.
    dockerfile = (REPO / "docker/Dockerfile.policy-gen").read_text()
    assert f"CRS_VLLM_STARTUP_TIMEOUT_S={s.vllm_startup_timeout_s:.0f}" in dockerfile
    assert f"--start-period={s.vllm_startup_timeout_s:.0f}s" in dockerfile


# ---------------------------------------------------------------- (5) resume


def test_rayjob_resumes_by_default(rendered):
    where, docs = rendered
    (job,) = by_kind(docs, "RayJob").values()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[argv.index("--resume") + 1] == "auto", f"{where}: resume explicitly, whatever the config says"
    assert trainer_config(argv).run.resume == "auto"
    assert "delete" in (REPO / "k8s/base/trainer-rayjob.yaml").read_text().lower(), \
        "say that a finished RayJob must be deleted and re-created"


# ---------------------------------------------------------------- (6) metrics


def test_service_monitor_scrapes_every_model_service_with_the_key():
    docs = render("prod")
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    services = by_kind(docs, "Service")
    picked = {n for n, svc in services.items() if labels_match(monitor["spec"]["selector"], svc["metadata"]["labels"])}
    assert picked == set(SETTINGS)
    for endpoint in monitor["spec"]["endpoints"]:
        assert all(endpoint["port"] in {p["name"] for p in services[n]["spec"]["ports"]} for n in picked)
        assert endpoint["authorization"]["type"] == "Bearer"
    assert not by_kind(render("dev"), "ServiceMonitor"), "dev clusters have no Prometheus Operator CRDs"
    metrics = [m for h in by_kind(docs, "HorizontalPodAutoscaler").values() for m in h["spec"]["metrics"]]
    assert {m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"} == {"crs_queue_items"}


# ---------------------------------------------------------------- (8) storage


def test_rwx_claim_names_a_class_and_pods_do_not_rechown_the_volume(rendered):
    where, docs = rendered
    (pvc,) = by_kind(docs, "PersistentVolumeClaim").values()
    if where == "prod":
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"].get("storageClassName")
    for d in docs:
        for t in pod_templates(d):
            sc = t["spec"]["securityContext"]
            if "fsGroup" in sc:
                assert sc.get("fsGroupChangePolicy") == "OnRootMismatch", f"{where}: {d['metadata']['name']}"


# ---------------------------------------------------------------- (9) the Ray head's ports


def _admitted(policy: dict, labels: dict, port: int) -> bool:
    """Does this NetworkPolicy let a pod with `labels` (in some namespace) reach `port`?"""
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        for peer in rule.get("from", []):
            if "podSelector" in peer and labels_match(peer["podSelector"], labels):
                return True  # with or without a namespaceSelector ({} = any namespace)
        if not rule.get("from"):
            return True
    return False


def test_ray_pods_refuse_everyone_but_ray_the_submitter_and_the_operator(rendered):
    where, docs = rendered
    policies = by_kind(docs, "NetworkPolicy")
    (job,) = by_kind(docs, "RayJob").values()
    ray_pods = [t["metadata"]["labels"] for t in pod_templates(job)]
    guarding = [p for p in policies.values() if all(labels_match(p["spec"]["podSelector"], lb) for lb in ray_pods)]
    assert len(guarding) == 1, f"{where}: one NetworkPolicy must select every Ray pod"
    (policy,) = guarding
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    submitter = submitter_template(job)["metadata"]["labels"]
    strangers = [t["metadata"]["labels"] for k in ("Deployment", "StatefulSet", "Job") for d in by_kind(docs, k).values()
                 for t in pod_templates(d)] + [{}, {"app": "anything"}]
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    for port in RAY_PORTS:
        assert all(_admitted(policy, lb, port) for lb in ray_pods), "Ray pods reach each other"
        assert not any(_admitted(policy, lb, port) for lb in strangers), f"{where}: port {port} is open to other pods"
        assert _admitted(policy, submitter, port) == (port == 8265), "the submitter needs the job API only"
        assert _admitted(policy, operator, port) == (port == 8265), "the operator polls the job API only"
    assert submitter.get("crs-rlhf.io/reward-client") != "true", "the submitter is no reward client"


# ---------------------------------------------------------------- (10) replicas


def test_no_replica_count_fights_the_hpa():
    docs = render("prod")
    deployments = by_kind(docs, "Deployment")
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind(docs, "HorizontalPodAutoscaler").values()}
    assert scaled == {"reward-pref", "reward-abs"}
    for name in scaled:
        assert "replicas" not in deployments[name]["spec"], f"{name}: every apply would reset what the HPA scaled to"
    for overlay in OVERLAYS:
        k = yaml.safe_load((REPO / "k8s/overlays" / overlay / "kustomization.yaml").read_text())
        assert not ({r["name"] for r in k.get("replicas", [])} & scaled)


# ---------------------------------------------------------------- labels, submitter, sizing


def test_labels_reach_every_pod_template_and_the_submitter_is_restricted(rendered):
    where, docs = rendered
    for d in docs:
        templates = pod_templates(d) + [t for t in [submitter_template(d)] if t]
        for t in templates:
            assert t["metadata"]["labels"].get("app.kubernetes.io/part-of") == "crs-rlhf", f"{where}: {d['metadata']['name']}"
    (job,) = by_kind(docs, "RayJob").values()
    sub = submitter_template(job)
    assert sub["spec"]["securityContext"]["runAsNonRoot"] and sub["spec"]["securityContext"]["seccompProfile"]
    (c,) = sub["spec"]["containers"]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert "CRS_API_KEY" not in {e["name"] for e in c.get("env", [])}, "`ray job submit` needs no key"
    for t in pod_templates(job):
        assert all(c.get("securityContext", {}).get("allowPrivilegeEscalation") is False for c in containers(t))


def test_gpu_count_in_the_docs_matches_prod():
    docs = render("prod")
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in by_kind(docs, "HorizontalPodAutoscaler").values()}

    def gpus(t: dict) -> int:
        return sum(int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) for c in t["spec"]["containers"])

    steady, surge = 0, 0
    for name, dep in by_kind(docs, "Deployment").items():
        n = hpas[name]["spec"]["minReplicas"] if name in hpas else dep["spec"].get("replicas", 1)
        per_pod = gpus(dep["spec"]["template"])
        steady += n * per_pod
        if per_pod and dep["spec"].get("strategy", {}).get("type", "RollingUpdate") == "RollingUpdate":
            surge = max(surge, per_pod * int(dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"]))
    for sts in by_kind(docs, "StatefulSet").values():  # replaced pod by pod, never surging
        assert sts["spec"]["updateStrategy"]["type"] == "RollingUpdate" and "maxSurge" not in str(sts["spec"])
        steady += sts["spec"]["replicas"] * gpus(sts["spec"]["template"])
    for job in by_kind(docs, "RayJob").values():
        groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        steady += gpus(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])
        steady += sum(g["replicas"] * gpus(g["template"]) for g in groups)
    assert (steady, surge) == (8, 1), "2 + 2 reward replicas, 2 policy-gen replicas, a learner group of 2"
    text = (REPO / "docs/deploy.md").read_text()
    assert f"{steady} GPUs" in text and f"{steady + surge} GPUs" in text
