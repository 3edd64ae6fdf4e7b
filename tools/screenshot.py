"""A screenshot of the studio in the middle of a generation, for the README.

    python tools/screenshot.py                                  # the embedded default -> docs/studio.png
    python tools/screenshot.py --class "alpine dusk" --at-scale 7 --seed 3 --out docs/studio.png

Starts the app (loopback, a free port, outputs in a temporary folder) with its hidden --scale-delay
so that every scale stays on screen for a while, opens it in Debian's Chromium through Playwright,
selects the class (--class, a name or an id; default: the page's "(random)"), sets the seed, presses
Generate and, once the k-th scale's preview (--at-scale) is shown in the live preview and in the
filmstrip, saves a --width x --height viewport screenshot (PNG) to --out. The app is stopped at the
end, also on Ctrl-C or an error.

    python tools/screenshot.py --tabs docs/screens               # every tab at 1280x720 and 390x844

--tabs FOLDER: after a generation, every tab (Generate with its result, then the result sent to Edit,
Guide and Control, the control map previewed) at a laptop's 1280x720 and a phone's 390x844, as
FOLDER/<tab>_<width>.png. Every wait is bounded by --timeout (a loaded machine is slow, not stuck).
"""
import argparse
import contextlib
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.bench_client import AppProcess, terminate_as_exit  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

STATUS_JS = "() => (document.querySelector('#status') || {}).innerText || ''"
# the k-th scale is on screen: the status says so, the live preview and k filmstrip pictures are loaded
SHOWN_JS = """(k) => {
    const status = (document.querySelector('#status') || {}).innerText || '';
    const m = status.match(/Scale (\\d+)\\/(\\d+)/);
    if (!m || +m[1] < k) return false;
    const ok = img => img && img.complete && img.naturalWidth > 0;
    const strip = [...document.querySelectorAll('#filmstrip img')];
    return ok(document.querySelector('#preview img')) && strip.length >= k && strip.every(ok);
}"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Screenshot the studio mid-generation (for the README)")
    ap.add_argument("--model", default="default", help="app.py --model source, or 'default' (the embedded model)")
    ap.add_argument("--class", dest="class_name", default=None, help="class to select (a name or an id)")
    ap.add_argument("--seed", type=int, default=0, help="seed to type in (-1: random; default 0)")
    ap.add_argument("--at-scale", type=int, default=6, help="capture once this scale's preview is shown (default 6)")
    ap.add_argument("--scale-delay", type=float, default=2.0,
                    help="seconds the app waits after every scale, so the capture is reliable (default 2)")
    ap.add_argument("--preview", choices=["full", "fast"], default="full", help="live preview mode (default full)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "studio.png"), help="PNG to write (default docs/studio.png)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--pixel-ratio", type=float, default=1.0, help="device scale factor (2: a sharper, larger PNG)")
    ap.add_argument("--device", default=None, help="app.py --device")
    ap.add_argument("--threads", type=int, default=None, help="app.py --threads")
    ap.add_argument("--port", type=int, default=None, help="port for the app (default: a free one)")
    ap.add_argument("--chromium", default=CHROMIUM, help=f"the browser (default {CHROMIUM})")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the k-th scale")
    ap.add_argument("--tabs", default=None, metavar="FOLDER",
                    help="screenshot every tab at 1280x720 and 390x844 into FOLDER instead")
    args = ap.parse_args(argv)
    if args.at_scale < 1:
        ap.error("--at-scale must be at least 1")
    return args


def select_class(page, name: str) -> None:
    """Pick `name` in the Generate tab's class dropdown (an option if one matches, else typed in)."""
    box = page.locator("#gen-class input").first
    box.click()
    box.fill(name)
    page.wait_for_timeout(300)
    options = page.get_by_role("option")
    for i in range(options.count()):
        if options.nth(i).inner_text().strip().lower() == name.strip().lower():
            options.nth(i).click()
            break
    else:  # an id, or a custom value: the studio accepts ids and names in any case
        box.press("Enter")
    page.wait_for_timeout(200)
    with contextlib.suppress(Exception):
        page.locator("body").click(position={"x": 5, "y": 5})  # close the list


def capture(url: str, args) -> str:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": args.width, "height": args.height},
                                    device_scale_factor=args.pixel_ratio, color_scheme="light")
            page.set_default_timeout(60_000)
            page.goto(url)
            page.wait_for_selector("#generate-btn")
            page.wait_for_timeout(500)  # fonts and layout settle
            if args.class_name:
                select_class(page, args.class_name)
            if args.seed is not None:
                seed = page.get_by_label("Seed (-1 = random)")
                seed.fill(str(args.seed))
                seed.press("Tab")
            page.click("#generate-btn")
            timeout = args.timeout * 1000
            page.wait_for_function(f"({STATUS_JS})().match(/Scale \\d+\\/\\d+|⚠️|Done/)", timeout=timeout)
            status = page.evaluate(STATUS_JS)
            if "⚠️" in status:
                raise RuntimeError(f"the studio reported: {status}")
            m = re.search(r"Scale \d+/(\d+)", status)
            num_scales = int(m.group(1)) if m else args.at_scale
            k = min(args.at_scale, num_scales)
            if k != args.at_scale:
                print(f"the model has {num_scales} scales: capturing at scale {k}", flush=True)
            page.wait_for_function(SHOWN_JS, arg=k, timeout=timeout)
            page.evaluate("() => window.scrollTo(0, 0)")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=False)
            return page.evaluate(STATUS_JS)
        finally:
            browser.close()


TAB_SIZES = ((1280, 720), (390, 844))
TABS = (("generate", None, None), ("edit", "#send-edit", "#editor canvas"), ("guide", "#send-guide", "#guide canvas"),
        ("control", "#send-control", "#control-editor canvas"))


def capture_tabs(url: str, args) -> list:
    """Every tab after a generation, at a laptop's and a phone's size -> the files written."""
    from playwright.sync_api import sync_playwright

    folder = Path(args.tabs)
    folder.mkdir(parents=True, exist_ok=True)
    timeout, written = args.timeout * 1000, []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=ARGS)
        try:
            for width, height in TAB_SIZES:
                page = browser.new_page(viewport={"width": width, "height": height},
                                        device_scale_factor=args.pixel_ratio, color_scheme="light")
                page.set_default_timeout(timeout)
                page.goto(url)
                page.wait_for_selector("#generate-btn", timeout=timeout)
                if args.seed is not None:
                    seed = page.get_by_label("Seed (-1 = random)")
                    seed.fill(str(args.seed))
                    seed.press("Tab")
                page.click("#generate-btn")
                page.wait_for_function(f"({STATUS_JS})().match(/Done|⚠️/)", timeout=timeout)
                for name, button, ready in TABS:
                    if button:
                        page.click(button)
                        page.wait_for_selector(ready, state="visible", timeout=timeout)
                        page.wait_for_timeout(800)  # the editor lays out its picture
                    if name == "control":
                        page.click("#map-btn")
                        page.wait_for_selector("#control-map img", state="visible", timeout=timeout)
                    page.evaluate("() => { window.scrollTo(0, 0); const o = document.getElementById('outputs');"
                                  " if (o) o.scrollTo(0, 0); }")  # the outputs column scrolls on its own
                    page.wait_for_timeout(300)
                    path = folder / f"{name}_{width}.png"
                    page.screenshot(path=str(path), full_page=False)
                    written.append(str(path))
                page.close()
        finally:
            browser.close()
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    extra = ["--scale-delay", str(args.scale_delay), "--preview", args.preview]
    extra += (["--device", args.device] if args.device else []) + (["--threads", str(args.threads)]
                                                                   if args.threads else [])
    app = AppProcess(args.model, port=args.port, extra=extra, log=lambda s: print(s, flush=True))
    t0 = time.monotonic()
    try:
        with terminate_as_exit(), app:
            if args.tabs:
                written = capture_tabs(app.url, args)
            else:
                status = capture(app.url, args)
    except KeyboardInterrupt:
        print("interrupted; the app is stopped", file=sys.stderr)
        return 130
    except Exception as e:  # the app did not start, a timeout in the browser ...
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.tabs:
        print(f"wrote {len(written)} screenshots in {time.monotonic() - t0:.0f} s: {' '.join(written)}")
        return 0
    print(f"wrote {args.out} ({args.width}x{args.height}, {time.monotonic() - t0:.0f} s) at: "
          f"{' '.join(status.split())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
