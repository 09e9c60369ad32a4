"""The dashboard in a real headless browser (Debian's Chromium through ChromeDriver), on a state with two
accepted versions and a rejected round. DOPSD_SCREENSHOTS=DIR keeps the screenshots (`make screenshots`
writes docs/); `.ci/run` sets DOPSD_REQUIRE_BROWSER=1, so a missing browser fails there instead of skipping."""

import json
import os
from pathlib import Path

import pytest
from test_daemon import fast_recipe

from dopsd_continual.ingest import ingest_paths
from dopsd_continual.rounds import run_round
from dopsd_continual.store import init_state, open_state
from dopsd_continual.toy.packs import write_pack

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    recipe = fast_recipe(tmp, steps=8, gate=True)
    (tmp / "drop").mkdir()
    st = init_state(tmp / "s", str(recipe), [tmp / "drop"])
    verdicts = []
    for pack in ("heart", "striped", "logo"):
        write_pack(pack, tmp / "drop" / pack)
        ingest_paths(st)
        if pack == "logo":  # the third round meets a bar it cannot pass: a real rejection by the gate
            st.recipe["gate"]["min_concept_gain"] = 1.0
        verdicts.append(run_round(st)["verdict"])
    st.close()
    assert verdicts == ["accepted", "accepted", "rejected"]
    return tmp / "s"


@pytest.fixture(scope="module")
def browser():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)):
        msg = f"the browser test needs {CHROMIUM} and {DRIVER} (make browser, or apt-get install chromium chromium-driver)"
        if os.environ.get("DOPSD_REQUIRE_BROWSER"):
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1280,900"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def shot(driver, name: str, tmp_path: Path) -> None:
    out = Path(os.environ.get("DOPSD_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out / f"ui_{name}.png"))


def wait(driver, cond, timeout=300):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(cond)


def cli_versions(root) -> list[dict]:
    from typer.testing import CliRunner

    from dopsd_continual.cli import app

    r = CliRunner().invoke(app, ["versions", "list", "--json", "--state", str(root)])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def active_on_page(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.get_attribute("data-active") for e in driver.find_elements(By.CSS_SELECTOR, "[data-active]")]


def test_the_dashboard_in_a_browser(world, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    from dopsd_continual.web.server import Server, url

    server = Server(world, "127.0.0.1", 0, "browser-token").start()
    base = url(server.host, server.port)  # after the first visit the cookie carries the token
    d = browser
    try:
        # the versions: four, newest first, the rejected one marked and set in off the chain to v2, the active one
        d.get(server.url)  # the printed address, token included: it redirects to the page without it
        wait(d, EC.presence_of_element_located((By.ID, "tree")))
        ids = [e.text for e in d.find_elements(By.CSS_SELECTOR, "a.version")]
        assert ids == ["v3", "v2", "v1", "v0"]
        assert d.find_element(By.XPATH, "//a[@data-version='v3']/..").get_attribute("class") == "branch"
        assert active_on_page(d) == ["v2"] == [v["id"] for v in cli_versions(world) if v["active"]]
        assert "rejected" in d.find_element(By.XPATH, "//a[@data-version='v3']/..").text
        shot(d, "overview", tmp_path)

        # the rejected round's gate: its numbers against the thresholds and its sheet
        d.find_element(By.CSS_SELECTOR, "a[data-version='v3']").click()
        wait(d, EC.presence_of_element_located((By.ID, "sheet-image")))
        failed = d.find_elements(By.CSS_SELECTOR, "table.checks tr.fail")
        assert "concept gain" in [r.find_elements(By.TAG_NAME, "td")[0].text for r in failed]
        assert d.execute_script("return document.getElementById('sheet-image').naturalWidth") > 0
        assert d.execute_script("return [...document.querySelectorAll('#samples img')].every(i => i.naturalWidth > 0)")
        shot(d, "version_rejected", tmp_path)

        # roll back to v1 with the button: it asks first, then the active pointer moves, for the CLI too
        d.get(base + "versions/v1")
        d.find_element(By.XPATH, "//button[text()='make v1 active']").click()
        wait(d, EC.alert_is_present()).dismiss()  # "no" changes nothing
        assert [v["id"] for v in cli_versions(world) if v["active"]] == ["v2"]
        d.find_element(By.XPATH, "//button[text()='make v1 active']").click()
        wait(d, EC.alert_is_present()).accept()
        wait(d, lambda drv: active_on_page(drv) == ["v1"])
        assert [v["id"] for v in cli_versions(world) if v["active"]] == ["v1"]

        # the overview follows a change made elsewhere (the CLI) without a reload
        d.get(base)
        wait(d, lambda drv: drv.find_element(By.ID, "active-version").text == "v1")
        marker = d.execute_script("window.__same_page = 1; return 1")
        from dopsd_continual.stack import rollback

        st = open_state(world)
        rollback(st, "v2")
        st.close()
        wait(d, lambda drv: drv.find_element(By.ID, "active-version").text == "v2", 60)
        assert d.execute_script("return window.__same_page") == marker  # updated in place, not reloaded

        # sample a prompt on a version, and compare two versions on the same prompts and seeds
        d.get(base + "versions/v2")
        d.find_element(By.CSS_SELECTOR, "form.sample button").click()
        wait(d, EC.alert_is_present()).accept()
        wait(d, lambda drv: drv.execute_script(
            "const i = document.querySelector('#jobs img'); return i && i.complete && i.naturalWidth > 0"))
        shot(d, "version_sample", tmp_path)
        d.get(base + "compare?a=v0&b=v2")
        d.find_element(By.XPATH, "//button[text()='render']").click()
        wait(d, lambda drv: drv.execute_script(
            "const i = document.getElementById('compare-image'); return i && i.complete && i.naturalWidth > 0"))
        shot(d, "compare", tmp_path)
        d.get(base + "queue")
        assert "used" in d.find_element(By.ID, "queue").text
        shot(d, "queue", tmp_path)

        # news the queue's rows do not show (a scan sets a broken file aside): that section is refreshed, the
        # rows are kept as they are, and their pictures are not fetched again
        wait(d, lambda drv: drv.execute_script("return [...document.querySelectorAll('#queue img')].every(i => i.complete)"))
        pictures = "return performance.getEntriesByType('resource').filter(e => e.name.includes('/img/sample/')).length"
        fetched = d.execute_script(pictures)
        assert fetched > 0
        d.execute_script("document.getElementById('queue').kept = 'yes'")  # a property: not in its HTML
        (world.parent / "drop" / "broken.png").write_bytes(b"not a picture")
        (world.parent / "drop" / "broken.txt").write_text("a broken picture\n")
        st = open_state(world)
        ingest_paths(st)
        st.close()
        wait(d, lambda drv: "broken.png" in drv.find_element(By.ID, "problems").text, 60)
        assert d.execute_script("return document.getElementById('queue').kept") == "yes"
        assert d.execute_script(pictures) == fetched
    finally:
        server.stop()
