"""The web page at /ui and its JSON endpoints, on the real service (`genrec serve` over the
tiny bundle with a real Redis), and end to end in a real headless Chromium (Playwright
driving the system's `chromium`; Playwright's own browser downloads are never used)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model_store.bundle import Bundle
from service.api.ui import pca_2d
from tests.servers import ServiceProcess, published_service

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Gateway:
    bundle: Bundle
    service: ServiceProcess

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.service.base}{path}", params=params, timeout=60)

    def user(self, index: int) -> str:
        return str(self.bundle.users["user_id"][index])

    def genres(self) -> dict[str, set[str]]:
        cat = self.bundle.catalog
        return {u: set(g) for u, g in zip(cat["uri"], cat["genres"], strict=True)}


@pytest.fixture(scope="module")
def gateway(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with published_service(tiny_bundle, tmp_path_factory) as (bundle, _, service):
        yield Gateway(bundle, service)


# ------------------------------------------------------------------ JSON endpoints


def test_pca_is_deterministic_with_fixed_signs() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)) * np.arange(8, 0, -1)
    a, b = pca_2d(x), pca_2d(x.copy())
    np.testing.assert_array_equal(a.coords, b.coords)
    for axis in a.axes:
        assert axis[np.argmax(np.abs(axis))] > 0
    flipped = pca_2d(-x)  # the same cloud mirrored: same axes, mirrored coordinates
    np.testing.assert_allclose(flipped.axes, a.axes, atol=1e-9)
    np.testing.assert_allclose(flipped.coords, -a.coords, atol=1e-9)
    assert a.explained[0] >= a.explained[1] > 0
    np.testing.assert_allclose(a.project(x[:3]), a.coords[:3], atol=1e-9)


def test_users_lists_bundle_users_and_genres(gateway: Gateway) -> None:
    ids = [str(u) for u in gateway.bundle.users["user_id"]]
    body = gateway.get("/v1/ui/users").json()
    assert body["users"] == ids[:50] and body["total"] == len(ids)
    assert body["bundle_version"] == gateway.bundle.version
    assert "comedy" in body["genres"] and body["genres"] == sorted(body["genres"])
    assert gateway.get("/v1/ui/users", limit=3).json()["users"] == ids[:3]
    for bad in ("0", "-1", "1001", "abc"):
        r = gateway.get("/v1/ui/users", limit=bad)
        assert r.status_code == 422 and r.json()["error"], (bad, r.text)


def test_map_projects_items_and_the_user_the_same_way(gateway: Gateway) -> None:
    bundle, index = gateway.bundle, 3
    r = gateway.get("/v1/ui/map", user_id=gateway.user(index))
    assert r.status_code == 200, r.text
    body = r.json()
    uris = bundle.catalog["uri"].tolist()
    assert [i["uri"] for i in body["items"]] == uris
    assert body["bundle_version"] == bundle.version and body["degraded"] == []
    pca = pca_2d(bundle.item_vectors)
    xy = np.array([[i["x"], i["y"]] for i in body["items"]])
    np.testing.assert_allclose(xy, pca.coords, atol=1e-4)
    assert sum(body["explained_variance"]) <= 1.0 and body["explained_variance"][0] > 0
    # the user's point: their published embedding (float16 in Redis) through the same PCA
    expected = pca.project(bundle.user_embeddings[index].astype(np.float16))
    np.testing.assert_allclose([body["user"]["x"], body["user"]["y"]], expected, atol=1e-3)
    assert set(body["history"]) == {uris[i] for i in bundle.histories[index]}
    recs = httpx.post(f"{gateway.service.base}/v1/recommendations", timeout=60,
                      json={"user_id": gateway.user(index), "k": 10}).json()  # fmt: skip
    assert body["recommended"] == [i["uri"] for i in recs["items"]]
    assert gateway.get("/v1/ui/map", user_id=gateway.user(index)).json() == body
    assert gateway.get("/v1/ui/map", user_id=gateway.user(index), k=0).json()["recommended"] == []


def test_map_without_a_known_user_has_no_user_point(gateway: Gateway) -> None:
    body = gateway.get("/v1/ui/map", user_id="new-user-7", k=0).json()
    assert body["user"] is None and body["history"] == [] and body["recommended"] == []
    assert body["degraded"] == ["unknown_user"]
    assert len(body["items"]) == len(gateway.bundle.catalog)
    body = gateway.get("/v1/ui/map", user_id="new-user-7", k=3).json()
    assert len(body["recommended"]) == 3  # prompt-only, still served
    bare = gateway.get("/v1/ui/map").json()
    assert bare["user"] is None and len(bare["items"]) == len(gateway.bundle.catalog)


@pytest.mark.parametrize(
    "params",
    [
        {"user_id": "a b"},
        {"user_id": ""},
        {"user_id": "x" * 65},
        {"user_id": "../etc"},
        {"user_id": "1", "k": "-1"},
        {"user_id": "1", "k": "101"},
        {"user_id": "1", "k": "ten"},
    ],
)
def test_map_rejects_bad_input_with_422(gateway: Gateway, params: dict[str, str]) -> None:
    r = gateway.get("/v1/ui/map", **params)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid request"


def test_page_and_static_files(gateway: Gateway) -> None:
    r = gateway.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<svg id="map"' in r.text and "/ui/static/app.js" in r.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = gateway.get(f"/ui/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"], name
    assert gateway.get("/ui/static/missing.js").status_code == 404
    for bad in ("..%2Fui.py", "%2E%2E%2Fapp.py", "index.html", "ui.py"):
        r = gateway.get(f"/ui/static/{bad}")
        assert r.status_code in (404, 422), (bad, r.status_code)


# ------------------------------------------------------------------ the page, in a browser


def _chromium() -> str:
    path = (
        os.environ.get("GENREC_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    if path is None:
        pytest.skip("no system Chromium (Debian: apt-get install chromium)")
    return path


def test_page_end_to_end_in_chromium(gateway: Gateway, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    chromium = _chromium()
    genres = gateway.genres()
    user = gateway.user(30)
    profile_url = f"{gateway.service.base}/v1/users/{user}/taste-profile"
    rows = "#recs tr[data-uri]"

    def uris(page: Any, selector: str) -> list[str]:
        return [
            str(u) for u in page.eval_on_selector_all(selector, "rs => rs.map(r => r.dataset.uri)")
        ]

    def request_id(page: Any) -> str:
        return str(page.get_attribute("#recs", "data-request-id"))

    def wait_new_recs(page: Any, old: str) -> None:
        page.wait_for_function(
            "old => document.querySelector('#recs').dataset.requestId !== old", arg=old
        )

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(f"{gateway.service.base}/ui")
            page.wait_for_selector(f"#user option[value='{user}']", state="attached")
            page.select_option("#user", user)

            # recommendations render: catalog items, with kind, Semantic ID and why
            page.wait_for_function(f"document.querySelectorAll('{rows}').length >= 5")
            before = uris(page, rows)
            assert len(before) == 10 and set(before) <= genres.keys()
            assert page.locator("#recs td.sid").first.inner_text().count("-") >= 2
            assert "served by generative" in page.inner_text("#recs-meta")
            page.wait_for_function("document.querySelectorAll('#genres li').length > 0")
            assert page.inner_text("#summary").strip()

            # forget the recommendations' most common genre through the edit form
            counts: dict[str, int] = {}
            for uri in before:
                for g in genres[uri]:
                    counts[g] = counts.get(g, 0) + 1
            top = max(sorted(counts), key=counts.__getitem__)
            old = request_id(page)
            page.fill("#genre", top)
            page.select_option("#action", "forget")
            page.click("#apply")
            wait_new_recs(page, old)
            page.wait_for_function(f"document.querySelectorAll('{rows}').length >= 5")
            after = uris(page, rows)
            assert after and not [u for u in after if top in genres[u]], (top, after)
            assert top in page.inner_text("#edits li[data-kind='forget']")
            assert "Saved" in page.inner_text("#message")

            # a playlist from a prompt
            page.fill("#prompt", "horror")
            page.fill("#length", "10")
            page.click("#make-playlist")
            page.wait_for_function("document.querySelectorAll('#playlist tr[data-uri]').length > 0")
            playlist = uris(page, "#playlist tr[data-uri]")
            assert len(playlist) == 10 and set(playlist) <= genres.keys()
            assert sum("horror" in genres[u] for u in playlist) >= 5

            # the map: every item, history, the 10 recommendations and the user's star
            page.wait_for_function(
                "n => document.querySelectorAll('#map circle').length === n",
                arg=len(genres),
            )
            assert page.locator("#map circle.rec").count() == 10
            assert page.locator("#map circle.history").count() > 0
            assert page.locator("#map polygon.user").count() == 1

            shot = tmp_path / "ui.png"
            page.screenshot(path=str(shot), full_page=True)

            # another editor moved the profile on: the page says so, reloads, applies nothing
            shown = page.inner_text("#revision")
            r = httpx.patch(profile_url, json={"less": {"genres": ["western"]}})
            assert r.status_code == 200
            page.fill("#genre", "documentary")
            page.select_option("#action", "more")
            page.click("#apply")
            page.wait_for_function(
                "document.querySelector('#message').textContent.includes('changed this profile')"
            )
            page.wait_for_function(
                "old => document.querySelector('#revision').textContent !== old", arg=shown
            )
            stored = httpx.get(profile_url).json()
            assert page.inner_text("#revision") == f"revision {stored['revision']}"
            assert stored["edits"]["more"]["genres"] == []
            assert "western" in page.inner_text("#edits li[data-kind='less']")

            # reset: no edits, and the recommendations refresh again
            old = request_id(page)
            page.click("#reset")
            wait_new_recs(page, old)
            page.wait_for_function(
                "document.querySelector('#message').textContent.includes('reset')"
            )
            assert page.inner_text("#edits li[data-kind='forget']").endswith("—")
            assert httpx.get(profile_url).json()["edits"]["forget"]["genres"] == []
            assert errors == []
        finally:
            browser.close()
            httpx.delete(f"{profile_url}/edits")

    _assert_real_picture(shot)
    if os.environ.get("GENREC_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "ui.png")


def _assert_real_picture(path: Path) -> None:
    """A PNG of a page with real content: big enough, many colours, not one flat fill."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 1000 and height >= 600
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    orange = (pixels[..., 0] > 200) & (np.abs(pixels[..., 1] - 115) < 40) & (pixels[..., 2] < 80)
    assert orange.sum() > 20  # the recommended items on the map
