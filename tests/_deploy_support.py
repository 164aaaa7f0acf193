"""Offline readers for docker-compose files and k8s manifests, used by tests/test_deploy.py.

No Docker engine or cluster runs here, so this does the parts of `docker compose config`
and `kubectl kustomize` the tests need: Compose's ${VAR} interpolation and file merging
(including the `!reset` / `!override` tags), and loading every manifest document.
Merge rules follow the Compose spec's "Merge" section: mappings merge, sequences append,
`command`/`entrypoint`/`healthcheck.test` replace, `ports`/`volumes` merge by target.
"""

from __future__ import annotations

import os
import re
import shlex
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Reset:
    """`!reset`: remove the key from what earlier files set."""


@dataclass(frozen=True)
class Override:
    """`!override X`: replace the earlier value wholesale instead of merging."""

    value: Any


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor("!override", lambda loader, node: Override(_construct(loader, node)))

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(obj: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ (a literal $)."""
    if isinstance(obj, dict):
        return {k: interpolate(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, env) for v in obj]
    if isinstance(obj, Override):
        return Override(interpolate(obj.value, env))
    if not isinstance(obj, str):
        return obj

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        value = env.get(name)
        if op in (":-", "-"):
            return value if value not in (None, "") or (op == "-" and value is not None) else arg
        if op in (":?", "?") and not value:
            raise KeyError(f"compose would stop: ${{{name}}} unset ({arg})")
        return value or ""

    return _VAR.sub(sub, obj)


def _target(entry: Any, key: str) -> str:
    """The uniqueness key of a port or volume entry (its container-side target)."""
    if isinstance(entry, dict):
        return str(entry.get("target"))
    parts = str(entry).split(":")
    if key == "ports":
        return parts[-1]
    return parts[1] if len(parts) > 1 else parts[0]


def merge(base: Any, over: Any, key: str = "") -> Any:
    if isinstance(over, Override):
        return over.value
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if isinstance(v, Reset):
                out.pop(k, None)
            elif k in out and k not in ("command", "entrypoint", "test"):
                out[k] = merge(out[k], v, k)
            else:
                out[k] = v.value if isinstance(v, Override) else v
        return out
    if isinstance(base, list) and isinstance(over, list):
        if key in ("ports", "volumes"):
            replaced = {_target(e, key): e for e in over}
            kept = [e for e in base if _target(e, key) not in replaced]
            return kept + list(over)
        return base + over
    return over


# .env.example ships CRS_API_KEY empty (compose refuses it); the tests fill it in as a user must.
USER_KEY = "key-the-user-generated"


def user_env(**overrides: str) -> dict[str, str]:
    """.env after `cp .env.example .env` and setting the key."""
    return {**read_env_file(REPO / ".env.example"), "CRS_API_KEY": USER_KEY, **overrides}


def load_compose(*files: str, env: dict[str, str] | None = None) -> dict:
    """What `docker compose -f A -f B config` resolves to (model only, no normalisation)."""
    env = user_env() if env is None else env
    model: dict = {}
    for name in files:
        data = yaml.load((REPO / name).read_text(), Loader=ComposeLoader)
        model = merge(model, interpolate(data, env))
    # Extension fields (x-*) are for anchors only; compose drops them from the model too.
    return {k: v for k, v in model.items() if not k.startswith("x-")}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def mounts(service: dict) -> list[Mount]:
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append(Mount(str(v.get("source")), v["target"], bool(v.get("read_only"))))
            continue
        parts = str(v).split(":")
        out.append(Mount(parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


@dataclass(frozen=True)
class PortBinding:
    host_ip: str
    host_port: int
    container_port: int


def port_bindings(service: dict) -> list[PortBinding]:
    out = []
    for p in service.get("ports", []):
        parts = str(p).split(":")
        assert len(parts) == 3, f"port {p!r} must name its host address (ip:host:container)"
        out.append(PortBinding(parts[0], int(parts[1]), int(parts[2])))
    return out


def as_argv(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def load_manifests(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is not a mapping"
    return docs


def env_names(container: dict) -> list[str]:
    return [e["name"] for e in container.get("env", [])]


def pod_templates(doc: dict) -> list[dict]:
    """Every pod template in a workload: Deployments/Jobs, and a RayJob's head and workers."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [spec["template"]]
    if kind == "RayJob":
        cluster = spec["rayClusterSpec"]
        return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    return []


def labels_match(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions In/NotIn/Exists) against labels."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# ---------------------------------------------------------------- the truth, imported

DATA = "/data"  # where every container mounts the shared volume (configs/cluster/ppo.yaml relies on it)


def _settings_classes() -> dict[str, type]:
    from services.policy_gen.settings import PolicyGenSettings
    from services.reward_abs.settings import RewardAbsSettings
    from services.reward_pref.settings import RewardPrefSettings

    return {"reward-pref": RewardPrefSettings, "reward-abs": RewardAbsSettings, "policy-gen": PolicyGenSettings}


SETTINGS = _settings_classes()
MODEL_SERVICES = tuple(SETTINGS)


def field_env_names(cls: type) -> set[str]:
    return {f"CRS_{name.upper()}" for name in cls.model_fields}


def build_routes() -> dict[str, set[str]]:
    """Route paths of the real apps (built, not started: models load in the lifespan)."""
    from services.policy_gen.app import create_app as policy_app
    from services.reward_abs.app import create_app as abs_app
    from services.reward_pref.app import create_app as pref_app

    def paths(app) -> set[str]:
        return {r.path for r in app.routes}

    policy_settings = SETTINGS["policy-gen"](model_path=str(REPO), backend="hf")
    # The backend is never called: registering routes only sets attributes on it.
    return {
        "reward-pref": paths(pref_app(SETTINGS["reward-pref"](model_path="unused"))),
        "reward-abs": paths(abs_app(SETTINGS["reward-abs"](model_path="unused"))),
        "policy-gen": paths(policy_app(policy_settings, backend=types.SimpleNamespace())),
    }


def settings_from_argv(service: str, argv: list[str], env: dict[str, str], tmp_path: Path, monkeypatch):
    """Parse a container's command with the service's own parser; /data paths map to tmp dirs."""
    from services.common.settings import parse_settings
    from crs_rlhf.serve import SERVICES

    def local(arg: str) -> str:
        if arg.startswith(DATA + "/"):
            p = tmp_path / arg.lstrip("/")
            p.mkdir(parents=True, exist_ok=True)
            return str(p)
        return arg

    # Images run `python -m <module>`: the command starts with the service's module.
    modules = {m.removesuffix(".__main__"): name for name, m in SERVICES.items()}
    assert argv and argv[0] in modules, f"{service}: command must start with a service module, got {argv[:1]}"
    assert modules[argv[0]] == service, f"{service} runs {argv[0]}"
    for k in list(os.environ):
        if k.startswith("CRS_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return parse_settings(SETTINGS[service], [local(a) for a in argv[1:]])


def trainer_config(argv: list[str]):
    """`crs-rlhf train --config /app/configs/... [--set ...] [--resume auto]` -> the PPOConfig the
    real CLI would train with (its own parser and overrides run; `train` itself is stubbed)."""
    from trainer.ppo import driver
    from trainer.ppo.cli import main

    assert argv[:2] == ["crs-rlhf", "train"], argv
    args = list(argv[2:])
    i = args.index("--config") + 1
    assert args[i].startswith("/app/configs/"), "the trainer image ships configs/ at /app/configs"
    args[i] = str(REPO / args[i].removeprefix("/app/"))
    seen = []

    class Captured(Exception):
        pass

    def capture(cfg, *a, **kw):
        seen.append(cfg)
        raise Captured

    real, driver.train = driver.train, capture
    try:
        code = main(args)
    finally:
        driver.train = real
    assert seen, f"`crs-rlhf train {' '.join(args)}` exited {code} before training"
    return seen[0]


def submitter_template(doc: dict) -> dict | None:
    """A RayJob's submitterPodTemplate (the pod that runs `ray job submit`), if it sets one."""
    return doc.get("spec", {}).get("submitterPodTemplate") if doc["kind"] == "RayJob" else None
