"""The search page in a real browser: Debian's headless Chromium driven by Selenium through Debian's
chromedriver (apt-get install chromium chromium-driver; no browser download), against a live
server on a loopback port with a tiny model."""
import base64
import os
from urllib.parse import urlencode

import pytest

from tests.conftest import make_image_bytes
from tests.live_server import serving

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install -y chromium chromium-driver",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e '.[dev]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install -e '.[serve]'")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

HOSTILE = "<script>window.__pwned = 1</script><b>not bold</b> & <img src=x onerror='window.__pwned = 2'>"
TEXTS = {"bridge": "the red bus drives over the old stone bridge", "bread": "a recipe for bread with rye flour",
         "square": "the square of 13 is 169", "weather": "mountain weather changes fast", "hostile": HOSTILE}
IMAGES = {f"img{i}": make_image_bytes(30 + i, size=(64, 48)) for i in range(4)}  # stored with captions
PLAIN = make_image_bytes(40, size=(64, 48))  # stored without one, as document "plain"


@pytest.fixture(scope="module")
def site(tiny_encoders, tmp_path_factory):
    """(base URL, httpx client) of a live server holding the TEXTS and IMAGES documents."""
    import httpx

    from mimic_engine.index import DocumentIndex
    from mimic_engine.runtime.torch_backend import TorchBackend
    from mimic_engine.server.app import create_app
    from mimic_engine.server.settings import ServerSettings

    backend = TorchBackend.from_encoder(tiny_encoders("decoder"))
    index = DocumentIndex(str(tmp_path_factory.mktemp("browser-index")), backend.dim, backend.model_id)
    docs = [{"id": k, "text": t, "metadata": {"kind": "fact"}} for k, t in TEXTS.items()]
    docs += [{"id": k, "image": base64.b64encode(v).decode(), "caption": f"picture {k}"} for k, v in IMAGES.items()]
    docs.append({"id": "plain", "image": base64.b64encode(PLAIN).decode()})
    with serving(create_app(ServerSettings(max_wait_ms=2.0), backend, index)) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/v1/documents", json={"documents": docs}).status_code == 200
        yield url, http


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as exc:  # e.g. a chromedriver of another version than the browser
        pytest.skip(f"Chromium did not start under chromedriver: {exc}")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def api_ids(http, query, k=12, modality=None):
    r = http.post("/v1/search", json={"query": query, "k": k, "modality": modality})
    assert r.status_code == 200, r.text
    return [hit["id"] for hit in r.json()["results"]]


def shown_ids(driver):
    return [card.get_attribute("data-id") for card in driver.find_elements(By.CSS_SELECTOR, "#results > li")]


def wait_for_results(driver, before=None):
    """Wait until the status line reports results (and, given `before`, they changed); -> the ids shown."""
    WebDriverWait(driver, 60).until(lambda d: "result" in d.find_element(By.ID, "status").text and
                                    (before is None or shown_ids(d) != before))
    return shown_ids(driver)


def test_typed_query_shows_results_and_puts_the_search_in_the_url(site, browser, tmp_path):
    url, http = site
    browser.get(url + "/")
    box = browser.find_element(By.ID, "q")
    assert browser.switch_to.active_element == box  # the cursor starts in the query box
    box.send_keys(TEXTS["bridge"], Keys.ENTER)  # the keyboard alone searches
    ids = wait_for_results(browser)
    assert ids == api_ids(http, {"text": TEXTS["bridge"]}) and ids[0] == "bridge"
    first = browser.find_element(By.CSS_SELECTOR, "#results > li")
    assert TEXTS["bridge"] in first.text and "kind" in first.text and "fact" in first.text  # text, id, metadata
    assert first.find_element(By.CSS_SELECTOR, ".score").text == "1.0000"
    assert browser.current_url == url + "/?" + urlencode({"q": TEXTS["bridge"]})
    # another search, then Back: the first result set again
    box.clear()
    box.send_keys(TEXTS["bread"], Keys.ENTER)
    assert wait_for_results(browser, before=ids)[0] == "bread"
    browser.back()
    assert wait_for_results(browser, before=api_ids(http, {"text": TEXTS["bread"]})) == ids
    browser.save_screenshot(str(tmp_path / "typed.png"))


def test_uploaded_image_shows_image_results_with_thumbnails(site, browser, tmp_path):
    url, http = site
    browser.get(url + "/?" + urlencode({"q": "anything", "modality": "image"}))
    before = wait_for_results(browser)
    path = tmp_path / "query.png"
    path.write_bytes(PLAIN)
    browser.find_element(By.ID, "q").clear()
    browser.find_element(By.ID, "file").send_keys(str(path))  # the file picker's input
    ids = wait_for_results(browser, before=before)
    image = base64.b64encode(PLAIN).decode()
    assert ids == api_ids(http, {"image": image}, modality="image") and ids[0] == "plain"
    assert {c.get_attribute("class") for c in browser.find_elements(By.CSS_SELECTOR, "#results > li")} == {"card image"}
    assert browser.find_element(By.ID, "q-label").text == "Caption (optional)"
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
    sizes = browser.execute_script("return [...document.querySelectorAll('#results img')].map(i => i.naturalWidth)")
    assert len(sizes) == len(ids) and set(sizes) == {64}  # each card shows its document's stored thumbnail
    # a caption typed with the image makes an image+text query
    browser.find_element(By.ID, "q").send_keys("picture img1", Keys.ENTER)
    assert wait_for_results(browser, before=ids) == api_ids(http, {"image": image, "text": "picture img1"},
                                                            modality="image")
    browser.save_screenshot(str(tmp_path / "image.png"))


def test_opening_a_search_url_shows_the_same_results(site, browser):
    url, http = site
    browser.get(url + "/?" + urlencode({"q": TEXTS["square"], "modality": "text", "k": 3}))
    assert wait_for_results(browser) == api_ids(http, {"text": TEXTS["square"]}, k=3, modality="text")
    assert browser.find_element(By.ID, "q").get_attribute("value") == TEXTS["square"]
    assert browser.find_element(By.ID, "modality").get_attribute("value") == "text"
    assert browser.find_element(By.ID, "k").get_attribute("value") == "3"
    # the results are already in the page as loaded (no request after it), as `chromium --dump-dom` sees it
    dom = browser.execute_script("return document.getElementById('results').textContent")
    assert "169" in dom


def test_a_document_holding_markup_is_shown_as_text(site, browser):
    url, _ = site
    for page in ("/?" + urlencode({"q": HOSTILE, "k": 1}), "/"):  # rendered from the embedded JSON, then via fetch
        browser.get(url + page)
        if page == "/":
            browser.find_element(By.ID, "q").send_keys(HOSTILE, Keys.ENTER)
        wait_for_results(browser)
        card = browser.find_element(By.CSS_SELECTOR, "#results > li")
        assert card.get_attribute("data-id") == "hostile"
        assert card.find_element(By.CSS_SELECTOR, ".doc-text").text == HOSTILE
        assert card.find_elements(By.CSS_SELECTOR, "b, script, img") == []
        assert browser.find_elements(By.CSS_SELECTOR, "#results b, #results script") == []
        assert browser.execute_script("return window.__pwned") is None


def test_blank_query_asks_for_input_and_bad_k_says_why(site, browser):
    url, _ = site
    browser.get(url + "/")
    browser.find_element(By.ID, "go").click()
    status = browser.find_element(By.ID, "status")
    assert status.text == "Type a query or add an image." and "error" in status.get_attribute("class")
    browser.get(url + "/?q=x&k=5000")
    WebDriverWait(browser, 30).until(lambda d: "1 to 1000" in d.find_element(By.ID, "status").text)

