"""Real-browser check of the K-LoRA accordion on a running WebUI (A1111 v1.10.1 / gradio 3.41, or Forge /
gradio 4.40), driven by Selenium with the distribution's headless Chromium (no browser download).

Opt-in: ``KLORA_BROWSER_URL=http://127.0.0.1:7860`` (the server, started with two LoRAs named by
``KLORA_BROWSER_CONTENT`` / ``KLORA_BROWSER_STYLE``, default ``klora_it_content`` / ``klora_it_style``). Selenium is
not a project requirement: install it in a separate venv (``python -m venv /work/browser-venv &&
/work/browser-venv/bin/pip install selenium pytest``) and run this file with that venv's pytest. Screenshots go to
``KLORA_SCREENSHOT_DIR`` (default: pytest's tmp dir), never into the repository.

What a user does: open the accordion (both pickers empty on a fresh page), pick the two LoRAs, see the preview
picture appear, move alpha and see it change, tick K-LoRA and "Show selection map", generate, see the map in the
gallery, send to img2img and see the K-LoRA controls filled there.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from klora_live import LiveServer, base_payload, klora

URL = os.environ.get("KLORA_BROWSER_URL", "").rstrip("/")
CONTENT = os.environ.get("KLORA_BROWSER_CONTENT", "klora_it_content")
STYLE = os.environ.get("KLORA_BROWSER_STYLE", "klora_it_style")
TIMEOUT = float(os.environ.get("KLORA_BROWSER_TIMEOUT", "900"))

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not URL, reason="set KLORA_BROWSER_URL to run")]


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("KLORA_SCREENSHOT_DIR") or tmp_path_factory.mktemp("klora-browser"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,2600"):
        options.add_argument(flag)
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        options.binary_location = binary
    driver_path = shutil.which("chromedriver")
    service = Service(driver_path) if driver_path else Service()
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


def _by():
    from selenium.webdriver.common.by import By

    return By


def wait_for(driver, what, timeout: float = TIMEOUT, every: float = 0.5):
    """Poll ``what(driver)`` until it returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = what(driver)
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - the element may not exist yet / be re-rendered
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {getattr(what, '__name__', what)} ({last!r})")


def css(driver, selector: str):
    return driver.find_element(_by().CSS_SELECTOR, selector)


def css_all(driver, selector: str):
    return driver.find_elements(_by().CSS_SELECTOR, selector)


def click(driver, element) -> None:
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    driver.execute_script("arguments[0].click();", element)


def type_into(driver, element, text: str, *, enter: bool = True) -> None:
    from selenium.webdriver.common.keys import Keys

    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    element.click()
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.BACKSPACE)
    element.send_keys(text)
    if enter:
        element.send_keys(Keys.ENTER)
    element.send_keys(Keys.TAB)


def pick(driver, elem_id: str, name: str) -> None:
    """Choose ``name`` in a gradio Dropdown: type it, then click the matching option (gradio 3 and 4)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    box = css(driver, f"#{elem_id} input")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(name)

    def matching(d):
        found = []
        for option in css_all(d, f"#{elem_id} ul.options li"):
            labels = (option.get_attribute("data-value"), option.get_attribute("aria-label"), option.text.strip())
            if name in labels or option.text.strip().endswith(name):  # gradio 3: data-value; 4: aria-label
                found.append(option)
        return found

    options = wait_for(driver, matching, timeout=20)
    # a real pointer click: gradio 3.41 selects an option on mousedown, which a scripted .click() never sends
    ActionChains(driver).move_to_element(options[0]).click().perform()
    wait_for(driver, lambda d: not css_all(d, f"#{elem_id} ul.options li"), timeout=20)  # the list closed
    wait_for(driver, lambda d: css(d, f"#{elem_id} input").get_attribute("value") == name, timeout=20)


def number_box(driver, elem_id: str):
    return css(driver, f"#{elem_id} input[type=number]")


def preview_src(driver, tab: str = "txt2img") -> str:
    images = css_all(driver, f"#klora_{tab}_preview img")
    return images[0].get_attribute("src") if images else ""


def open_accordion(driver, tab: str) -> None:
    acc = css(driver, f"#klora_{tab}_enabled")
    header = acc.find_element(_by().CSS_SELECTOR, ".label-wrap")
    if (
        not css_all(driver, f"#klora_{tab}_content input")
        or not css(driver, f"#klora_{tab}_content input").is_displayed()
    ):
        click(driver, header)
    wait_for(driver, lambda d: css(d, f"#klora_{tab}_content input").is_displayed(), timeout=30)


def watch_progress(driver, selector: str, shot: Path, seconds: float = 15.0) -> str:
    """The text of gradio's progress overlay on ``selector`` (3.41 and 4 both draw ``.progress-text`` / ``.eta-bar``
    inside the block) if it shows within ``seconds``, with a screenshot; "" if the call ended before it could be seen
    (a warm server scores a SD1.5 pair in well under a second: a fast one is not a failure)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            block = css(driver, selector)
            if css_all(driver, f"{selector} img"):
                return ""
            texts = [
                e.text for e in block.find_elements(_by().CSS_SELECTOR, ".progress-text, .progress-level, .meta-text")
            ]
            text = " ".join(t for t in texts if t.strip())
            if text:
                block.screenshot(str(shot))
                return text
        except Exception:  # noqa: BLE001 - re-rendered while we look
            pass
        time.sleep(0.05)
    return ""


def enabled_box(driver, tab: str):
    """The visible checkbox of K-LoRA's InputAccordion header (A1111 and Forge add it with inputAccordion.js)."""
    boxes = css_all(driver, f"#klora_{tab}_enabled .input-accordion-checkbox")
    return boxes[0] if boxes else css(driver, f"#klora_{tab}_enabled-checkbox input")


def is_checked(driver, element) -> bool:
    return bool(driver.execute_script("return arguments[0].checked;", element))


def test_accordion_preview_generate_and_send_to_img2img(browser, shots: Path) -> None:
    driver = browser
    driver.get(URL)
    wait_for(driver, lambda d: css(d, "#klora_txt2img_enabled"))
    wait_for(driver, lambda d: css(d, "#txt2img_generate").is_displayed())

    # 1. a fresh page: both pickers empty (gradio 4 would show the first LoRA in both), then open the accordion
    open_accordion(driver, "txt2img")
    assert css(driver, "#klora_txt2img_content input").get_attribute("value") == ""
    assert css(driver, "#klora_txt2img_style input").get_attribute("value") == ""
    assert preview_src(driver) == ""
    driver.save_screenshot(str(shots / "1-accordion-open.png"))

    # small, fast images on the CPU server
    for elem, value in (("txt2img_steps", "6"), ("txt2img_width", "64"), ("txt2img_height", "64")):
        type_into(driver, number_box(driver, elem), value)

    # 2. pick the two LoRAs: the preview appears (a new pair is scored once; cold cache, so it really is scored)
    LiveServer(URL, TIMEOUT, {}).request("/klora/v1/cache/clear", {})
    pick(driver, "klora_txt2img_content", CONTENT)
    pick(driver, "klora_txt2img_style", STYLE)
    busy = watch_progress(driver, "#klora_txt2img_preview", shots / "2-preview-scoring.png")
    first = wait_for(driver, lambda d: preview_src(d), timeout=240)
    print(f"progress shown on the preview while scoring: {busy!r}")
    info = css(driver, "#klora_txt2img_preview_info").text
    assert "γ" in info and "shared layers" in info, info
    css(driver, "#klora_txt2img_preview").screenshot(str(shots / "2-preview.png"))
    css(driver, "#klora_txt2img_enabled").screenshot(str(shots / "2-accordion-with-preview.png"))
    driver.save_screenshot(str(shots / "2-page-with-preview.png"))

    # 3. move alpha: the preview is redrawn from the cached scores
    type_into(driver, number_box(driver, "klora_txt2img_alpha"), "0.2")
    second = wait_for(driver, lambda d: (s := preview_src(d)) and s != first and s, timeout=120)
    assert second != first
    wait_for(driver, lambda d: css(d, "#klora_txt2img_preview_info").text != info, timeout=60)
    css(driver, "#klora_txt2img_preview").screenshot(str(shots / "3-preview-alpha-0.2.png"))

    # 4. tick K-LoRA and "Show selection map" (in Advanced), generate: image + map in the gallery
    box = enabled_box(driver, "txt2img")
    if not is_checked(driver, box):
        click(driver, box)
    wait_for(driver, lambda d: is_checked(d, enabled_box(d, "txt2img")), timeout=20)
    advanced = css(driver, "#klora_txt2img_advanced .label-wrap")
    if not css(driver, "#klora_txt2img_show_map input").is_displayed():
        click(driver, advanced)
    show_map = css(driver, "#klora_txt2img_show_map input")
    if not is_checked(driver, show_map):
        click(driver, show_map)
    click(driver, css(driver, "#txt2img_generate"))
    wait_for(driver, lambda d: len(css_all(d, "#txt2img_gallery img")) >= 2, timeout=TIMEOUT)
    info_html = wait_for(driver, lambda d: css(d, "#html_info_txt2img").text, timeout=60)
    assert "K-LoRA: v1" in info_html, info_html
    driver.save_screenshot(str(shots / "4-generated-with-map.png"))

    # 5. the preview is still there after the generation
    assert preview_src(driver)

    # 6. send to img2img: every K-LoRA control is carried
    click(driver, css(driver, "#txt2img_send_to_img2img"))
    wait_for(driver, lambda d: css(d, "#klora_img2img_enabled").is_displayed(), timeout=60)
    open_accordion(driver, "img2img")
    wait_for(driver, lambda d: css(d, "#klora_img2img_content input").get_attribute("value") == CONTENT, timeout=60)
    assert css(driver, "#klora_img2img_style input").get_attribute("value") == STYLE
    assert float(number_box(driver, "klora_img2img_alpha").get_attribute("value")) == pytest.approx(0.2)
    assert is_checked(driver, enabled_box(driver, "img2img"))
    assert is_checked(driver, css(driver, "#klora_img2img_show_map input"))  # inside the closed Advanced accordion
    wait_for(driver, lambda d: preview_src(d, "img2img"), timeout=120)  # the img2img preview follows the new values
    driver.save_screenshot(str(shots / "5-img2img-after-send.png"))


def test_api_answers_on_the_real_server() -> None:
    """The issue-11 API fixes on the real host: a disabled K-LoRA with junk values generates, a 400-digit integer and
    a bad infotext value are a 422 naming the field, and plan/last says why after a failed K-LoRA run."""
    server = LiveServer(URL, TIMEOUT, base_payload(2, 64))
    pair = {"enabled": True, "content": CONTENT, "style": STYLE}
    result = server.txt2img(**klora([False, "", 1.0, "", 1.0, 1.5, 0.5, "auto-mean", None]))
    assert len(result["images"]) == 1 and "K-LoRA" not in result["info"]
    status, body = server.status_of("/sdapi/v1/txt2img", {**server.base, **klora([{**pair, "alpha": 10**400}])})
    assert status == 422 and "'alpha'" in body["detail"], body
    infotext = f"a photo\nSteps: 2, Seed: 1, K-LoRA: v1, K-LoRA content: {CONTENT}, K-LoRA style: {STYLE}"
    status, body = server.status_of(
        "/sdapi/v1/txt2img", {**server.base, "infotext": infotext + ", K-LoRA method: k-lora-v9"}
    )
    assert status == 422 and "'method'" in body["detail"] and "infotext" in body["detail"], body
    result = server.txt2img(**klora([{**pair, "style": STYLE + "_missing"}]))
    assert result["images"] == [] or "K-LoRA error" in result["info"]
    status, body = server.status_of("/klora/v1/plan/last", None)
    assert status == 404 and "failed" in body["detail"] and "_missing" in body["detail"], body
    server.txt2img(**klora([pair]))
    assert server.request("/klora/v1/plan/last")["steps"] == 2


def test_paste_restores_k_lora_and_an_unusable_paste_changes_nothing(browser, shots: Path) -> None:
    """The prompt box's paste button (↙): a K-LoRA infotext sets the controls; one with a value this version cannot
    use leaves every control as it was and says why in a browser notice."""
    driver = browser
    driver.get(URL)
    wait_for(driver, lambda d: css(d, "#klora_txt2img_enabled"))
    wait_for(driver, lambda d: css(d, "#txt2img_generate").is_displayed())
    prompt = css(driver, "#txt2img_prompt textarea")
    paste = css(driver, "#txt2img_toprow #paste")
    good = (
        f"a photo\nSteps: 6, Seed: 1, K-LoRA: v1, K-LoRA content: {CONTENT}, K-LoRA style: {STYLE}, K-LoRA alpha: 0.7"
    )
    type_into(driver, prompt, good, enter=False)
    click(driver, paste)
    wait_for(driver, lambda d: css(d, "#klora_txt2img_content input").get_attribute("value") == CONTENT, timeout=60)
    assert css(driver, "#klora_txt2img_style input").get_attribute("value") == STYLE
    wait_for(driver, lambda d: float(number_box(d, "klora_txt2img_alpha").get_attribute("value")) == 0.7, timeout=60)
    wait_for(driver, lambda d: is_checked(d, enabled_box(d, "txt2img")), timeout=20)
    driver.save_screenshot(str(shots / "6-pasted.png"))

    bad = good.replace("K-LoRA alpha: 0.7", "K-LoRA alpha: 0.9, K-LoRA method: k-lora-v9")
    type_into(driver, css(driver, "#txt2img_prompt textarea"), bad, enter=False)
    click(driver, css(driver, "#txt2img_toprow #paste"))
    toast = wait_for(
        driver, lambda d: " ".join(e.text for e in css_all(d, ".toast-body") if "K-LoRA" in e.text), timeout=60
    )
    assert "'method'" in toast and "not applied" in toast, toast
    driver.save_screenshot(str(shots / "7-unusable-paste.png"))
    time.sleep(2)  # give a wrong update time to land
    assert float(number_box(driver, "klora_txt2img_alpha").get_attribute("value")) == pytest.approx(0.7)
    assert css(driver, "#klora_txt2img_content input").get_attribute("value") == CONTENT
    assert is_checked(driver, enabled_box(driver, "txt2img"))
