"""The annotation server as a real process: its JSON API over HTTP, then the page in a real
browser (Playwright driving Debian's headless chromium)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from evaluation.human.tasks import prompt_sequence, response_order
from services.common.process import ServiceProcess, free_port, python_module

MODELS = ["abs", "crs", "pref"]
KEY = "s3cret-key"
XSS_PROMPT = '<script>window.__xss = "script"</script>'
XSS_OUTPUT = "<img src=x onerror=\"window.__xss = 'img'\">"


def instruction(i: int) -> str:
    return f"question {i}: {XSS_PROMPT} is shown as text"


def output(model: str, i: int) -> str:
    return f"{model} answers {i}" + (f" {XSS_OUTPUT}" if model == "abs" else "")


@pytest.fixture()
def eval_dir(tmp_path) -> Path:
    (tmp_path / "outputs").mkdir()
    for m in MODELS:
        rows = [
            {"id": i, "instruction": instruction(i), "output": output(m, i), "generator": m, "dataset": "t"}
            for i in range(5)
        ]
        (tmp_path / "outputs" / f"{m}.json").write_text(json.dumps(rows))
    # Prompts 1, 2, 4 are the human split; 0 and 3 belong to another split and must not show up.
    split = {0: "judge", 1: "human", 2: "human", 3: "judge", 4: "human"}
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"id": i, "split": s}) + "\n" for i, s in split.items()))
    return tmp_path


def server(eval_dir: Path, port: int, api_key: str | None = KEY) -> ServiceProcess:
    argv = python_module(
        "evaluation.human.annotate",
        "--dir",
        str(eval_dir),
        "--models",
        ",".join(MODELS),
        "--prompts-split",
        "human",
        "--groups",
        "2",
        "--port",
        str(port),
    )
    if api_key:
        argv += ["--api-key", api_key]
    return ServiceProcess(argv, port, log_path=eval_dir / f"server-{port}.log", startup_timeout=60, name="annotate")


def rows(eval_dir: Path) -> list[dict]:
    path = eval_dir / "annotations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_api_auth_validation_and_restart(eval_dir):
    port = free_port()
    auth = {"authorization": f"Bearer {KEY}"}
    who = {"annotator": "ann", "group": "1"}
    with server(eval_dir, port) as svc:
        cfg = httpx.get(svc.url + "/api/config").json()
        assert cfg == {"title": "Rank the responses", "auth_required": True, "groups": ["1", "2"], "k": 3, "total": 3}
        shell = httpx.get(svc.url + "/")  # the page shell carries no data, so it needs no key
        assert shell.status_code == 200 and "script-src 'self'" in shell.headers["content-security-policy"]
        r = httpx.get(svc.url + "/api/session", params=who)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]

        s = httpx.get(svc.url + "/api/session", params=who, headers=auth).json()
        assert (s["total"], s["done"], s["next_index"]) == (3, 0, 0)
        item = httpx.get(svc.url + "/api/items/0", params=who, headers=auth).json()
        pid = item["prompt_id"]
        assert pid == prompt_sequence(0, "1", "ann", ["1", "2", "4"])[0]
        order = response_order(0, "1", "ann", pid, MODELS)
        assert [r["text"] for r in item["responses"]] == [output(m, int(pid)) for m in order]
        assert item["ranking"] is None

        def submit(ranking, **over):
            body = {**who, "prompt_id": pid, "ranking": ranking, **over}
            return httpx.post(svc.url + "/api/annotations", json=body, headers=auth)

        for bad, words in [
            ({"1": 1, "2": 2}, "missing Response 3"),
            ({"1": 1, "2": 2, "3": 3, "4": 4}, "unknown Response 4"),
            ({"1": 2, "2": 2, "3": 3}, "gap"),
            ({"1": 1, "2": "x", "3": 2}, "whole number"),
            ({"1": 1, "2": 5, "3": 2}, "from 1 to 3"),
        ]:
            r = submit(bad)
            assert r.status_code == 400 and words in r.json()["error"]["message"], (bad, r.text)
        assert submit({"1": 1, "2": 1, "3": 2}, group="9").json()["error"]["message"].startswith("unknown group '9'")
        assert submit({"1": 1, "2": 1, "3": 2}, prompt_id="0").status_code == 404  # not in the human split
        assert submit({"1": 1, "2": 1, "3": 2}, annotator="  ").status_code == 400
        r = httpx.post(
            svc.url + "/api/annotations", content=b"{not json", headers={**auth, "content-type": "application/json"}
        )
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        assert httpx.get(svc.url + "/api/items/7", params=who, headers=auth).status_code == 404
        assert rows(eval_dir) == []  # nothing invalid was stored

        assert submit({"1": 1, "2": 3, "3": 1}).json() == {"saved": True, "done": 1, "total": 3}
        assert submit({"1": 2, "2": 1, "3": 2}).json()["done"] == 1  # a change, not a new answer

    with server(eval_dir, port) as svc:  # a restart: the file is the state
        s = httpx.get(svc.url + "/api/session", params=who, headers=auth).json()
        assert (s["done"], s["next_index"]) == (1, 1)
        item = httpx.get(svc.url + "/api/items/0", params=who, headers=auth).json()
        assert item["ranking"] == {"1": 2, "2": 1, "3": 2}
    got = rows(eval_dir)
    assert [r["ranking"] for r in got] == [
        {order[0]: 1, order[1]: 3, order[2]: 1},
        {order[0]: 2, order[1]: 1, order[2]: 2},
    ]
    assert all(r["order"] == order and r["prompt_id"] == pid and r["source"] == "page" for r in got)


def test_bad_settings_and_a_second_server_exit_with_a_message(eval_dir):
    import subprocess

    def run(*args: str) -> subprocess.CompletedProcess:
        argv = python_module("evaluation.human.annotate", "--dir", str(eval_dir), *args)
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    bad = run("--models", "abs,nope")
    assert bad.returncode == 2 and "outputs/nope.json" in bad.stderr and "Traceback" not in bad.stderr
    with server(eval_dir, free_port()):
        second = run("--models", ",".join(MODELS), "--port", str(free_port()))
    assert second.returncode == 2 and "already serves" in second.stderr


# ---------------------------------------------------------------- the page in a browser
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("SKIPPED LOUDLY: Playwright for Python is not installed: pip install playwright")
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("SKIPPED LOUDLY: no chromium at /usr/bin/chromium: apt install chromium")
    return sync_playwright


def test_page_in_a_real_browser(eval_dir):
    sync_playwright = _browser_or_skip()
    port = free_port()
    seq = prompt_sequence(0, "2", "ann", ["1", "2", "4"])
    orders = {pid: response_order(0, "2", "ann", pid, MODELS) for pid in seq}
    svc = server(eval_dir, port).__enter__()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            # bypass_csp: the page's Content-Security-Policy would stop an injected script anyway;
            # with it off, this test proves the page itself never turns response text into HTML.
            page = browser.new_page(bypass_csp=True)
            page.set_default_timeout(20_000)
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(svc.url + "/")

            # Log in: the key field is there because the server has --api-key; a wrong key is refused.
            assert page.is_visible("#key")
            page.fill("#name", "ann")
            page.select_option("#group", "2")
            page.fill("#key", "wrong")
            page.click("#start")
            page.wait_for_selector("#message.error")
            assert "API key" in page.text_content("#message")
            page.fill("#key", KEY)
            page.click("#start")
            page.wait_for_selector("#task:not([hidden])")
            assert page.text_content("#progress") == "1 of 3"

            def shown_prompt() -> str:
                text = page.text_content("#instruction")
                return text.split(":")[0].removeprefix("question ")

            def slow_item(route):
                time.sleep(0.5)
                route.continue_()

            def click_rank(key: str, rank: int):
                page.click(f'.card[data-key="{key}"] button[data-rank="{rank}"]')

            # HTML in prompts and responses is text: visible verbatim, no element created, nothing run.
            assert shown_prompt() == seq[0]
            assert XSS_PROMPT in page.text_content("#instruction")
            abs_key = str(orders[seq[0]].index("abs") + 1)
            assert XSS_OUTPUT in page.text_content(f'.card[data-key="{abs_key}"] .response-text')
            assert page.locator("#task img, #task script").count() == 0
            assert page.evaluate("window.__xss") is None and dialogs == []

            # An incomplete ranking and one with a gap: the server's 400 message is shown; nothing stored.
            click_rank("1", 1)
            click_rank("2", 1)
            page.click("#submit")
            page.wait_for_selector("#message.error")
            assert "missing Response 3" in page.text_content("#message")
            click_rank("1", 2)
            click_rank("2", 2)
            click_rank("3", 3)
            page.click("#submit")
            page.wait_for_function("document.getElementById('message').textContent.includes('gap')")
            assert rows(eval_dir) == []

            # Prompt 1: a tie for first (competition ranks 1, 1, 3), by clicks.
            click_rank("1", 1)
            click_rank("2", 1)
            page.click("#submit")
            page.wait_for_function("document.getElementById('progress').textContent === '2 of 3'")
            assert "Saved" in page.text_content("#message") and page.text_content("#done") == "1 answered"
            assert page.text_content("#state") == ""  # a prompt not answered yet

            # Prompt 2: keys (focus a response, press its rank) and a drag into rank 3.
            assert shown_prompt() == seq[1]
            page.focus('.card[data-key="1"]')
            page.keyboard.press("2")
            page.focus('.card[data-key="2"]')
            page.keyboard.press("1")
            page.drag_and_drop('.card[data-key="3"]', '.rank-row[data-rank="3"]')
            assert page.locator('.rank-row[data-rank="3"] .card[data-key="3"]').count() == 1
            page.click("#submit")
            page.wait_for_function("document.getElementById('progress').textContent === '3 of 3'")

            # A server restart and a reload: still logged in, still on prompt 3, answers kept.
            svc.stop()
            svc = server(eval_dir, port).__enter__()
            # Items answer slowly now, so a page that showed the task before its item had loaded
            # would be caught with an empty progress line (it once was, on a loaded CI machine).
            page.route("**/api/items/**", slow_item)
            page.reload()
            page.wait_for_selector("#task:not([hidden])")
            assert page.text_content("#progress") == "3 of 3" and shown_prompt() == seq[2]

            # Go back and change prompt 2's answer: the saved ranking is shown, then edited.
            page.click("#prev")
            page.wait_for_function("document.getElementById('progress').textContent === '2 of 3'")
            assert "saved ranking is shown" in page.text_content("#state")
            on = {k: page.get_attribute(f'.card[data-key="{k}"] button.on', "data-rank") for k in "123"}
            assert on == {"1": "2", "2": "1", "3": "3"}
            click_rank("3", 1)
            page.click("#submit")
            page.wait_for_function("document.getElementById('progress').textContent === '3 of 3'")

            # Without --api-key there is no key field, and a new annotator starts at their first prompt.
            svc.stop()
            svc = server(eval_dir, port, api_key=None).__enter__()
            page = browser.new_page(bypass_csp=True)
            page.goto(svc.url + "/")
            page.wait_for_selector("#login:not([hidden])")
            assert not page.is_visible("#key") and page.is_visible("#name")
            page.fill("#name", "bob")
            page.click("#start")
            page.wait_for_selector("#task:not([hidden])")
            assert page.text_content("#progress") == "1 of 3" and page.text_content("#done") == "0 answered"
            browser.close()
    finally:
        svc.stop()

    o1, o2 = orders[seq[0]], orders[seq[1]]
    got = [(r["prompt_id"], r["group"], r["annotator"], r["ranking"], r["order"]) for r in rows(eval_dir)]
    assert got == [
        (seq[0], "2", "ann", {o1[0]: 1, o1[1]: 1, o1[2]: 3}, o1),
        (seq[1], "2", "ann", {o2[0]: 2, o2[1]: 1, o2[2]: 3}, o2),
        (seq[1], "2", "ann", {o2[0]: 2, o2[1]: 1, o2[2]: 1}, o2),
    ]
