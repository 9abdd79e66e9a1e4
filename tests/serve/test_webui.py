"""The web UI in a real browser: headless Chromium driven by Playwright against a `weitiao webui` process.
Screenshots land in test-artifacts/webui/."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_lora_adapter

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "webui"

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def webui(tmp_path_factory, tiny_model, tiny_adapter):
    workdir = tmp_path_factory.mktemp("webui")
    port = free_port()
    log = (workdir / "webui.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "weitiao", "webui", str(tiny_model), "--adapter", f"tuned={tiny_adapter}",
         "--port", str(port), "--runs-dir", str(workdir / "runs"), "--threads", "1"],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        process.kill()
        raise AssertionError("the web UI did not start:\n" + (workdir / "webui.log").read_text())
    yield url, workdir
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.skip("needs Chromium (make test installs it)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, webui):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(webui[0])
    page.wait_for_selector("#prompt textarea", timeout=60_000)
    yield page
    page.close()


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def record_bot_text(page, chatbot: str) -> None:
    """Note every length the chatbot's last reply takes, to see it grow token by token."""
    page.evaluate("""(selector) => {
        window.replyLengths = [];
        const target = document.querySelector(selector);
        new MutationObserver(() => {
            const replies = target.querySelectorAll('[data-testid="bot"]');
            if (replies.length) window.replyLengths.push(replies[replies.length - 1].innerText.length);
        }).observe(target, {subtree: true, childList: true, characterData: true});
    }""", chatbot)


def finished_reply(page, chatbot: str) -> str:
    """The chatbot's last reply once it has stopped changing."""
    def stable():
        first = page.locator(f"{chatbot} [data-testid='bot']").all_inner_texts()
        time.sleep(1.0)
        second = page.locator(f"{chatbot} [data-testid='bot']").all_inner_texts()
        return second[-1] if second and second == first and second[-1].strip() else None

    return wait_for(stable, 60, f"a reply in {chatbot}")


def test_chat_streams_the_reply(page):
    record_bot_text(page, "#chat-a")
    page.fill("#prompt textarea", "Hello there")
    page.press("#prompt textarea", "Enter")
    reply = finished_reply(page, "#chat-a")
    assert page.locator("#chat-a [data-testid='user']").all_inner_texts() == ["Hello there"]
    lengths = page.evaluate("window.replyLengths")
    assert len(set(lengths)) >= 3 and max(lengths) == len(reply), lengths  # it grew in several steps
    screenshot(page, "chat.png")


def test_side_by_side_sends_one_prompt_to_two_models(page):
    page.locator("#side-by-side input").check()
    page.wait_for_selector("#chat-b", state="visible")
    page.fill("#prompt textarea", "Tell me a story")
    page.press("#prompt textarea", "Enter")
    base, tuned = finished_reply(page, "#chat-a"), finished_reply(page, "#chat-b")
    assert base != tuned
    assert "tuned" in page.locator("#chat-b").inner_text()  # the second panel is labelled with its model
    for chatbot in ("#chat-a", "#chat-b"):
        assert page.locator(f"{chatbot} [data-testid='user']").all_inner_texts() == ["Tell me a story"]
    screenshot(page, "side_by_side.png")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    train, evaluation = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1)}) + "\n"
                             for i in range(16)))
    evaluation.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "output": str(i + 1)}) + "\n"
                                  for i in range(20, 24)))
    return train, evaluation


def fill_training_form(page, dataset, run_name: str, max_steps: int) -> None:
    page.get_by_role("tab", name="Train").click()
    page.fill("#run-name input, #run-name textarea", run_name)
    page.fill("#train-file input, #train-file textarea", str(dataset[0]))
    page.fill("#eval-file input, #eval-file textarea", str(dataset[1]))
    page.fill("#max-steps input", str(max_steps))
    page.fill("#batch-size input", "2")


def drawn_loss_lines(page) -> int:
    """Lines the loss plot has actually drawn (an SVG path with a stroke and at least two points)."""
    paths = page.locator("#loss-plot path[aria-roledescription='line mark']")
    return sum(1 for i in range(paths.count())
               if paths.nth(i).get_attribute("stroke") and "L" in (paths.nth(i).get_attribute("d") or ""))


def test_training_run_plots_its_loss_live_and_the_eval_tab_shows_its_report(page, webui, dataset):
    runs = webui[1] / "runs"
    fill_training_form(page, dataset, "tiny-run", max_steps=6)
    page.click("#start-training")
    wait_for(lambda: "Running" in page.inner_text("#train-status"), 30, "the run to start")
    wait_for(lambda: drawn_loss_lines(page) >= 1, 120, "a loss curve")
    status = wait_for(lambda: re.search(r"Finished|Failed", page.inner_text("#train-status"))
                      and page.inner_text("#train-status"), 180, "the run to end")
    assert "Finished" in status, page.inner_text("#train-log textarea")
    wait_for(lambda: drawn_loss_lines(page) == 2, 10, "training and validation curves")
    assert (runs / "tiny-run" / "adapter_config.json").is_file() and (runs / "tiny-run" / "report.md").is_file()
    logged_steps = [r["step"] for r in map(json.loads, (runs / "tiny-run" / "metrics.jsonl").read_text().splitlines())
                    if "loss" in r]
    assert logged_steps == [2, 4, 6]
    assert f"Report: {runs / 'tiny-run' / 'report.md'}" in page.input_value("#train-log textarea")  # weitiao train's
    screenshot(page, "train.png")

    page.get_by_role("tab", name="Eval").click()
    page.fill("#run-picker input", str(runs / "tiny-run"))
    page.press("#run-picker input", "Enter")
    wait_for(lambda: "Evaluation: base vs fine-tuned" in page.inner_text("#report"), 30, "the report")
    assert "eval loss (response tokens)" in page.inner_text("#report")
    page.wait_for_selector("#loss-image img", timeout=30_000)
    page.wait_for_selector("#metrics-image img", timeout=30_000)
    screenshot(page, "eval.png")


def test_a_training_run_can_be_stopped(page, webui, dataset):
    fill_training_form(page, dataset, "stopped-run", max_steps=100_000)
    page.click("#start-training")
    wait_for(lambda: "step" in page.inner_text("#train-status"), 120, "the first logged step")
    page.click("#stop-training")
    wait_for(lambda: "Stopped" in page.inner_text("#train-status"), 30, "the run to stop")
    metrics = webui[1] / "runs" / "stopped-run" / "metrics.jsonl"

    def logged() -> int:  # a run stopped before its first logged step has written no metrics yet
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    lines = logged()
    time.sleep(3)
    assert logged() == lines  # nothing is training any more
    assert not (webui[1] / "runs" / "stopped-run" / "adapter_config.json").exists()


def test_an_adapter_attached_in_the_page_survives_a_reload_and_attaches_again(page, tmp_path, tiny_model):
    adapter = make_lora_adapter(tmp_path / "extra", tiny_model, seed=3)

    def attach():
        page.get_by_text("Attach an adapter").click()
        page.fill("#adapter-path input, #adapter-path textarea", str(adapter))
        page.get_by_role("button", name="Attach", exact=True).click()
        return wait_for(lambda: "extra" in page.inner_text("#attach-status") and page.inner_text("#attach-status"),
                        30, "the attach message")

    assert "Attached `extra`" in attach() or "Attached extra" in page.inner_text("#attach-status")
    page.reload()
    page.wait_for_selector("#prompt textarea", timeout=60_000)
    page.locator("#model-a input").click()
    wait_for(lambda: page.get_by_role("option", name="extra").count() == 1, 30, "'extra' in the model list")
    page.keyboard.press("Escape")
    assert "Attached" in attach()  # the same folder under the same name again is the adapter already attached


def test_stop_before_any_reply_leaves_no_empty_turn_for_the_model():
    from weitiao.serve.webui import answered

    user, empty = {"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}
    reply = {"role": "assistant", "content": "hello"}
    assert answered([user, empty]) == []
    assert answered([user, reply, {"role": "user", "content": "more"}, empty]) == [user, reply]
    assert answered([user, {"role": "assistant", "content": "half a rep"}]) == [
        user, {"role": "assistant", "content": "half a rep"}]  # a stopped reply with text stays


@pytest.mark.parametrize("name", ["../x", "a/b", "/tmp/x", "..", ".hidden", ""])
def test_run_names_cannot_leave_the_runs_folder(tmp_path, name):
    from weitiao.errors import WeitiaoError
    from weitiao.serve.webui import run_output_dir

    with pytest.raises(WeitiaoError, match="run name .* may only use letters"):
        run_output_dir(tmp_path / "runs", name)
    assert run_output_dir(tmp_path / "runs", " run-1.v2 ") == tmp_path / "runs" / "run-1.v2"


def test_the_eval_tab_shows_run_folders_only(tmp_path, monkeypatch):
    from weitiao.errors import WeitiaoError
    from weitiao.serve.webui import report_folder

    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert report_folder(runs, str(runs / "a")) == (runs / "a").resolve()
    assert report_folder(runs, "runs/a") == (runs / "a").resolve()
    for outside in ["/etc", str(runs / ".." / ".."), "runs/../..", "~"]:
        with pytest.raises(WeitiaoError, match="is not under the runs folder"):
            report_folder(runs, outside)


def test_the_web_ui_answers_only_requests_for_this_machine(webui):
    url = webui[0]
    port = url.rstrip("/").rsplit(":", 1)[1]
    assert httpx.get(url, headers={"Host": f"localhost:{port}"}).status_code == 200
    refused = httpx.get(url, headers={"Host": "rebind.example.com"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_host"
