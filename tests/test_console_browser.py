"""The console in a real headless Chromium: log in, watch a series move on the worklist, open it, act on it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.models import JobState
from dicom_node.phantom import write_phantom_series
from tests.conftest import storescu
from tests.console_helpers import PASSWORDS, SMALL_PHANTOM, ConsoleNode, console_node

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
STEP_TIMEOUT_MS = 180_000


def _require_browser() -> None:
    """Debian's chromium and the playwright package; missing: skipped, or failed where CI is set."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    if missing:
        message = f"the browser test needs {' and '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def browser() -> Iterator[object]:
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


def _log_in(browser: object, running: ConsoleNode, user: str, then: str = "/") -> object:
    context = browser.new_context(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(f"{running.url}{then}")
    assert page.url.startswith(f"{running.url}/login"), "an unauthenticated visit must land on the login page"
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORDS[user])
    page.click("button[type=submit]")
    page.wait_for_url(f"{running.url}{then}")
    return page


def _post_status(page: object, path: str, token: str | None) -> int:
    """POST a form from inside the page (as a hand-made request would), returning the HTTP status."""
    script = """([path, token]) => {
        const body = new URLSearchParams(); if (token !== null) body.append('csrf_token', token);
        return fetch(path, {method: 'POST', body: body, redirect: 'manual'}).then(r => r.status);
    }"""
    return int(page.evaluate(script, [path, token]))  # type: ignore[attr-defined]


def test_operator_watches_a_series_arrive_and_finish_then_retries_it_viewer_and_strangers_cannot(browser, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    series = write_phantom_series(tmp_path / "ct", SMALL_PHANTOM)
    uid = series.series_instance_uid
    with console_node(tmp_path / "run") as running:
        page = _log_in(browser, running, "olga")
        page.evaluate("window.notReloaded = true")
        # Half the series: it waits in RECEIVING for the rest (ImagesInAcquisition says 24).
        assert storescu(running.node.port, series.files[:12]).returncode == 0
        row = f'tr[data-series="{uid}"]'
        receiving = page.locator(f'{row}[data-state="RECEIVING"]', has_text="12 / 24")
        receiving.wait_for(timeout=STEP_TIMEOUT_MS)
        page.screenshot(path=str(shots / "worklist-receiving.png"), full_page=True)
        assert storescu(running.node.port, series.files[12:]).returncode == 0
        page.wait_for_selector(f'{row}[data-state="DONE"]', timeout=STEP_TIMEOUT_MS)
        assert page.evaluate("window.notReloaded") is True, "the worklist must refresh without reloading the page"
        assert "pacs 2/2" in page.inner_text(row)
        page.screenshot(path=str(shots / "worklist.png"), full_page=True)

        page.click(f"{row} a")
        page.wait_for_url(f"{running.url}/series/{uid}")
        preview_width = page.eval_on_selector("#preview", "img => img.complete ? img.naturalWidth : 0")
        assert preview_width == 5 * 256, "the preview PNG must load in the page"
        structures = page.inner_text("#structures")
        assert "lung_left" in structures and "body" in structures
        assert "Volume (ml)" in structures and "Mean HU" in structures
        assert "SENDING" in page.inner_text("#timeline")
        page.screenshot(path=str(shots / "series.png"), full_page=True)

        page.click("#retry")
        page.wait_for_selector("#flash")
        assert page.inner_text("#flash") == "done: the series is now COMPLETE"
        running.node.wait_for_state(uid, JobState.DONE, timeout=180)

        viewer = _log_in(browser, running, "vera", then=f"/series/{uid}")
        assert viewer.query_selector("#retry") is None, "a viewer is offered no operator action"
        token = viewer.get_attribute("input[name=csrf_token]", "value")
        assert _post_status(viewer, f"/series/{uid}/retry", token) == 403
        assert "lung_left" in viewer.inner_text("#structures")
        assert "PHANTOM-1" not in viewer.content(), "patient details are for operators (show_patient_details_to)"
        assert "PHANTOM-1" in page.content()

        stranger = browser.new_context().new_page()
        stranger.goto(f"{running.url}/series/{uid}")
        assert stranger.url.startswith(f"{running.url}/login")
        assert _post_status(stranger, f"/series/{uid}/retry", None) == 401
        assert running.node.job_state(uid) is JobState.DONE
        with running.node.sessions() as session:
            from db.jobs import job_for_series_uid

            reasons = [event.reason for event in job_for_series_uid(session, uid).events]
        assert reasons.count("retry requested by olga (was DONE)") == 1
    assert sorted(p.name for p in shots.iterdir()) == ["series.png", "worklist-receiving.png", "worklist.png"]
