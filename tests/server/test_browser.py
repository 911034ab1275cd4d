"""The browser page in headless Debian Chromium (playwright drives it; never a browser
download): keys pressed on the page reach the server, the model's notes appear in the piano
roll, and stopping the server shows the disconnected state."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is missing"
    )
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        yield b
        b.close()


def test_page_plays_with_the_model_and_shows_disconnects(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("window.improv && window.improv.state().started", timeout=15_000)
    assert "live" in page.locator("#status").inner_text()
    # Short waits: gap 150 ms and a 2 s answer keep the test quick.
    page.evaluate(
        "document.getElementById('gap').value = 150; document.getElementById('gap').oninput()"
    )
    page.evaluate(
        "document.getElementById('length').value = 2; document.getElementById('length').oninput()"
    )
    page.wait_for_timeout(300)
    for key in ("a", "d", "g", "k"):  # C E G C on the computer keyboard
        page.keyboard.down(key)
        page.wait_for_timeout(90)
        page.keyboard.up(key)
    page.locator('.key[data-note="62"]').click()  # and D on the on-screen keys (mouse)
    # The roll as it is when the model's first note shows: a retract may take sent notes back
    # later (the server replaces what it sampled ahead), so it is read in the same call.
    notes = page.wait_for_function(
        "(() => { const n = window.improv.rollNotes();"
        " return n.some(x => x.source === 'model') ? n : null; })()",
        timeout=15_000,
    ).json_value()
    player = sorted(n["pitch"] for n in notes if n["source"] == "player")
    assert player == [60, 62, 64, 67, 72]
    assert all(n["end"] is not None for n in notes if n["source"] == "player")
    model = [n for n in notes if n["source"] == "model"]
    # The model answered only because the keys reached the server (respond mode).
    assert model and all(n["part"] == "lead" for n in model)
    page.wait_for_timeout(600)
    shot = Path(os.environ.get("IMPROV_SCREENSHOT", tmp_path / "page.png"))
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    # Accompany with drums: the model plays along while a key is held.
    page.click('#mode button[data-mode="accompany"]')
    page.check("#p-drums")
    page.wait_for_function("window.improv.state().mode === 'accompany'")
    # The rest slider's top stop plays on through silence: the server gets rest_ms null.
    page.evaluate(
        "window.__sent = []; const send = WebSocket.prototype.send;"
        "WebSocket.prototype.send = function (d) { window.__sent.push(JSON.parse(d));"
        " return send.call(this, d); };"
        "document.getElementById('rest').value = 31; document.getElementById('rest').oninput()"
    )
    page.wait_for_function(
        "window.__sent.some(m => m.type === 'params' && 'rest_ms' in m && m.rest_ms === null)"
    )
    assert page.locator("#rest-v").inner_text() == "never"
    # "Left hand": keys below C3 are the player's bass; the model's bass is switched off.
    page.check("#p-bass")
    page.check("#split")
    page.wait_for_function(
        "window.__sent.some(m => m.type === 'params' && m.bass_split === 48"
        " && !m.parts.includes('bass'))"
    )
    assert page.locator("#p-bass").is_disabled()
    page.uncheck("#split")
    page.uncheck("#p-bass")
    along = "window.improv.rollNotes().some(n => n.source === 'model' && n.part !== 'lead')"
    for _ in range(10):  # the player plays on until the (random) model plays along
        for key in ("a", "g", "f", "d"):
            page.keyboard.down(key)
            page.wait_for_timeout(250)
            page.keyboard.up(key)
        if page.evaluate(along):
            break
    page.wait_for_function(along, timeout=15_000)
    page.screenshot(path=str(shot.with_name(shot.stem + "-accompany.png")))
    server.stop()
    page.wait_for_function("window.improv.status() === 'disconnected'", timeout=15_000)
    assert "unreachable" in page.locator("#status").inner_text()
    assert not errors, errors
    page.close()


def test_page_plays_along_a_chart_with_a_count_in(browser, server, tmp_path):
    """Accompany along a chord chart: the count-in starts the clock, the beat dots and the
    click follow the server's beats, the current and next chord show in large type and label
    the roll. (The test model has no chord tokens: the chart and the clock still come.)"""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("window.improv && window.improv.state().started", timeout=15_000)
    page.evaluate(
        "window.__sent = []; const send = WebSocket.prototype.send;"
        "WebSocket.prototype.send = function (d) { window.__sent.push(JSON.parse(d));"
        " return send.call(this, d); }; 0"
    )
    page.click('#mode button[data-mode="accompany"]')
    assert page.locator("#chart").is_hidden()  # the chart box belongs to the chart source
    # the model's own chords: "Sure tones only" (chord_hedge) is on; off plays whole chords
    assert page.locator("#hedge").is_visible() and page.locator("#hedge").is_checked()
    page.uncheck("#hedge")
    page.wait_for_function(
        "window.__sent.some(m => m.type === 'params' && m.chord_source === 'model'"
        " && m.chord_hedge === 0)"
    )
    page.check("#hedge")
    page.wait_for_function("window.__sent.some(m => m.type === 'params' && m.chord_hedge === 0.5)")
    page.select_option("#chord-source", "chart")
    assert page.locator("#chart").is_visible() and page.locator("#hedge").is_hidden()
    page.fill("#chart", "| C | Am | F G |")
    page.fill("#bpm", "240")
    page.locator("#bpm").dispatch_event("change")
    page.locator("#chart").press("Enter")
    page.wait_for_function(
        "window.__sent.some(m => m.type === 'params' && m.chord_source === 'chart'"
        " && m.chords === '| C | Am | F G |' && m.tempo_bpm === 240)"
    )
    page.click("#count-in")
    assert page.locator("#click").is_checked()
    page.wait_for_function(
        "window.__sent.some(m => m.type === 'params' && typeof m.beat_time === 'number')"
    )
    page.wait_for_function("document.querySelector('#beats span.on') !== null", timeout=10_000)
    page.wait_for_function(
        "document.getElementById('chord-now').textContent === 'C'"
        " && document.getElementById('chord-next').textContent === 'Am'",
        timeout=10_000,
    )
    for key in ("a", "g", "f", "d"):  # the player comes in on the chart
        page.keyboard.down(key)
        page.wait_for_timeout(120)
        page.keyboard.up(key)
    page.wait_for_function(
        "document.getElementById('chord-now').textContent === 'Am'", timeout=10_000
    )
    labels = [c["label"] for c in page.evaluate("window.improv.rollChords()")]
    assert labels[:2] == ["C", "Am"], labels
    beats = page.evaluate("window.improv.beats()")
    assert beats and all(b["source"] == "clock" for b in beats)
    assert page.locator("#tempo-now").inner_text() == "240 bpm"
    shot = Path(os.environ.get("IMPROV_SCREENSHOT", tmp_path / "page.png"))
    page.screenshot(path=str(shot.with_name(shot.stem + "-chart.png")))
    # The left hand: chords from the keys below the split; the model's bass is off then.
    page.check("#p-bass")
    page.select_option("#chord-source", "left_hand")
    page.wait_for_function(
        "window.__sent.some(m => m.type === 'params' && m.chord_source === 'left_hand'"
        " && !m.parts.includes('bass'))"
    )
    assert page.locator("#chart").is_hidden()
    page.wait_for_timeout(300)
    assert not page.evaluate("window.improv.state().status !== 'live'"), page.evaluate(
        "window.improv.state()"
    )
    assert not errors, errors
    page.close()


WIDEST_OPTION_CUT = """() => {
  const cut = [];
  for (const sel of document.querySelectorAll('select[data-program]')) {
    if (sel.offsetParent === null) continue;  // in the other mode's controls
    const cs = getComputedStyle(sel), span = document.createElement('span');
    span.style.cssText = 'position:absolute;white-space:pre;visibility:hidden';
    span.style.font = cs.font;
    document.body.appendChild(span);
    let widest = 0;
    for (const o of sel.options) { span.textContent = o.text; widest = Math.max(widest, span.getBoundingClientRect().width); }
    span.remove();
    const room = sel.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight) - 16;
    if (widest > room) cut.push([sel.dataset.program, Math.round(widest), Math.round(room)]);
  }
  return cut;
}"""


def test_menus_read_whole_and_the_session_saves_as_midi(browser, server, tmp_path):
    """#22 item 12: the instrument menus' text is not cut off; "Save MIDI" writes what was
    played and what the model answered, both parts, every note ended."""
    import io

    import mido

    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("window.improv && window.improv.state().started", timeout=15_000)
    page.wait_for_function(
        "document.querySelector('select[data-program=lead]').options.length === 128"
    )
    assert page.evaluate(WIDEST_OPTION_CUT) == []
    page.click('#mode button[data-mode="accompany"]')
    page.check("#p-counter")
    page.check("#p-bass")
    page.wait_for_function("window.improv.state().mode === 'accompany'")
    assert page.evaluate(WIDEST_OPTION_CUT) == []
    page.click('#mode button[data-mode="respond"]')
    page.wait_for_function("window.improv.state().mode === 'respond'")
    page.evaluate(
        "document.getElementById('gap').value = 150; document.getElementById('gap').oninput();"
        "document.getElementById('length').value = 2; document.getElementById('length').oninput()"
    )
    page.wait_for_timeout(300)
    model = "window.improv.rollNotes().some(n => n.source === 'model')"
    for _ in range(5):
        for key in ("a", "d", "g", "k"):  # C E G C
            page.keyboard.down(key)
            page.wait_for_timeout(90)
            page.keyboard.up(key)
        page.wait_for_timeout(1500)
        if page.evaluate(model):
            break
    page.wait_for_function(model, timeout=15_000)
    page.wait_for_timeout(2500)  # the answer plays out
    with page.expect_download() as info:
        page.click("#save")
    path = tmp_path / "session.mid"
    info.value.save_as(path)
    mf = mido.MidiFile(file=io.BytesIO(path.read_bytes()))
    names = [t.name for t in mf.tracks]
    assert "you (melody)" in names and any(n.startswith("model ") for n in names), names
    answered = 0
    for track in mf.tracks:
        on: set[tuple[int, int]] = set()
        pitches = []
        for m in track:
            if m.type == "note_on" and m.velocity > 0:
                assert (m.channel, m.note) not in on
                on.add((m.channel, m.note))
                pitches.append(m.note)
            elif m.type in ("note_on", "note_off"):
                on.discard((m.channel, m.note))
        assert not on, f"{track.name}: notes left on"
        if track.name == "you (melody)":
            assert set(pitches) == {60, 64, 67, 72}
        if track.name.startswith("model "):
            answered += len(pitches)
    assert answered > 0
    assert not errors, errors
    page.close()
