"""Scale-out deployment: policy_gen replicas the trainer lists, and a learner group of GPUs.

k8s: policy-gen is a StatefulSet behind a headless Service (stable per-replica DNS names)
beside its normal Service; the trainer's `services.policy_urls` name exactly its replicas (in
prod by fully qualified name in the overlay's namespace); the RayJob's GPU worker group holds
`learner.num_workers` GPUs. Compose: two policy-gen replicas on GPUs 0 and 1, both listed.
Everything is read from what the real `kubectl kustomize` renders and parsed by the trainer's
own CLI (tests/_deploy_support.trainer_config); each check is a function that returns the
problems it finds, and a hand-broken manifest shows it finds them.
"""

from __future__ import annotations

import copy
import re
import shlex
from urllib.parse import urlparse

import pytest
import yaml
from _deploy_support import (
    REPO,
    as_argv,
    labels_match,
    load_compose,
    pod_templates,
    settings_from_argv,
    trainer_config,
    user_env,
)
from test_deploy_k8s import OVERLAYS, base_docs, by_kind, render, resolve_in_cluster
from test_deploy_k8s_startup import _admitted

from services.common.identity import is_valid_run_id

POLICY_GEN, HEADLESS = "policy-gen", "policy-gen-headless"


@pytest.fixture(scope="module", params=["base", *OVERLAYS])
def docs(request) -> tuple[str, list[dict]]:
    return request.param, base_docs() if request.param == "base" else render(request.param)


def _namespace(docs: list[dict]) -> str | None:
    return next((d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"), None)


def _trainer_cfg(docs: list[dict]):
    (job,) = by_kind(docs, "RayJob").values()
    return trainer_config(shlex.split(job["spec"]["entrypoint"]))


def policy_url_problems(docs: list[dict], *, fqdn: bool) -> list[str]:
    """Why the trainer's policy_urls are not exactly policy-gen's replicas (empty: they are).

    Expected: `http://policy-gen-<i>.policy-gen-headless[.<ns>.svc.cluster.local]:<port>` for
    i in 0..replicas-1, in order; `fqdn` demands the fully qualified form in the namespace.
    """
    sts = by_kind(docs, "StatefulSet")[POLICY_GEN]
    svc = by_kind(docs, "Service").get(sts["spec"]["serviceName"])
    if svc is None:
        return [f"serviceName {sts['spec']['serviceName']} names no Service"]
    (port,) = [p["port"] for p in svc["spec"]["ports"] if p["name"] == "http"]
    suffix = f".{_namespace(docs)}.svc.cluster.local" if fqdn else ""
    replicas = sts["spec"].get("replicas", 1)
    expected = [f"http://{POLICY_GEN}-{i}.{svc['metadata']['name']}{suffix}:{port}" for i in range(replicas)]
    urls = _trainer_cfg(docs).services.policy_urls
    problems = [] if urls == expected else [f"services.policy_urls {urls} != the {replicas} replicas {expected}"]
    problems += [f"{u} resolves to no policy-gen replica" for u in urls
                 if resolve_in_cluster(u, docs, _namespace(docs)) is not sts]
    return problems


def _gpus(container: dict, which: str) -> int:
    return int(container["resources"].get(which, {}).get("nvidia.com/gpu", 0))


def learner_group_problems(docs: list[dict]) -> list[str]:
    """Why the RayJob's worker pods cannot hold learner.num_workers GPU learners (empty: they can)."""
    (job,) = by_kind(docs, "RayJob").values()
    cfg, problems, total = _trainer_cfg(docs), [], 0
    for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        limit, request = _gpus(c, "limits"), _gpus(c, "requests")
        advertised = int(g["rayStartParams"].get("num-gpus", limit))
        if not limit == request == advertised:
            problems.append(f"{g['groupName']}: nvidia.com/gpu limit {limit} / request {request} / num-gpus {advertised} differ")
        if not g["minReplicas"] == g["replicas"] == g["maxReplicas"]:
            problems.append(f"{g['groupName']}: a learner pod the autoscaler removes breaks the NCCL group")
        total += g["replicas"] * advertised
    if total and total != cfg.learner.num_workers:
        problems.append(f"worker groups hold {total} GPUs, learner.num_workers is {cfg.learner.num_workers}")
    return problems


# ---------------------------------------------------------------- k8s: policy-gen replicas


def test_policy_gen_is_a_statefulset_behind_a_headless_and_a_normal_service(docs):
    where, docs = docs
    assert POLICY_GEN not in by_kind(docs, "Deployment"), f"{where}: policy-gen moved to a StatefulSet"
    sts = by_kind(docs, "StatefulSet")[POLICY_GEN]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    services = by_kind(docs, "Service")
    headless, normal = services[sts["spec"]["serviceName"]], services[POLICY_GEN]
    assert headless["metadata"]["name"] == HEADLESS and headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True, "names resolve while vLLM loads"
    assert normal["spec"]["type"] == "ClusterIP" and normal["spec"].get("clusterIP") != "None", "other clients keep it"
    for svc in (headless, normal):
        assert labels_match({"matchLabels": svc["spec"]["selector"]}, pod_labels)
    # Parallel: replica 1 must not wait for replica 0's 15-minute vLLM load; no surge, no HPA.
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    hpa_targets = {h["spec"]["scaleTargetRef"]["kind"] for h in by_kind(docs, "HorizontalPodAutoscaler").values()}
    assert "StatefulSet" not in hpa_targets, f"{where}: an HPA would fight the replica list the trainer holds"
    if where != "dev":
        (pdb,) = [p for p in by_kind(docs, "PodDisruptionBudget").values() if labels_match(p["spec"]["selector"], pod_labels)]
        assert pdb["spec"]["maxUnavailable"] == 1, "drains proceed one replica at a time"


def test_trainer_lists_exactly_the_policy_gen_replicas(docs):
    where, docs = docs
    assert policy_url_problems(docs, fqdn=where == "prod") == []
    if where == "prod":
        sts = by_kind(docs, "StatefulSet")[POLICY_GEN]
        assert sts["spec"]["replicas"] >= 2, "prod shows the scale-out: several replicas"
        assert _trainer_cfg(docs).services.policy_urls[1] == \
            "http://policy-gen-1.policy-gen-headless.crs-rlhf.svc.cluster.local:8000"


def test_a_replica_list_out_of_step_with_the_statefulset_is_caught():
    docs = render("prod")
    more = copy.deepcopy(docs)
    by_kind(more, "StatefulSet")[POLICY_GEN]["spec"]["replicas"] = 3
    assert any("!= the 3 replicas" in p for p in policy_url_problems(more, fqdn=True))
    moved = copy.deepcopy(docs)
    (ns,) = by_kind(moved, "Namespace").values()
    ns["metadata"]["name"] = "elsewhere"  # the URLs still say .crs-rlhf.
    assert policy_url_problems(moved, fqdn=True)
    assert policy_url_problems(docs, fqdn=False), "prod must use fully qualified names"


def test_trainer_pods_reach_each_replica_and_prometheus_scrapes_each_once():
    docs = render("prod")
    sts = by_kind(docs, "StatefulSet")[POLICY_GEN]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in by_kind(docs, "NetworkPolicy").values() if labels_match(p["spec"]["podSelector"], pod_labels)]
    (job,) = by_kind(docs, "RayJob").values()
    port = urlparse(_trainer_cfg(docs).services.policy_urls[0]).port
    for ray_pod in pod_templates(job):
        assert any(_admitted(p, ray_pod["metadata"]["labels"], port) for p in policies), "trainer -> replica pod"
    assert not any(_admitted(p, {"app": "stranger"}, port) for p in policies)
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    scraped = {n for n, s in by_kind(docs, "Service").items() if labels_match(monitor["spec"]["selector"], s["metadata"]["labels"])}
    assert POLICY_GEN in scraped and HEADLESS not in scraped, "two Services over the same pods: scrape one"


# ---------------------------------------------------------------- k8s: the learner group


def test_rayjob_gpu_worker_group_holds_the_learner_group(docs):
    where, docs = docs
    assert learner_group_problems(docs) == []
    (job,) = by_kind(docs, "RayJob").values()
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (c,) = group["template"]["spec"]["containers"]
    num_workers = _trainer_cfg(docs).learner.num_workers
    if where == "dev":
        assert group["rayStartParams"]["num-gpus"] == "0" and not _gpus(c, "limits"), "dev's learner runs on a CPU"
        assert num_workers == 1
    else:
        assert group["replicas"] * _gpus(c, "limits") == num_workers == (2 if where == "prod" else 1)
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group["template"]["spec"]["tolerations"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/dev/shm" in mounts, "NCCL between the pod's GPUs goes through shared memory"
    assert "nodeSelector" in (REPO / "k8s/overlays/prod/patch-rayjob-learner-group.yaml").read_text(), "hook for GPU pools"


def test_a_learner_group_the_worker_pods_cannot_hold_is_caught():
    docs = render("prod")
    (job,) = by_kind(docs, "RayJob").values()
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["rayStartParams"]["num-gpus"] = "1"
    assert any("differ" in p for p in learner_group_problems(docs))
    group["template"]["spec"]["containers"][0]["resources"] = {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    assert any("hold 1 GPUs, learner.num_workers is 2" in p for p in learner_group_problems(docs))
    group["maxReplicas"] = 3
    assert any("autoscaler" in p for p in learner_group_problems(docs))


def test_prod_run_name_labels_the_runs_requests():
    cfg = _trainer_cfg(render("prod"))
    assert cfg.run.name and is_valid_run_id(cfg.run.name) and cfg.run_id == cfg.run.name


# ---------------------------------------------------------------- docker compose


def test_compose_runs_two_policy_gen_replicas_on_two_gpus_and_the_trainer_lists_both(tmp_path, monkeypatch):
    gpu = load_compose("docker-compose.yml")["services"]
    replicas = [n for n in gpu if n == POLICY_GEN or n.startswith(POLICY_GEN + "-")]
    assert replicas == [POLICY_GEN, "policy-gen-1"]
    devices = [gpu[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for n in replicas]
    assert devices == [["0"], ["1"]], "one GPU each by default"
    settings = []
    for n in replicas:
        env = {k: str(v) for k, v in gpu[n]["environment"].items()}
        settings.append(settings_from_argv(POLICY_GEN, as_argv(gpu[n]["command"]), env, tmp_path, monkeypatch))
    assert settings[0] == settings[1], "the replicas serve the same model the same way"
    cfg = trainer_config(as_argv(gpu["trainer"]["command"]))
    hosts = [(urlparse(u).hostname, urlparse(u).port) for u in cfg.services.policy_urls]
    assert hosts == [(n, s.port) for n, s in zip(replicas, settings, strict=True)], "each replica by its compose name"
    assert all(gpu["trainer"]["depends_on"][n]["condition"] == "service_healthy" for n in replicas)
    # The Ray head holds the learner's GPUs: one device per learner worker.
    assert len(gpu["ray-head"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]) == cfg.learner.num_workers
    host_ports = {str(gpu[n]["ports"][0]).rsplit(":", 2)[1] for n in replicas}
    assert len(host_ports) == 2, "each replica publishes its own host port"
    moved = load_compose("docker-compose.yml", env=user_env(GPU_POLICY_GEN_1="3"))["services"]["policy-gen-1"]
    assert moved["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["3"]
    cpu = load_compose("docker-compose.yml", "docker-compose.cpu.yml")["services"]
    for n in replicas:
        assert "deploy" not in cpu[n] and "--device" in as_argv(cpu[n]["command"])
    assert trainer_config(as_argv(cpu["trainer"]["command"])).services.policy_urls == cfg.services.policy_urls


# ---------------------------------------------------------------- docs


def test_deploy_docs_walk_through_two_nodes():
    text = (REPO / "docs/deploy.md").read_text()
    assert "](scaling.md" in text, "link the scaling guide"
    for needle in ("learner.num_workers", "services.policy_urls", "run.name", "num-gpus", "policy-gen-headless",
                   "GPU_POLICY_GEN_1", "crs_run_requests", "count: 2"):
        assert needle in text, f"docs/deploy.md should explain {needle}"
    # The two-node patch in the docs is a valid trainer run whose sizes agree with its own text.
    (block,) = re.findall(r"after the change:\n\n```yaml\n(.*?)\n```", text, re.DOTALL)
    ops = {op["path"]: op for op in yaml.safe_load(block)}
    cfg = trainer_config(shlex.split(ops["/spec/entrypoint"]["value"]))
    gpus = int(ops["/spec/rayClusterSpec/workerGroupSpecs/0/rayStartParams/num-gpus"]["value"])
    resources = ops["/spec/rayClusterSpec/workerGroupSpecs/0/template/spec/containers/0/resources"]["value"]
    assert cfg.learner.num_workers == gpus == int(resources["limits"]["nvidia.com/gpu"])
    (count,) = re.findall(r"replicas: \[\{name: policy-gen, count: (\d+)\}\]", text)
    assert cfg.services.policy_urls == [f"http://policy-gen-{i}.policy-gen-headless.crs-rlhf.svc.cluster.local:8000"
                                        for i in range(int(count))]
    assert is_valid_run_id(cfg.run.name)
