"""web/index.html: headless Chromium loads the chat page, sends a message and sees the answer stream in."""
import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import pytest

from engine import Delta, Engine, LoadConfig, SamplingParams
from retrieval import Index
from serve import create_app, running_server
from tools import builtin_toolbox

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "bench" / "results" / "web_chat.png"        # git-ignored: look at it after a run
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")

# CI sets WORKSHOP_REQUIRE_BROWSER=1: there a missing browser fails the run instead of skipping the page's test
if os.environ.get("WORKSHOP_REQUIRE_BROWSER") and not (CHROMIUM and DRIVER):
    pytest.fail("chromium and chromedriver are missing, and CI requires the web page's test: setup.sh could not "
                "install them (apt-get install chromium chromium-driver)", pytrace=False)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test dependency (requirements-dev.txt)")
if not (CHROMIUM and DRIVER):
    pytest.skip("chromium and chromedriver are not installed (setup.sh installs Debian's chromium and "
                "chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def url(hello_ckpt):
    engine = Engine.load(LoadConfig(ckpt=str(hello_ckpt), chat="on"))
    with running_server(create_app(engine, SamplingParams(), "hello")) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-")
    # headless as root, and nothing that would try to reach the network (it would hang here)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1100,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def greedy_answer(base: str, text: str, max_tokens: int) -> str:
    body = json.dumps({"messages": [{"role": "user", "content": text}], "temperature": 0,
                       "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())["choices"][0]["message"]["content"]


def test_the_page_streams_an_answer_and_starts_a_new_chat(url, browser):
    browser.get(url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    assert "hello: chat model" in browser.find_element(By.ID, "model-info").text
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")                                   # greedy: the answer is known in advance
    max_tokens = int(browser.find_element(By.ID, "max_tokens").get_attribute("value"))

    browser.find_element(By.ID, "input").send_keys("hello 你好")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".message.assistant .meta"))   # the answer is complete
    bubble = browser.find_element(By.CSS_SELECTOR, ".message.assistant")
    shown = browser.execute_script("return arguments[0].firstChild.textContent", bubble)
    assert shown == greedy_answer(url, "hello 你好", max_tokens)
    assert int(bubble.get_attribute("data-chunks")) > 3           # it arrived piece by piece
    assert "tokens/s" in bubble.find_element(By.CLASS_NAME, "meta").text
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []


@pytest.fixture(scope="module")
def tools_url(hello_ckpt, tmp_path_factory):
    """A server with the calculator and documents, whose model is scripted: a calculator call, then an answer."""
    engine = Engine.load(LoadConfig(ckpt=str(hello_ckpt), chat="on"))
    docs = tmp_path_factory.mktemp("docs")
    (docs / "zorbia.md").write_text("The capital of Zorbia is Quellin.\n", encoding="utf-8")
    script = ['<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>', "2+3 = 5."]
    prompts = []

    def stream(ids, params, *args, **kwargs):
        prompts.append(engine.tokenizer.decode(ids[0]))
        text = script.pop(0)
        for n in range(0, len(text), 4):
            yield Delta(0, text[n:n + 4], n // 4 + 1, "stop" if n + 4 >= len(text) else None)
    # the tiny model's 48-token context holds no tool schema: the prompt is the messages as JSON, never run
    engine.stream, engine.room = stream, lambda length: 10_000
    engine.chat_ids = lambda messages, tools=None: engine.tokenizer.encode(json.dumps(messages, ensure_ascii=False))
    app = create_app(engine, SamplingParams(), "scripted", toolbox=builtin_toolbox(["calculator"]),
                     index=Index.from_folder(docs), docs_k=1)
    with running_server(app) as base:
        yield base, prompts


def test_the_page_shows_a_tool_call_its_result_and_the_sources(tools_url, browser):
    base, prompts = tools_url
    browser.get(base + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    assert "tools: calculator; documents" in browser.find_element(By.ID, "model-info").text
    browser.find_element(By.ID, "input").send_keys("What is 2+3 in Zorbia?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".message.assistant .meta"))
    assert browser.find_element(By.CSS_SELECTOR, ".message.tool").text == 'calculator({"expression": "2+3"})\n-> 5'
    answer = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    assert browser.execute_script("return arguments[0].firstChild.textContent", answer) == "2+3 = 5."
    assert "[zorbia.md#0] The capital of Zorbia is Quellin." in answer.find_element(By.CLASS_NAME, "sources").text
    assert '"role": "tool"' in prompts[1] and '"content": "5"' in prompts[1]    # the result went back to the model


def test_the_report_card_renders_with_its_pictures(tiny_pretrained, tmp_path, browser):
    """pipeline.py's weight/report.html, from a real (tiny) pretraining folder and SFT metrics, in Chromium:
    every picture decodes, the numbers and the sample answers are on the page, escaped as text."""
    import shutil as sh

    import pipeline
    from report import write_report
    from tokenizer import Tokenizer
    weight = tmp_path / "weight"
    sh.copytree(tiny_pretrained / "ckpt", weight / "pretrain")                 # its real log.csv and tokenizer
    example = {"family": "upper", "prompt": "Uppercase:\nbold", "expected": "BOLD", "correct": False}
    sft = {"accuracy": 0.5, "accuracy_before": 0.0, "accuracy_by_family": {"upper": 0.5, "repeat": 1.0},
           "accuracy_by_family_before": {"upper": 0.0, "repeat": 0.0},
           "examples": [{**example, "answer": "<b>BOL</b>"}], "examples_before": [{**example, "answer": "bold bold"}]}
    results = {"pretrain": {"val_bpb": 2.5, "val_bpb_en": 2.5, "val_bpb_zh": None}, "sft": sft,
               "seconds": {"pretrain": 3.0, "sft": 5.0}, "estimate": {"pretrain": 4.0, "sft": 4.0}}
    page = write_report(weight / "report.html", results, pipeline.summary_rows(results), weight, "cpu", "float32",
                        Tokenizer.load(tiny_pretrained / "tok.json"), {"English": "hello world " * 50})
    browser.get(page.as_uri())
    images = browser.find_elements(By.TAG_NAME, "img")
    # the pretraining curves, the per-family chart, the times: each a PNG that decoded to a real picture
    assert len(images) >= 3
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 100", img)
               for img in images), "a picture of the report card did not decode"
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "0.0% -> 50.0%" in text and "held-out exact match" in text
    assert "<b>BOL</b>" in text and "bold bold" in text        # the model's answer shown as it wrote it
    assert "bytes per token, English" in text
    shot = SCREENSHOT.with_name("report_card.png")
    browser.set_window_size(1100, 2400)
    assert browser.save_screenshot(str(shot))
    browser.set_window_size(1100, 700)
