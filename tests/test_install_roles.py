"""Dependencies by role (pyproject): the base install is the serving stack, training and
evaluation are extras, and the service images install the base only.

- services/ imports nothing of the train/eval extras (checked with those packages made
  unimportable in a fresh interpreter, as they are in the reward and policy_gen images);
- the reward image's install set, resolved by pip from exactly what docker/Dockerfile.reward
  installs, holds no Ray, datasets, matplotlib (the compose suite builds the image for real).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
from _deploy_support import REPO
from packaging.requirements import Requirement

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# What the issue names as the trainer's weight; none of it may reach a service image.
HEAVY = {"ray", "datasets", "matplotlib", "sentence-transformers", "tensorboard", "scikit-learn", "scipy"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extra_reqs(*extras: str) -> list[Requirement]:
    reqs = [Requirement(d) for e in extras for d in PROJECT["optional-dependencies"][e]]
    return [r for r in reqs if norm(r.name) != "crs-rlhf"]


def closure(names: set[str]) -> set[str]:
    """Installed distributions `names` pull in (their unconditional requirements, recursively)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def test_base_install_is_the_serving_stack_and_extras_hold_the_rest():
    base = {norm(Requirement(d).name) for d in PROJECT["dependencies"]}
    assert {"torch", "transformers", "peft", "fastapi", "uvicorn", "pydantic", "pydantic-settings",
            "prometheus-client", "httpx"} <= base
    assert not base & HEAVY, f"serving install carries {sorted(base & HEAVY)}"
    train_eval = {norm(r.name) for r in extra_reqs("train", "eval")}
    assert HEAVY - {"scikit-learn"} <= train_eval  # scikit-learn arrives with sentence-transformers
    # dev (what ./dev and CI install) brings training and evaluation with the test tools.
    dev = {str(Requirement(d)) for d in PROJECT["optional-dependencies"]["dev"]}
    assert "crs-rlhf[eval,train]" in {str(Requirement(d)) for d in dev} or "crs-rlhf[train,eval]" in dev


def test_services_import_nothing_of_the_train_and_eval_extras():
    """Every service's entry and app module imports with the extras' packages (those the base
    install does not pull in anyway) and our upper packages unimportable."""
    base = closure({Requirement(d).name for d in PROJECT["dependencies"]})
    absent = {norm(r.name) for r in extra_reqs("train", "eval")} - base
    assert {"ray", "datasets", "matplotlib", "sentence-transformers"} <= absent
    blocked = {mod for mod, dists in md.packages_distributions().items() if any(norm(d) in absent for d in dists)}
    blocked |= {"trainer", "evaluation", "crs_rlhf"}
    assert {"ray", "datasets", "matplotlib", "sentence_transformers"} <= blocked
    modules = [f"services.{s}.{m}" for s in ("reward_pref", "reward_abs", "policy_gen") for m in ("__main__", "app")]
    modules += ["services.reward_shared.__main__", "services.policy_gen.hf_backend", "services.reward.engine"]
    probe = f"""
import sys
BLOCKED = set({sorted(blocked)!r})
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the serving install)", name=name)
sys.meta_path.insert(0, Block())
import importlib
for m in {modules!r}:
    importlib.import_module(m)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_blocker_catches_a_service_that_imports_the_trainer(tmp_path):
    """The probe above can fail: a service module importing ray is refused the same way."""
    pkg = tmp_path / "svc_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import ray\n")
    probe = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray":
            raise ModuleNotFoundError(name, name=name)
sys.meta_path.insert(0, Block())
import svc_probe
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr


def _reward_build_stage() -> list[str]:
    from test_deploy import dockerfile_stages

    (build,) = [st for st in dockerfile_stages(REPO / "docker/Dockerfile.reward") if any(" -r " in line for line in st)]
    return build


def test_reward_image_copies_only_the_services():
    sources = set()
    for line in (REPO / "docker/Dockerfile.reward").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources |= {p.rstrip("/") for p in line.split()[1:-1] if not p.startswith("--")}
    assert sources == {"docker/constraints.txt", "pyproject.toml", "README.md", "services", "docker/healthcheck.py"}, sources


@pytest.mark.slow
def test_reward_image_install_set_has_no_trainer_packages(tmp_path):
    """pip resolves (--dry-run --report) exactly the reward Dockerfile's two installs: torch, then
    the requirements its own one-liner reads from pyproject, both under docker/constraints.txt."""
    build = _reward_build_stage()
    gen = next(line for line in build if "tomllib" in line)
    code = re.search(r'python -c "(.*?)"\s*>', gen).group(1).replace("\\\\n", "\\n")
    code = code.replace("/src/pyproject.toml", str(REPO / "pyproject.toml"))
    reqs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {"torch", "fastapi", "peft"} <= {norm(Requirement(r).name) for r in reqs}
    torch_line = next(line for line in build if "pip install" in line and " torch" in line)
    torch_reqs = [w for w in shlex.split(torch_line.split("pip install", 1)[1]) if not w.startswith(("-", "$", "/"))]
    assert torch_reqs == ["torch"], torch_line
    (tmp_path / "requirements.txt").write_text("\n".join(reqs) + "\n")
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
           "-c", str(REPO / "docker/constraints.txt"), *torch_reqs, "-r", str(tmp_path / "requirements.txt")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0 and re.search(r"Could not find a version|connection|Network is unreachable", out.stderr):
        pytest.skip(f"no package index reachable: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr[-3000:]
    names = {norm(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    assert {"torch", "transformers", "peft", "fastapi", "uvicorn", "prometheus-client"} <= names
    assert not names & (HEAVY | {"pyarrow", "pandas"}), sorted(names & (HEAVY | {"pyarrow", "pandas"}))
