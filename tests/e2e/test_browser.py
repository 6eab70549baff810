"""The gateway's pages in a real browser, as a person uses them: Debian's chromium, driven by Playwright,
against a real `cbir serve` (tiny bundle, mini collection), with every request off this machine refused.

The web page at / is used as a person would: an image chosen, dropped, pasted or picked from the keyboard,
a result clicked to search by it, the class filter, the same-class switch, "More", "Add to collection",
an error's `detail`, the indexing progress, and a phone-width screen.

Each test saves a screenshot under its tmp_path and prints where (`pytest -s` shows it). The page comes
first in each signature, so that without chromium a test skips (or, under CI, fails) before a server starts.
The tests share one server: the one that adds an image to the collection comes last.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import ConsoleMessage, Locator, Page, Route, expect

pytestmark = pytest.mark.slow  # a server subprocess and a browser

RENDER_TIMEOUT_MS = 20_000
SEARCH_OPERATION = "search_search_post"  # FastAPI's operation id of POST /search
PER_PAGE = 24  # the page's default "Per page"


def screenshot(page: Page, path: Path) -> None:
    page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")


def console_errors(page: Page) -> list[str]:
    """The page's console errors from now on (a refused load or a failing script shows there)."""
    errors: list[str] = []

    def record(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", record)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


def test_swagger_ui_renders_the_search_operation_offline(page: Page, outside_requests: list[str], served: tuple,
                                                         tmp_path: Path) -> None:
    url, _, _ = served
    errors = console_errors(page)
    page.goto(f"{url}/docs")
    operation = page.locator(f"#operations-search-{SEARCH_OPERATION}")
    expect(operation).to_be_visible(timeout=RENDER_TIMEOUT_MS)
    operation.locator(".opblock-summary-control").click()
    upload = operation.locator('[data-property-name="file"] .parameter__name')
    expect(upload).to_contain_text("file")
    expect(operation.locator('[data-param-name="k"]')).to_be_visible()
    screenshot(page, tmp_path / "docs.png")
    assert outside_requests == []
    assert errors == []


def test_redoc_renders_the_search_operation_offline(page: Page, outside_requests: list[str], served: tuple,
                                                    tmp_path: Path) -> None:
    url, _, _ = served
    errors = console_errors(page)
    page.goto(f"{url}/redoc")
    operation = page.locator(f'[id="tag/search/operation/{SEARCH_OPERATION}"]')
    expect(operation).to_be_visible(timeout=RENDER_TIMEOUT_MS)
    expect(operation).to_contain_text("/search")
    expect(operation).to_contain_text("multipart/form-data")
    expect(operation.get_by_text("file", exact=True)).to_be_visible()
    screenshot(page, tmp_path / "redoc.png")
    assert outside_requests == []
    # ReDoc's attribution logo, refused by the page's Content-Security-Policy before any request: nothing else.
    assert all("cdn.redoc.ly" in error and "Content Security Policy" in error for error in errors), errors


# -- the web page ---------------------------------------------------------------------------------


def open_search_page(page: Page, url: str) -> None:
    """The page at /, once it says the index is ready and its class filter holds the collection's labels."""
    page.goto(f"{url}/")
    expect(page.locator("#health")).to_contain_text("images indexed", timeout=RENDER_TIMEOUT_MS)
    expect(page.locator("#label-filter option[value=dog]")).to_have_count(1)


def hits(page: Page) -> Locator:
    return page.locator("#hits .hit")


def wait_for_results(page: Page) -> None:
    """Until the search just started has been answered and its results drawn."""
    expect(page.locator("#hits")).to_have_attribute("aria-busy", "false", timeout=RENDER_TIMEOUT_MS)
    expect(page.locator("#error")).to_be_empty()


def hit_ids(page: Page) -> list[str]:
    return hits(page).evaluate_all("tiles => tiles.map(tile => tile.dataset.id)")


def hit_texts(page: Page, part: str) -> list[str]:
    return hits(page).locator(part).all_inner_texts()


def no_horizontal_scroll(page: Page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def drop_file(page: Page, target: str, data: bytes, name: str, mime: str) -> bool:
    """A file dragged from the desktop and dropped on `target`, as the browser reports it; whether the drop
    zone showed it would take it while dragged over."""
    return page.evaluate(
        """([target, data, name, mime]) => {
             const transfer = new DataTransfer();
             transfer.items.add(new File([Uint8Array.from(atob(data), c => c.charCodeAt(0))], name, {type: mime}));
             const element = document.querySelector(target);
             const fire = (type) => element.dispatchEvent(
               new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));
             fire("dragenter"); fire("dragover");
             const highlighted = document.querySelector("#drop").classList.contains("dragging");
             fire("drop");
             return highlighted;
           }""", [target, base64.b64encode(data).decode(), name, mime])


def paste_file(page: Page, data: bytes, name: str, mime: str) -> None:
    """Ctrl-V of an image on the clipboard (a screenshot tool puts one there as `image.png`)."""
    page.evaluate(
        """([data, name, mime]) => {
             const transfer = new DataTransfer();
             transfer.items.add(new File([Uint8Array.from(atob(data), c => c.charCodeAt(0))], name, {type: mime}));
             document.activeElement.dispatchEvent(
               new ClipboardEvent("paste", {bubbles: true, cancelable: true, clipboardData: transfer}));
           }""", [base64.b64encode(data).decode(), name, mime])


def png_of(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_web_page_searches_by_an_uploaded_image(page: Page, outside_requests: list[str], served: tuple,
                                                    mini_collection: Path, tmp_path: Path) -> None:
    url, _, _ = served
    errors = console_errors(page)
    open_search_page(page, url)
    expect(page.locator("#empty")).to_contain_text("Drop an image")  # before any query: what to do
    screenshot(page, tmp_path / "empty.png")

    page.locator("input[type=file]").set_input_files(mini_collection / "test" / "cat" / "0000.jpg")
    wait_for_results(page)
    expect(hits(page)).to_have_count(PER_PAGE)
    expect(page.locator("#empty")).to_be_hidden()
    scores = hits(page).evaluate_all("tiles => tiles.map(tile => Number(tile.dataset.score))")
    assert all(0.0 <= score <= 2.0 for score in scores) and scores == sorted(scores, reverse=True), scores
    # The badge is the visual similarity: it tells apart the same-class hits whose scores all read 2.000.
    badges = [float(text) for text in hit_texts(page, ".similarity")]
    assert all(-1.0 <= value <= 1.0 for value in badges), badges
    exact = hits(page).evaluate_all("tiles => tiles.map(tile => Number(tile.dataset.similarity))")
    decimals = {len(text.split(".")[1]) for text in hit_texts(page, ".similarity")}
    assert len(decimals) == 1 and 3 <= min(decimals) <= 6, decimals  # one precision for the page
    assert all(abs(badge - value) <= 0.5 * 10 ** -min(decimals) + 1e-12 for badge, value in zip(badges, exact,
                                                                                                 strict=True))
    predicted = hits(page).evaluate_all("tiles => tiles.map(tile => tile.dataset.predicted)")
    same_class = [value for value, label in zip(badges, predicted, strict=True) if label == predicted[0]]
    assert len(same_class) >= 5 and len(set(same_class)) > len(same_class) // 2, same_class
    labels = hit_texts(page, ".label")
    assert all(label and label not in ("null", "None", "undefined") for label in labels), labels
    assert all(re.fullmatch(r"\d{4}\.jpg", name) for name in hit_texts(page, ".name"))
    query = page.locator("#query")
    expect(query.locator("#query-name")).to_have_text("0000.jpg")
    expect(query.locator("#query-prediction")).to_have_text(re.compile(r"Predicted \w+ · \d+\.\d%"))
    expect(page.locator("#message")).to_contain_text(f"{PER_PAGE} similar images")
    for image in (query.locator("img"), hits(page).first.locator("img")):  # the object URL, /images/{id}
        expect(image).to_have_js_property("complete", True)
        assert image.evaluate("image => image.naturalWidth") > 0
    assert all(hits(page).locator("img").evaluate_all("images => images.map(image => image.alt)"))
    screenshot(page, tmp_path / "search.png")
    assert outside_requests == []
    assert errors == []


def test_clicking_a_hit_searches_by_it_and_back_returns(page: Page, outside_requests: list[str], served: tuple,
                                                        mini_collection: Path, tmp_path: Path) -> None:
    url, _, _ = served
    errors = console_errors(page)
    open_search_page(page, url)
    page.locator("input[type=file]").set_input_files(mini_collection / "test" / "dog" / "0000.jpg")
    wait_for_results(page)
    before = hit_ids(page)
    chosen = hits(page).nth(2)
    chosen_id, chosen_name = chosen.get_attribute("data-id"), chosen.locator(".name").inner_text()

    chosen.click()
    query = page.locator("#query")
    expect(query).to_have_attribute("data-id", chosen_id)
    wait_for_results(page)
    expect(query.locator("#query-name")).to_have_text(chosen_name)
    expect(query.locator("#query-id")).to_have_text(f"id {chosen_id}")
    expect(query.locator("#query-prediction")).to_contain_text("Predicted")
    expect(query.locator("img")).to_have_attribute("src", f"/images/{chosen_id}")
    after = hit_ids(page)
    assert after and chosen_id not in after and after != before  # GET /images/{id}/similar leaves it out
    assert page.url.endswith(f"#image={chosen_id}")
    expect(page.locator("#add")).to_be_hidden()  # an indexed image is in the collection already
    screenshot(page, tmp_path / "similar.png")

    page.go_back()  # to the upload's results
    expect(query).to_have_attribute("data-kind", "upload")
    wait_for_results(page)
    expect(query.locator("#query-name")).to_have_text("0000.jpg")
    assert hit_ids(page) == before
    assert outside_requests == []
    assert errors == []


def test_the_class_filter_same_class_and_more(page: Page, outside_requests: list[str], served: tuple,
                                              mini_collection: Path, tmp_path: Path) -> None:
    url, _, _ = served
    errors = console_errors(page)
    open_search_page(page, url)
    page.locator("input[type=file]").set_input_files(mini_collection / "test" / "horse" / "0000.jpg")
    wait_for_results(page)

    page.get_by_label("Class", exact=True).select_option("dog")
    wait_for_results(page)
    expect(hits(page)).to_have_count(PER_PAGE)
    assert set(hit_texts(page, ".label")) == {"dog"}
    first_page = hit_ids(page)

    page.get_by_role("button", name="More").click()
    expect(hits(page)).to_have_count(2 * PER_PAGE)
    ids = hit_ids(page)
    assert ids[:PER_PAGE] == first_page and len(set(ids)) == len(ids)
    assert set(hit_texts(page, ".label")) == {"dog"}
    screenshot(page, tmp_path / "filtered-more.png")
    page.get_by_role("button", name="More").click()  # 50 dogs in the collection: 2 more, and no more to load
    expect(hits(page)).to_have_count(50)
    expect(page.get_by_role("button", name="More")).to_be_hidden()
    expect(page.locator("#message")).to_contain_text("that is all of them")

    page.get_by_label("Class", exact=True).select_option("")
    page.get_by_label("Same predicted class only").check()
    wait_for_results(page)
    predicted = page.locator("#query").get_attribute("data-predicted")
    found = hits(page).evaluate_all("tiles => tiles.map(tile => tile.dataset.predicted)")
    assert predicted and found and set(found) == {predicted}, (predicted, found)
    assert outside_requests == []
    assert errors == []


def test_drop_paste_and_the_keyboard_start_a_search(page: Page, outside_requests: list[str], served: tuple,
                                                    mini_collection: Path, tmp_path: Path) -> None:
    url, _, _ = served
    errors = console_errors(page)
    # Held on from the start: switched on by expect_file_chooser alone, Playwright's file-chooser interception
    # can be late for a chooser that a key press opens at once.
    page.on("filechooser", lambda _: None)
    open_search_page(page, url)
    query_name = page.locator("#query-name")

    photo = mini_collection / "test" / "ship" / "0001.jpg"
    assert drop_file(page, "#drop", photo.read_bytes(), "ship.jpg", "image/jpeg")
    wait_for_results(page)
    expect(query_name).to_have_text("ship.jpg")
    expect(hits(page)).to_have_count(PER_PAGE)
    expect(page.locator("#drop")).not_to_have_class(re.compile("dragging"))

    paste_file(page, png_of(mini_collection / "test" / "truck" / "0001.jpg"), "image.png", "image/png")
    wait_for_results(page)
    expect(query_name).to_have_text("Pasted image")
    expect(page.locator("#query-detail")).to_contain_text("image/png")

    page.get_by_role("button", name="Search by an image").focus()
    for key in ("Enter", " "):
        with page.expect_file_chooser() as chooser:
            page.keyboard.press(key)
        chooser.value.set_files(mini_collection / "test" / "frog" / "0001.jpg")
        wait_for_results(page)
        expect(query_name).to_have_text("0001.jpg")
        expect(page.locator("#query-detail")).to_contain_text("image/jpeg")
    screenshot(page, tmp_path / "keyboard.png")
    assert outside_requests == []
    assert errors == []


def test_an_error_shows_the_api_detail(page: Page, outside_requests: list[str], served: tuple,
                                       tmp_path: Path) -> None:
    url, _, _ = served
    open_search_page(page, url)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    detail = httpx.post(f"{url}/search", files={"file": ("notes.txt", notes.read_bytes())}).json()["detail"]
    page.locator("input[type=file]").set_input_files(notes)
    expect(page.get_by_role("alert")).to_have_text(f"Search failed: {detail}")
    expect(page.locator("#query-name")).to_have_text("notes.txt")
    expect(hits(page)).to_have_count(0)
    expect(page.locator("#add")).to_be_hidden()  # nothing the model could read is offered to the collection
    screenshot(page, tmp_path / "error.png")
    assert outside_requests == []


def test_while_indexing_the_page_shows_progress_and_searches_once_ready(page: Page, outside_requests: list[str],
                                                                         served: tuple, mini_collection: Path,
                                                                         tmp_path: Path) -> None:
    """/healthz, /collection and POST /search answer as a gateway still indexing does, until they no longer
    do: the page shows the progress (never an error) and runs the search by itself once the index is ready."""
    url, _, _ = served
    indexing = {"detail": "indexing the collection: 120 of 500 images (24%)", "status": "indexing", "indexed": 120,
                "total": 500}

    def still_indexing(route: Route) -> None:
        route.fulfill(status=503, content_type="application/json", body=json.dumps(indexing),
                      headers={"Retry-After": "2"})

    for path in ("/healthz", "/search?*"):
        page.route(f"{url}{path}", still_indexing)
    page.goto(f"{url}/")
    health = page.locator("#health")
    expect(health).to_contain_text("120 of 500 images", timeout=RENDER_TIMEOUT_MS)
    expect(health.locator("progress")).to_have_attribute("value", "120")

    page.locator("input[type=file]").set_input_files(mini_collection / "test" / "deer" / "0000.jpg")
    message = page.locator("#message")
    expect(message).to_contain_text("120 of 500 images")
    expect(message).to_contain_text("your search runs as soon as it is done")
    expect(page.locator("#error")).to_be_empty()
    screenshot(page, tmp_path / "indexing.png")

    page.unroute_all()
    wait_for_results(page)  # the next /healthz poll finds it ready
    expect(hits(page)).to_have_count(PER_PAGE)
    expect(health).to_contain_text("images indexed")
    assert outside_requests == []


def test_the_web_page_at_phone_width(page: Page, outside_requests: list[str], served: tuple,
                                     mini_collection: Path, tmp_path: Path) -> None:
    url, _, _ = served
    page.set_viewport_size({"width": 375, "height": 800})
    open_search_page(page, url)
    assert no_horizontal_scroll(page)
    page.locator("input[type=file]").set_input_files(mini_collection / "test" / "airplane" / "0000.jpg")
    wait_for_results(page)
    assert no_horizontal_scroll(page)
    screenshot(page, tmp_path / "phone-upload.png")
    hits(page).nth(1).click()
    wait_for_results(page)
    expect(page.locator("#query")).to_be_in_viewport()  # the new query is shown, not left scrolled away
    assert no_horizontal_scroll(page)
    screenshot(page, tmp_path / "phone-similar.png")
    assert outside_requests == []


def test_similarities_near_one_get_the_decimals_that_tell_them_apart(page: Page, served: tuple,
                                                                      mini_collection: Path, tmp_path: Path) -> None:
    """The shipped model's 24 nearest horses lie within 2e-4 of each other near 1.0 (docs/api.md): the badges show
    as many decimals as tell them apart, not 24 times 1.000."""
    url, _, _ = served

    horse = mini_collection / "test" / "horse" / "0000.jpg"

    def near_one(route: Route) -> None:
        # The browser's upload is not replayable from here (Playwright sees no File body): ask the API ourselves.
        query = route.request.url.split("?", 1)[1]
        body = httpx.post(f"{url}/search?{query}", files={"file": ("horse.jpg", horse.read_bytes())}, timeout=30).json()
        for rank, hit in enumerate(body["hits"]):
            hit["similarity"] = 0.99994 - rank * 0.00001
        route.fulfill(json=body)

    page.route(re.compile(r".*/search\?.*"), near_one)
    open_search_page(page, url)
    page.locator("input[type=file]").set_input_files(horse)
    wait_for_results(page)
    badges = hit_texts(page, ".similarity")
    assert badges[:3] == ["0.99994", "0.99993", "0.99992"] and len(set(badges)) == PER_PAGE, badges
    screenshot(page, tmp_path / "near-one.png")


def two_picture_png(left: Path, right: Path, *, side: int = 128) -> bytes:
    """One PNG of two pictures side by side, each `side` pixels square: a box can pick either."""
    canvas = Image.new("RGB", (2 * side, side))
    for index, path in enumerate((left, right)):
        canvas.paste(Image.open(path).convert("RGB").resize((side, side), Image.Resampling.LANCZOS), (index * side, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_box_dragged_on_the_query_searches_by_that_region(page: Page, outside_requests: list[str], served: tuple,
                                                            mini_collection: Path, tmp_path: Path) -> None:
    """A person drags a box over the right half of a two-picture upload: the page searches by that region
    (`/search?box=`, in the image's pixels) and shows the API's hits for it; "Whole image" searches by all of it."""
    url, _, _ = served
    errors = console_errors(page)
    test = mini_collection / "test"
    data = two_picture_png(test / "cat" / "0000.jpg", test / "ship" / "0001.jpg")
    source = tmp_path / "two.png"
    source.write_bytes(data)
    open_search_page(page, url)
    page.locator("input[type=file]").set_input_files(source)
    wait_for_results(page)
    expect(page.locator("#region")).to_contain_text("Drag a box")
    frame = page.locator("#query-image").bounding_box()
    scale = frame["width"] / 256  # the 256×128 picture, letterboxed in a square
    top = frame["y"] + (frame["height"] - 128 * scale) / 2
    with page.expect_request(lambda request: "box=" in request.url) as boxed:
        page.mouse.move(frame["x"] + 130 * scale, top + 2 * scale)
        page.mouse.down()
        page.mouse.move(frame["x"] + 200 * scale, top + 60 * scale, steps=5)
        page.mouse.move(frame["x"] + 254 * scale, top + 126 * scale, steps=5)
        page.mouse.up()
    wait_for_results(page)
    box = [int(part) for part in re.search(r"box=([\d%C,]+)", boxed.value.url).group(1).replace("%2C", ",").split(",")]
    assert all(abs(got - want) <= 2 for got, want in zip(box, [130, 2, 124, 124], strict=True)), box
    expect(page.locator("#region")).to_contain_text(f"Searching by a region: {box[2]}×{box[3]} px")
    expect(page.locator("#box-overlay")).to_be_visible()
    expect(hits(page)).to_have_count(PER_PAGE)
    api = httpx.post(f"{url}/search", params={"k": PER_PAGE, "box": ",".join(map(str, box))},
                     files={"file": ("two.png", data, "image/png")}, timeout=30).json()
    assert hit_ids(page) == [hit["id"] for hit in api["hits"]]  # the region's hits, as the API gives them
    screenshot(page, tmp_path / "box.png")

    with page.expect_request(lambda request: "/search?" in request.url) as whole:
        page.get_by_role("button", name="Whole image").click()
    wait_for_results(page)
    assert "box=" not in whole.value.url
    expect(page.locator("#box-overlay")).to_be_hidden()
    assert outside_requests == []
    assert errors == []


def test_add_to_collection(page: Page, outside_requests: list[str], served: tuple, mini_collection: Path,
                           tmp_path: Path) -> None:
    """On loopback a development server takes writes (`writes: true`): the upload is added (201), and the same
    bytes again are found already there (200), with the same id. Elsewhere the button is not offered."""
    url, _, _ = served
    photo = mini_collection / "test" / "bird" / "0004.jpg"
    open_search_page(page, url)
    page.locator("input[type=file]").set_input_files(photo)
    wait_for_results(page)
    add, result = page.get_by_role("button", name="Add to collection"), page.locator("#add-result")
    page.get_by_label("Label (optional)").fill("bird")
    add.click()
    expect(result).to_contain_text("Added to the collection as ")
    added_id = re.search(r"as (\w+), labelled bird\.", result.inner_text()).group(1)
    meta = httpx.get(f"{url}/images/{added_id}/meta").json()
    assert (meta["source"], meta["label"]) == ("upload", "bird")
    expect(page.get_by_label("Class", exact=True).locator("option[value=bird]")).to_have_text("bird (51)")
    expect(page.locator("#health")).to_have_text("501 images indexed")
    screenshot(page, tmp_path / "added.png")

    page.locator("input[type=file]").set_input_files(photo)  # the same image again
    wait_for_results(page)
    expect(result).to_be_empty()
    add.click()
    expect(result).to_have_text(f"Already in the collection, as {added_id}.")

    def no_writes(route: Route) -> None:
        response = route.fetch()
        route.fulfill(response=response, json=response.json() | {"writes": False})

    page.route(f"{url}/collection", no_writes)
    open_search_page(page, url)
    page.locator("input[type=file]").set_input_files(photo)
    wait_for_results(page)
    expect(page.locator("#add")).to_be_hidden()
    assert outside_requests == []
