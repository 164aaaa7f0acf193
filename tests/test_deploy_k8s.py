"""k8s/ manifests agree with the services and the trainer, and are valid Kubernetes (issue 6).

Checked on the base files as written (always) and on the dev/prod overlays as `kubectl
kustomize` renders them (when kubectl is installed; skipped loudly otherwise). Schema
validation uses kubernetes-validate's bundled schemas (offline, strict: unknown fields fail);
the KubeRay RayJob is a CRD, so its pod templates are validated as core PodTemplates.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from urllib.parse import urlparse

import pytest
import yaml

from tests._deploy_support import (
    MODEL_SERVICES,
    REPO,
    SETTINGS,
    build_routes,
    env_names,
    field_env_names,
    labels_match,
    load_manifests,
    pod_templates,
    settings_from_argv,
    trainer_config,
)

K8S = REPO / "k8s"
K8S_VERSION = "1.30"
OVERLAYS = ("dev", "prod")
API_KEY_SECRET = "crs-api-key"


def base_docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    return [d for name in kustomization["resources"] for d in load_manifests(K8S / "base" / name)]


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: overlays not rendered (the base is still checked structurally)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kustomize build k8s/overlays/{overlay} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def routes() -> dict[str, set[str]]:
    return build_routes()


@pytest.fixture(scope="module", params=["base", *OVERLAYS])
def docs(request) -> tuple[str, list[dict]]:
    return request.param, base_docs() if request.param == "base" else render(request.param)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


# ---------------------------------------------------------------- files and rendering


def test_every_manifest_parses_and_every_reference_exists():
    for path in sorted(K8S.rglob("*.yaml")):
        data = list(yaml.safe_load_all(path.read_text()))
        if path.name == "kustomization.yaml":
            (k,) = data
            for ref in k.get("resources", []) + [p["path"] for p in k.get("patches", []) if "path" in p]:
                assert (path.parent / ref).exists(), f"{path}: {ref} does not exist"
        elif path.name.startswith("patch-"):
            assert all(isinstance(op, dict) and {"op", "path"} <= set(op) for op in data[0]), path
        else:
            for d in data:
                assert d["apiVersion"] and d["kind"] and d["metadata"]["name"], path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_into_one_namespace(overlay):
    docs = render(overlay)
    (ns,) = by_kind(docs, "Namespace")
    assert all(d["metadata"].get("namespace") == ns for d in docs if d["kind"] != "Namespace")
    gpu = [c for d in docs for t in pod_templates(d) for c in containers(t)
           if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})]
    secrets = by_kind(docs, "Secret")
    if overlay == "dev":
        assert not gpu, "the dev overlay runs on CPUs"
        assert not by_kind(docs, "HorizontalPodAutoscaler") and not by_kind(docs, "PodDisruptionBudget")
        assert set(secrets) == {API_KEY_SECRET}
        assert "make-tiny-models" in by_kind(docs, "Job")
    else:
        assert len(gpu) == 4, "reward-pref, reward-abs, policy-gen and the learner worker each take a GPU"
        assert not secrets, "prod's API key Secret is created out of band, never applied from git"
        assert all(by_kind(docs, "Deployment")[n]["spec"]["replicas"] == 2 for n in ("reward-pref", "reward-abs"))


# ---------------------------------------------------------------- structure (no cluster needed)


def test_selectors_ports_and_references_agree(docs):
    where, docs = docs
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    claims = set(by_kind(docs, "PersistentVolumeClaim"))
    for name, dep in deployments.items():
        assert labels_match(dep["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"]), f"{where}/{name}"
    for name, svc in services.items():
        targets = [d for d in deployments.values() if labels_match({"matchLabels": svc["spec"]["selector"]},
                                                                    d["spec"]["template"]["metadata"]["labels"])]
        assert len(targets) == 1, f"{where}: Service {name} selects {len(targets)} Deployments"
        port_names = {p["name"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    for kind in ("PodDisruptionBudget", "HorizontalPodAutoscaler"):
        for name, d in by_kind(docs, kind).items():
            target = d["spec"]["scaleTargetRef"]["name"] if kind.startswith("Horizontal") else None
            assert target is None or target in deployments
            if target is None:
                assert any(labels_match(d["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
                           for dep in deployments.values()), f"{where}: PDB {name} selects nothing"
    for d in docs:
        for t in pod_templates(d):
            for v in t["spec"].get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims
            for c in containers(t):
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    assert ref is None or (ref["name"], ref["key"]) == (API_KEY_SECRET, "api-key")
                mounts = {m["name"] for m in c.get("volumeMounts", [])}
                assert mounts <= {v["name"] for v in t["spec"].get("volumes", [])}, f"{where}/{c['name']}"
    (template_secret,) = load_manifests(K8S / "base/secret.example.yaml")
    assert template_secret["metadata"]["name"] == API_KEY_SECRET and "api-key" in template_secret["stringData"]


def test_only_the_trainer_reaches_the_model_services(docs):
    where, docs = docs
    (policy,) = by_kind(docs, "NetworkPolicy").values()
    selected = {n for n, d in by_kind(docs, "Deployment").items()
                if labels_match(policy["spec"]["podSelector"], d["spec"]["template"]["metadata"]["labels"])}
    assert selected == set(MODEL_SERVICES), where
    pod_rules = [f["podSelector"] for rule in policy["spec"]["ingress"] for f in rule["from"] if "podSelector" in f]
    trainer_pods = [t["metadata"]["labels"] for d in by_kind(docs, "RayJob").values() for t in pod_templates(d)]
    assert trainer_pods and all(any(labels_match(r, labels) for r in pod_rules) for labels in trainer_pods)
    others = [t["metadata"]["labels"] for k in ("Deployment", "Job") for d in by_kind(docs, k).values() for t in pod_templates(d)]
    assert not any(labels_match(r, labels) for r in pod_rules for labels in others), "only Ray pods are reward clients"
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {SETTINGS[s].model_fields["port"].default for s in MODEL_SERVICES}


# ---------------------------------------------------------------- agreement with the code


def test_containers_agree_with_service_settings(docs, routes, tmp_path, monkeypatch):
    where, docs = docs
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    for name in MODEL_SERVICES:
        pod = deployments[name]["spec"]["template"]
        (c,) = pod["spec"]["containers"]
        cls = SETTINGS[name]
        unknown = {n for n in env_names(c) if n.startswith("CRS_")} - field_env_names(cls)
        assert not unknown, f"{where}/{name}: {unknown} are not {cls.__name__} fields"
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        s = settings_from_argv(name, c["args"], {**env, "CRS_API_KEY": "k"}, tmp_path, monkeypatch)
        assert s.host == "0.0.0.0" and s.port == cls.model_fields["port"].default
        (port,) = c["ports"]
        assert port["containerPort"] == s.port == services[name]["spec"]["ports"][0]["port"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
        probes = {c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe") if p in c}
        assert probes <= routes[name], f"{where}/{name}: probe paths {probes - routes[name]} are not routes"
        assert pod["metadata"]["annotations"]["prometheus.io/path"] in routes[name]
        assert {"requests", "limits"} <= set(c["resources"]), f"{where}/{name}: set resources"
        if where != "dev":
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        else:
            assert s.device == "cpu"
        if name == "policy-gen":
            assert s.adapter_root == str(tmp_path / "data/runs")
            assert s.backend == ("hf" if where == "dev" else "vllm")


def test_rayjob_entrypoint_is_a_valid_trainer_run(docs):
    where, docs = docs
    (job,) = by_kind(docs, "RayJob").values()
    cfg = trainer_config(shlex.split(job["spec"]["entrypoint"]))
    services = by_kind(docs, "Service")
    for url in [cfg.services.policy_url, *cfg.services.reward_pref_urls, *cfg.services.reward_abs_urls]:
        u = urlparse(url)
        assert u.hostname in services, f"{where}: {url} names no Service"
        assert u.port == services[u.hostname]["spec"]["ports"][0]["port"]
    cluster = job["spec"]["rayClusterSpec"]
    for params in [cluster["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in cluster["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in params.values()), "KubeRay's rayStartParams is map[string]string"
    import ray

    assert cluster["rayVersion"] == ray.__version__, "the Ray cluster version must match the image's ray"
    for t in pod_templates(job):
        mounts = {m["mountPath"]: m for c in t["spec"]["containers"] for m in c["volumeMounts"]}
        assert "/data" in mounts and not mounts["/data"].get("readOnly"), "the trainer writes runs under /data"
        assert "CRS_API_KEY" in env_names(t["spec"]["containers"][0])
    if where == "dev":
        assert cfg.run.data_source == "fixture"


# ---------------------------------------------------------------- Kubernetes schemas


def test_manifests_validate_against_kubernetes_schemas(docs):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (bundled k8s schemas)")
    where, docs = docs
    checked = 0
    for d in docs + (load_manifests(K8S / "base/secret.example.yaml") if where == "base" else []):
        if d["kind"] == "RayJob":
            # A CRD: validate what Kubernetes itself will run, its pod templates.
            for i, t in enumerate(pod_templates(d)):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"ray-{i}"}, "template": t}
                kv.validate(wrapped, K8S_VERSION, strict=True)
                checked += 1
            continue
        try:
            kv.validate(d, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{where}: {d['kind']}/{d['metadata']['name']}: {e}")
        checked += 1
    assert checked >= 10


def test_schema_validation_catches_a_typo():
    """Guard against a validator that accepts anything: a misspelled field must fail."""
    kv = pytest.importorskip("kubernetes_validate")
    dep = next(d for d in base_docs() if d["kind"] == "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)
