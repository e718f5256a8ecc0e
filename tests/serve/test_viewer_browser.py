"""The web viewer in a real browser: headless Chromium (Debian's `chromium` package) driven by
Playwright for Python, against the session's offline app with its two ingress replicas.

A person signs in by pasting a token, submits a generation with their own image as scene 1,
watches it live, and reads it: every image on the page must have loaded (naturalWidth > 0, not
merely an <img> in the DOM), every score shown must be the API's own number, another user must
not see it, and the page must work at phone width and with the keyboard. Screenshots are kept
under pytest's tmp path (the path is printed); with SCENEREF_UPDATE_SCREENSHOTS=1 they are also
copied into docs/screenshots/ for the docs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import jwt
import pytest
from PIL import Image

from tests.serve.conftest import AUDIENCE, SECRET, token

pytestmark = pytest.mark.serve

CHROMIUM = os.environ.get("SCENEREF_CHROMIUM", "/usr/bin/chromium")
DOCS_SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
# The screenshots docs/viewer.md shows (the others are test artifacts only).
DOCS_PICTURES = {"viewer-generation.png", "viewer-live.png", "viewer-phone-top.png", "viewer-failed.png",
                 "viewer-list.png", "viewer-expired.png"}
OWNER = "viewer-alice"
OTHER = "viewer-bob"
PROMPT = "Fresh orange juice for a sunny afternoon picnic in the park"
VARIATIONS = 3
DONE_TIMEOUT_MS = 360_000


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (the browser tests need Debian's Chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Where screenshots go; copied into docs/screenshots/ when asked to."""
    folder = tmp_path_factory.mktemp("viewer-screenshots")
    print(f"viewer screenshots: {folder}")
    yield folder
    if os.environ.get("SCENEREF_UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOTS.mkdir(exist_ok=True)
        for png in folder.glob("*.png"):
            if png.name in DOCS_PICTURES:
                shutil.copy(png, DOCS_SHOTS / png.name)


def sign_in(page, base: str, bearer: str) -> None:
    page.goto(f"{base}/viewer")
    page.fill("#token", bearer)
    page.click("#sign-in")
    page.wait_for_selector("#sign-out")


def api(base: str, path: str, sub: str = OWNER):
    response = httpx.get(f"{base}{path}", headers={"Authorization": f"Bearer {token(sub)}"}, timeout=30)
    response.raise_for_status()
    return response


def all_images_loaded(page, timeout_ms: int = 60_000) -> None:
    """Every <img> on the page finished loading with real pixels; else the test fails naming
    the images that did not (or saying there was none)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "() => [...document.images].length > 0 && [...document.images].every((i) => i.complete && i.naturalWidth > 0)",
            timeout=timeout_ms,
        )
    except PlaywrightTimeout:
        broken = page.evaluate(
            "() => [...document.images].filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.src.slice(0, 160))"
        )
        pytest.fail(f"images not loaded after {timeout_ms} ms: {broken or 'no <img> on the page'}")


@pytest.fixture(scope="module")
def generation(offline_app, browser, shots, tmp_path_factory):
    """One generation submitted through the viewer's form, with the user's image as scene 1,
    watched live until it completes; yields its id, the page and the API's view of it."""
    picture = tmp_path_factory.mktemp("upload") / "picnic.png"
    Image.new("RGB", (320, 180), (240, 170, 40)).save(picture)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # A 404 for the trace listing is the API's answer before a generation's first trace file
    # exists; any other failed load or script error is a fault of the page.
    page.on("console", lambda msg: errors.append(f"{msg.text} {msg.location.get('url')}")
            if msg.type == "error" and not msg.location.get("url", "").endswith("/traces") else None)
    sign_in(page, offline_app, token(OWNER))
    page.click("#new-link")
    page.fill("#prompt", PROMPT)
    page.fill("#target_duration", "9")
    page.fill("#advanced_image_num_variations", str(VARIATIONS))
    page.fill("#advanced_image_max_enhancement_iterations", "3")
    page.fill("#advanced_image_quality_threshold", "30")
    page.set_input_files("#image", str(picture))
    page.click("#submit")
    page.wait_for_url("**#/g/*")
    generation_id = page.url.rsplit("/", 1)[1]
    # Live: the page follows it while it runs (the event stream, or polling where there is none).
    page.wait_for_function("() => /live \\(/.test(document.getElementById('live-mode')?.textContent || '')", timeout=60_000)
    live_text = page.inner_text("#live-mode")
    # The docs' live picture: a scene done and the next one under way, where the run allows it.
    page.wait_for_function(
        "() => document.querySelector('#scene-2')?.dataset.status === 'completed'"
        " || document.querySelector('.generation')?.dataset.status !== 'running'", timeout=DONE_TIMEOUT_MS)
    if page.get_attribute(".generation", "data-status") == "running":  # else this run was too quick for it
        all_images_loaded(page)  # the images shown so far, loaded: the picture shows them, not blanks
        page.screenshot(path=str(shots / "viewer-live.png"), full_page=True)
    page.wait_for_selector('.generation[data-status="completed"]', timeout=DONE_TIMEOUT_MS)
    status = api(offline_app, f"/api/status/{generation_id}").json()
    traces: dict[int, dict] = {}
    for scene in status["storyboard_plan"]["scenes"]:
        n = scene["scene_number"]
        traces[n] = {"summary": api(offline_app, f"/api/generations/{generation_id}/traces/scene_{n}/prompt_trace_summary.json").json()}
        if not scene["user_provided"]:
            traces[n]["quality"] = api(offline_app, f"/api/generations/{generation_id}/traces/scene_{n}/quality_scores.json").json()
    expected_images = sum(
        1 for t in traces.values() for v in t.get("quality", {}).get("variations", []) if v["image"]
    )
    page.wait_for_function(f"() => document.querySelectorAll('.variation img').length === {expected_images}", timeout=60_000)
    all_images_loaded(page)
    page.locator("details.iteration").nth(1).locator("summary").click()  # the docs show one opened
    page.screenshot(path=str(shots / "viewer-generation.png"), full_page=True)
    yield {"id": generation_id, "page": page, "status": status, "traces": traces, "live_text": live_text, "errors": errors}
    context.close()


def test_generation_is_watched_live_and_completes(generation):
    assert generation["live_text"].startswith(("0%", "1", "2", "3", "4", "5", "6", "7", "8", "9"))
    assert "live (" in generation["live_text"]
    assert generation["status"]["status"] == "completed"
    assert generation["page"].get_attribute(".generation", "data-status") == "completed"


def test_the_page_ran_without_script_errors(generation):
    assert generation["errors"] == []


def test_every_scene_shows_its_loaded_images(generation):
    page, status = generation["page"], generation["status"]
    scenes = status["storyboard_plan"]["scenes"]
    assert len(scenes) == 3
    assert page.locator("article.scene").count() == len(scenes)
    assert page.locator(".strip .strip-card").count() == len(scenes)
    sizes = page.evaluate("() => [...document.images].map((i) => [i.currentSrc, i.naturalWidth, i.naturalHeight])")
    assert sizes and all(width > 0 and height > 0 for _, width, height in sizes), sizes
    for scene in scenes:
        n = scene["scene_number"]
        big = page.locator(f"#scene-{n} img.big")
        assert big.evaluate("(i) => i.naturalWidth") > 0
        expected = sum(1 for v in generation["traces"][n].get("quality", {}).get("variations", []) if v["image"])
        assert page.locator(f"#scene-{n} .variation img").count() == expected


def test_users_image_is_marked_and_chained(generation):
    page = generation["page"]
    assert generation["status"]["storyboard_plan"]["scenes"][0]["user_provided"] is True
    assert "your image" in page.inner_text("#scene-1 .selected-img figcaption")
    assert page.locator("#scene-1 .variation").count() == 0
    assert "your image (scene 1)" in page.inner_text("#scene-2 .chain")
    assert "scene 2's selected image" in page.inner_text("#scene-3 .chain")
    assert page.locator("#strip-1 .tag.user").inner_text() == "your image"


def test_scores_shown_are_the_apis(generation):
    page, status = generation["page"], generation["status"]
    threshold = status["storyboard_plan"]["advanced_image_settings"]["quality_threshold"]
    checked = 0
    for scene in status["storyboard_plan"]["scenes"]:
        n = scene["scene_number"]
        quality = generation["traces"][n].get("quality")
        if quality is None:
            continue
        shown = page.locator(f"#scene-{n} .scene-quality")
        assert float(shown.get_attribute("data-value")) == scene["quality_score"]
        assert shown.inner_text() == f"{scene['quality_score']:.2f}"
        assert len(quality["variations"]) == VARIATIONS
        for v in quality["variations"]:
            card = page.locator(f'#scene-{n} figure.variation[data-variation="{v["variation"]}"]')
            assert int(card.locator("[data-rank]").get_attribute("data-rank")) == v["rank"]
            assert ("selected" in card.get_attribute("class")) == (v["rank"] == 1)
            for name, result in [*v["scores"].items(), ("overall", {"score": v["overall"]})]:
                bar = card.locator(f'[data-score="{name}"]')
                assert float(bar.get_attribute("data-value")) == result["score"], (n, v["variation"], name)
                assert abs(float(bar.locator(".bar-value").inner_text()) - result["score"]) <= 0.005
                drawn = bar.locator(".bar-fill").evaluate(
                    "(f) => f.getBoundingClientRect().width / f.parentElement.getBoundingClientRect().width")
                assert abs(drawn * 100 - result["score"]) <= 1.0, (name, drawn)  # the bar is as long as the score
                checked += 1
            mark = card.locator('[data-score="overall"] .bar-mark')
            assert mark.evaluate("(m) => m.style.left") == f"{threshold:g}%"
        summary = generation["traces"][n]["summary"]
        iterations = page.locator(f"#scene-{n} details.iteration")
        assert iterations.count() == len(summary["iterations"]) >= 1
        first = summary["iterations"][0]
        dims = page.locator(f"#scene-{n} details.iteration").first
        for name in ("completeness", "specificity", "professionalism", "cinematography", "brand_alignment", "overall"):
            assert float(dims.locator(f'[data-score="{name}"]').get_attribute("data-value")) == first["scores"][name]
        assert first["critique"] in dims.text_content()  # a closed <details> holds its text
    assert checked >= 2 * VARIATIONS * 5


def test_cost_and_time_are_shown_when_the_status_has_them(generation):
    page, status = generation["page"], generation["status"]
    for scene in status["storyboard_plan"]["scenes"]:
        if scene.get("cost") is not None:
            assert page.locator(f'#scene-{scene["scene_number"]} .costs [data-field="cost"]').count() == 1
    if status.get("cost") is not None:
        text = page.inner_text('.head .costs [data-field="cost"]')
        usd = status["cost"]["usd"]
        assert text.startswith("unknown") if usd is None else text.startswith("$")


def test_the_iteration_diff_shows_what_changed(generation):
    page = generation["page"]
    n = next(s["scene_number"] for s in generation["status"]["storyboard_plan"]["scenes"] if not s["user_provided"])
    details = page.locator(f"#scene-{n} details.iteration").first
    details.evaluate("(d) => { d.open = true; }")
    assert details.locator(".diff ins").first.is_visible()
    assert details.locator(".diff ins").count() >= 1  # the rewrite added words to the original prompt


def test_the_owner_lists_it_and_another_user_cannot_see_it(generation, offline_app, browser, shots):
    page = generation["page"]
    page.goto(f"{offline_app}/viewer#/")
    page.wait_for_selector("#generations, #no-generations")
    assert page.locator(f'#generations li[data-generation="{generation["id"]}"]').count() == 1, generation["errors"]
    assert not page.locator("#more").is_visible()  # one page: nothing older to show
    page.screenshot(path=str(shots / "viewer-list.png"))
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    other = context.new_page()
    sign_in(other, offline_app, token(OTHER))
    other.wait_for_selector("#generations, #no-generations")
    assert other.locator(f'#generations li[data-generation="{generation["id"]}"]').count() == 0
    other.goto(f"{offline_app}/viewer#/g/{generation['id']}")
    other.wait_for_selector("#not-found")
    assert "not yours" in other.inner_text("#not-found")
    assert other.locator(".generation, article.scene, img").count() == 0
    other.screenshot(path=str(shots / "viewer-other-user.png"))
    context.close()


def test_phone_width_and_keyboard(generation, offline_app, browser, shots):
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True)
    page = context.new_page()
    sign_in(page, offline_app, token(OWNER))
    page.goto(f"{offline_app}/viewer#/g/{generation['id']}")
    page.wait_for_selector('.generation[data-status="completed"]')
    page.wait_for_function("() => document.querySelectorAll('.variation img').length > 0")
    all_images_loaded(page)
    overflow = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    assert page.locator("#scene-2 .var-grid").evaluate("(g) => getComputedStyle(g).gridTemplateColumns.split(' ').length") == 1
    page.screenshot(path=str(shots / "viewer-phone.png"), full_page=True)
    page.screenshot(path=str(shots / "viewer-phone-top.png"))
    # Keyboard: the first Tab reaches the skip link with a visible focus ring; the storyboard's
    # scene buttons move the focus to their scene.
    page.goto(f"{offline_app}/viewer#/g/{generation['id']}")
    page.wait_for_selector('.generation[data-status="completed"]')
    page.reload()
    page.wait_for_selector('.generation[data-status="completed"]')
    page.keyboard.press("Tab")
    focused = page.evaluate("() => [document.activeElement.className, getComputedStyle(document.activeElement).outlineStyle]")
    assert focused == ["skip", "solid"]
    page.focus("#strip-2")
    page.keyboard.press("Enter")
    assert page.evaluate("() => document.activeElement.id") == "scene-2"
    # An agent iteration opens from the keyboard.
    page.locator("#scene-2 details.iteration summary").first.focus()
    page.keyboard.press("Enter")
    assert page.locator("#scene-2 details.iteration").first.evaluate("(d) => d.open")
    assert page.locator("#scene-2 details.iteration .dims").first.is_visible()
    context.close()


def expired_token(seconds_ago: int) -> str:
    now = int(time.time())
    return jwt.encode({"sub": OWNER, "aud": AUDIENCE, "iat": now - 3600, "exp": now - seconds_ago}, SECRET, algorithm="HS256")


def test_expired_and_refused_tokens_are_said_in_words(offline_app, browser, shots):
    context = browser.new_context(viewport={"width": 900, "height": 700})
    page = context.new_page()
    page.goto(f"{offline_app}/viewer")
    page.fill("#token", expired_token(60))
    page.click("#sign-in")
    assert page.inner_text("#banner") == "Your token expired, paste a new one."
    page.screenshot(path=str(shots / "viewer-expired.png"))
    # The server's word for it: the browser's clock is an hour behind, so the page thinks the
    # token still valid and the service refuses it; the page asks for a new one.
    page.clock.set_fixed_time(datetime.now(timezone.utc) - timedelta(hours=1))
    page.fill("#token", expired_token(120))
    page.click("#sign-in")
    page.wait_for_selector("#token")
    page.wait_for_function("() => document.getElementById('banner').textContent.includes('expired')")
    assert page.inner_text("#banner") == "Your token expired, paste a new one."
    bad = jwt.encode({"sub": OWNER, "aud": AUDIENCE, "iat": int(time.time()), "exp": int(time.time()) + 600}, "y" * 40, algorithm="HS256")
    page.clock.set_fixed_time(datetime.now(timezone.utc))
    page.fill("#token", bad)
    page.click("#sign-in")
    page.wait_for_function("() => document.getElementById('banner').textContent.includes('did not accept')")
    assert "token signature is invalid" in page.inner_text("#banner")
    context.close()


def test_a_failed_scene_says_why(offline_app, browser, shots):
    """A failed generation as the status reports it (served to the page by Playwright, as the
    offline providers do not fail): the failed scene and the reason are on the page, and with no
    event stream the page polls."""
    generation_id = "f" * 32
    status = {
        "generation_id": generation_id, "status": "failed", "progress": 55, "advanced_image_generation_used": True,
        "storyboard_plan": {
            "advanced_image_generation_used": True,
            "advanced_image_settings": {"quality_threshold": 30.0, "num_variations": 2, "max_enhancement_iterations": 2},
            "scenes": [
                {"scene_number": 1, "duration": 5, "prompt": "A picnic blanket in the park", "status": "completed",
                 "enhanced_prompt": "A picnic blanket, wide shot", "reference_image_url": "data:image/png;base64," + _png_b64(),
                 "quality_score": 41.5, "prompt_score": 86.0, "below_threshold": False, "user_provided": False},
                {"scene_number": 2, "duration": 4, "prompt": "Juice poured into a glass", "status": "pending"},
            ],
        },
        "error": "image generation (offline, variation 1) failed: provider answered HTTP 400; not retryable",
        "offline": True,
    }
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    page = context.new_page()
    page.route(f"**/api/status/{generation_id}", lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(status)))
    page.route(f"**/api/generations/{generation_id}/**", lambda route: route.fulfill(
        status=404, content_type="application/json", body=json.dumps({"detail": "no trace files"})))
    page.route(f"**/api/generations/{generation_id}/traces", lambda route: route.fulfill(
        status=404, content_type="application/json", body=json.dumps({"detail": "no trace files"})))
    sign_in(page, offline_app, token(OWNER))
    page.goto(f"{offline_app}/viewer#/g/{generation_id}")
    page.wait_for_selector("#gen-error")
    assert "failed: image generation (offline, variation 1) failed" in page.inner_text("#gen-error")
    assert page.get_attribute("#scene-2", "data-status") == "pending"
    assert "This scene failed: image generation" in page.inner_text("#scene-2")
    assert "failed" in page.inner_text("#strip-2")
    assert page.locator("#resume").is_visible()
    drawn = page.locator(".progress span").evaluate("(s) => s.getBoundingClientRect().width / s.parentElement.getBoundingClientRect().width")
    assert abs(drawn - 0.55) < 0.02
    assert "trace files of this generation were removed" in page.inner_text("#scene-1")
    page.screenshot(path=str(shots / "viewer-failed.png"), full_page=True)
    context.close()


def _png_b64() -> str:
    import base64

    buffer = io.BytesIO()
    Image.new("RGB", (160, 90), (60, 120, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
