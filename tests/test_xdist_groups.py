"""The two-process main tier (`./dev test`) relies on pytest-xdist keeping an `xdist_group` on one
worker: the vLLM and Ray tests share one server / cluster there. With pytest 9 and xdist 3.8 the
groups were silently ignored (every test scheduled on its own), which started vLLM twice."""

from __future__ import annotations

import os
import subprocess
import sys

CONFTEST = '''
import os, pytest

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):  # as tests/conftest.py assigns groups
    for item in items:
        item.add_marker(pytest.mark.xdist_group("heavy" if "heavy" in item.name else item.module.__name__))

@pytest.fixture(autouse=True)
def _record_worker(request):
    with open(os.environ["WORKERS_LOG"], "a") as f:
        f.write(f"{request.node.name} {os.environ.get('PYTEST_XDIST_WORKER')}\\n")
'''
TESTS = "import time\n" + "".join(f"def test_{kind}_{i}(): time.sleep(0.2)\n" for kind in ("heavy", "light") for i in range(4))


def test_an_xdist_group_runs_on_one_worker(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_mixed.py").write_text(TESTS)
    (tmp_path / "test_other.py").write_text(TESTS.replace("test_", "test_o_"))
    log = tmp_path / "workers.log"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "WORKERS_LOG": str(log)}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in log.read_text().splitlines()]
    assert len(rows) == 16
    heavy = {worker for name, worker in rows if "heavy" in name}
    assert len(heavy) == 1, f"the 'heavy' group ran on {sorted(heavy)}: xdist ignored the groups"
    for module in ("test_light", "test_o_light"):
        assert len({worker for name, worker in rows if name.startswith(module)}) == 1
