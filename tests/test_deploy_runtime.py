"""What the deployment relies on at run time, run for real here (issue 15).

- a reward service whose model cannot load exits non-zero (Docker/k8s then restart it);
- /metrics needs the key and exports the metric the prod HPAs scale on, under the name the
  prometheus-adapter rule serves it as;
- the shell snippets of the manifests (prepare-volume Job, wait-for-volume init containers)
  do what they say, run by `sh` against a temporary folder standing in for /data;
- the trainer image's login-shell PATH (KubeRay 1.2-1.3 start containers with `bash -lc`).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from _deploy_support import REPO, pod_templates
from test_deploy_k8s import render

from services.common.process import ServiceProcess, free_port, python_module

KEY = "runtime-test-key"


# ---------------------------------------------------------------- reward services


def test_reward_service_that_cannot_load_exits_nonzero(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()  # a folder passes the settings check; loading it fails in the lifespan
    port = free_port()
    log = tmp_path / "reward.log"
    svc = ServiceProcess(python_module("services.reward_abs", "--model-path", str(empty), "--port", str(port),
                                       "--device", "cpu"), port, log_path=log, name="reward_abs")
    svc.start()
    try:
        code = svc.proc.wait(timeout=120)
    finally:
        svc.stop()
    assert code == 1, log.read_text()[-2000:]
    assert "the model failed to load" in log.read_text()


def test_metrics_need_the_key_and_export_what_the_hpa_scales_on(tiny_models, tmp_path):
    hpa = next(d for d in render("prod") if d["kind"] == "HorizontalPodAutoscaler")
    (metric,) = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    # The adapter serves Prometheus series under `name.as`; Prometheus keeps the exported name.
    rule = yaml.safe_load((REPO / "k8s/monitoring/prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    (served,) = [r for r in rule if r["name"]["as"] == metric]
    series = re.match(r"(\w+)\{", served["seriesQuery"]).group(1)
    assert re.fullmatch(served["name"]["matches"], series)
    assert set(served["resources"]["overrides"]) == {"namespace", "pod"}, "per-pod, as a Pods metric needs"

    port = free_port()
    argv = python_module("services.reward_abs", "--model-path", str(tiny_models["reward_abs"]), "--port", str(port),
                         "--device", "cpu", "--api-key", KEY)
    with ServiceProcess(argv, port, log_path=tmp_path / "reward.log", name="reward_abs") as svc:
        assert httpx.get(svc.url + "/metrics", timeout=30).status_code == 401, "the ServiceMonitor must send the key"
        r = httpx.get(svc.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200
    gauges = {line.split()[2] for line in r.text.splitlines() if line.startswith("# TYPE ") and line.endswith(" gauge")}
    assert series in gauges, f"{series} is not a gauge the service exports: {sorted(gauges)}"
    (monitor,) = [d for d in render("prod") if d["kind"] == "ServiceMonitor"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {"name": "crs-api-key", "key": "api-key"}


# ---------------------------------------------------------------- the manifests' shell snippets


def _script(doc: dict, container: str) -> str:
    for t in pod_templates(doc):
        for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]:
            if c["name"] == container:
                assert c["command"][:2] == ["sh", "-c"]
                return c["command"][2]
    raise AssertionError(f"{doc['metadata']['name']} has no container {container}")


def _run(script: str, data: Path, timeout: float = 20, **kw) -> subprocess.CompletedProcess:
    # The snippets name /data literally; point them at a scratch folder instead.
    return subprocess.run(["sh", "-c", _at(script, data)], capture_output=True, text=True, timeout=timeout, check=False, **kw)


def _at(script: str, data: Path) -> str:
    return re.sub(r"/data(?![\w-])", str(data), script)  # /data and /data/..., not /datasets


def test_prepare_volume_lays_out_a_fresh_volume_and_explains_ownership(tmp_path):
    docs = render("prod")
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "prepare-volume")
    script = _script(job, "prepare-volume")
    data = tmp_path / "data"
    data.mkdir()
    for _ in range(2):  # idempotent: a second run on a laid-out volume succeeds too
        out = _run(script, data)
        assert out.returncode == 0, out.stderr
    assert {p.name for p in data.iterdir()} == {"models", "datasets", "runs"}
    assert all(p.stat().st_mode & 0o2070 == 0o2070 for p in data.iterdir()), "setgid + group rwx"
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the volume root should be")  # mkdir fails, even for root
    out = _run(script, blocked)
    assert out.returncode == 1 and "chown 10001:10001" in out.stderr and "fsGroup" in out.stderr


def test_wait_for_volume_waits_until_the_layout_and_model_exist(tmp_path):
    docs = render("prod")
    dep = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "policy-gen")
    script = _script(dep, "wait-for-volume").replace("sleep 10", "sleep 0.2")
    data = tmp_path / "data"
    (data / "models/policy").mkdir(parents=True)
    proc = subprocess.Popen(["sh", "-c", _at(script, data)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert proc.poll() is None, "must wait while /data/runs and the model are missing"
        (data / "runs").mkdir()
        (data / "models/policy/config.json").write_text("{}")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "waiting for" in proc.stdout.read()


# ---------------------------------------------------------------- the trainer image's login shell


def test_login_shell_path_finds_ray_and_crs_rlhf(tmp_path):
    """KubeRay 1.2-1.3 run `bash -lc 'ray start ...'`; Debian's /etc/profile resets PATH.

    Emulated here: a clean environment with the PATH the Dockerfile sets, Debian's own
    /etc/profile (this machine's, bookworm like the image's base), then the profile.d file the
    image installs, with /opt/venv pointed at this checkout's venv."""
    text = (REPO / "docker/Dockerfile.trainer").read_text()
    (copy,) = [line for line in text.splitlines() if line.startswith("COPY") and "/etc/profile.d/" in line]
    src = REPO / copy.split()[-2]
    env_path = re.search(r"ENV PATH=(\S+)", text).group(1).replace("$PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    venv = Path(os.environ.get("VIRTUAL_ENV") or REPO / ".venv")
    if not (venv / "bin/ray").exists() or not Path("/etc/profile").exists():
        pytest.skip("needs this checkout's venv with ray, and a Debian /etc/profile")
    snippet = tmp_path / "crs-venv.sh"
    snippet.write_text(src.read_text().replace("/opt/venv", str(venv)))

    def login(extra: str) -> subprocess.CompletedProcess:
        path = env_path.replace("/opt/venv", str(venv))
        script = f". /etc/profile; {extra} command -v ray crs-rlhf"
        return subprocess.run(["env", "-i", f"PATH={path}", "HOME=/tmp", "bash", "--noprofile", "--norc", "-c", script],
                              capture_output=True, text=True, timeout=30, check=False)

    without = login("")
    assert without.returncode != 0, "Debian's /etc/profile no longer resets PATH: this test lost its point"
    found = login(f". {snippet};")
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [str(venv / "bin/ray"), str(venv / "bin/crs-rlhf")]
