"""The built book in a real browser (headless Chromium), page by page: `make check-book`.

For every page of the table of contents, served from a local HTTP server on loopback:

* the page loads: HTTP 200, a title, the article, and no failed resource or script error in the console;
* MathJax (bundled offline by sphinx-mathjax-offline) has typeset every formula without an error: no
  ``mjx-merror`` element (a TeX syntax error) and no red ``\\macro`` text (an undefined macro);
* every image has loaded (``naturalWidth > 0``);
* nothing overflows at a 1400 px wide window. An element *overflows* when its content is wider than the box
  the page gives it, so that the reader has to scroll it sideways or part of it is cut off. Measured as
  ``scrollWidth > clientWidth`` (more than 1 px, against rounding) of the element that holds the content:
  for code cells and text outputs the ``div.highlight pre``, for tables their scroll container, and the
  page itself (a horizontal scroll bar); for maths, the width of the rendered formula (``mjx-math``) against
  its ``mjx-container`` (a scroll box for display equations) and the ``.math`` element around it (which
  clips inline formulas).

A per-page report (page, overflowing display equations, inline formulas, code inputs, outputs, tables,
with each equation's label or first characters) is printed and written to _build/check-book/report.txt.
The search page is checked too: a search result's snippet shows readable text, not TeX source. And the
header of every chapter has the repository, issue, download (.md and .ipynb) and Binder buttons (no browser
needed for that one).
"""
from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "book" / "_build" / "html"
REPORT = ROOT / "_build" / "check-book" / "report.txt"
WIDTH = 1400


def _toc_pages() -> list[str]:
    import yaml

    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [ch["file"] for ch in part.get("chapters", [])]
    return [p + ".html" for p in pages]


PAGES = _toc_pages()

_INSPECT_JS = r"""
const done = arguments[arguments.length - 1];
const TOL = 1;
const short = (s, n = 60) => (s || "").replace(/\s+/g, " ").trim().slice(0, n);
function texOf(container) {
  try {
    for (const item of MathJax.startup.document.math) {
      if (item.typesetRoot === container) return item.math;
    }
  } catch (e) {}
  return container.textContent;
}
async function run() {
  // on a loaded machine the page may still be building: wait (at most 30 s) for its article before measuring
  const tArticle = Date.now();
  while (!document.querySelector("article, [role=main]") && Date.now() - tArticle < 30000) {
    await new Promise(r => setTimeout(r, 100));
  }
  const result = {title: document.title, article: !!document.querySelector("article, [role=main]"),
                  mathjax: "absent", merror: [], undefined_macros: [], images: [], overflow: {}};
  const hasMath = document.querySelector(".math") !== null;
  if (hasMath || window.MathJax) {
    const t0 = Date.now();
    while (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
      if (Date.now() - t0 > 60000) { result.mathjax = "did not load"; break; }
      await new Promise(r => setTimeout(r, 100));
    }
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      try { await MathJax.startup.promise; result.mathjax = "ok"; }
      catch (e) { result.mathjax = "error: " + e; }
    }
    const untypeset = [...document.querySelectorAll(".math")].filter(el => !el.querySelector("mjx-container"));
    if (hasMath && untypeset.length) result.untypeset = untypeset.map(el => short(el.textContent));
  }
  // images: load lazy ones too
  const imgs = [...document.querySelectorAll("img")];
  imgs.forEach(img => { img.loading = "eager"; });
  await Promise.all(imgs.map(img => img.complete ? null : new Promise(r => {
    img.addEventListener("load", r); img.addEventListener("error", r); setTimeout(r, 20000); })));
  result.images = imgs.map(img => ({src: img.getAttribute("src"), ok: img.complete && img.naturalWidth > 0}));
  if (document.fonts && document.fonts.ready) await document.fonts.ready;
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));

  for (const e of document.querySelectorAll("mjx-container mjx-merror")) {
    result.merror.push((e.getAttribute("data-mjx-error") || "error") + " in " + short(texOf(e.closest("mjx-container"))));
  }
  // an undefined macro is typeset as red text (MathJax's noundefined package); the glyphs are drawn by CSS,
  // so read the name from the hidden assistive MathML
  for (const t of document.querySelectorAll('mjx-container mjx-assistive-mml mtext[mathcolor="red"]')) {
    if (/^\\[A-Za-z]+$/.test(t.textContent.trim())) {
      result.undefined_macros.push(t.textContent.trim() + " in " + short(texOf(t.closest("mjx-container"))));
    }
  }
  const o = {display: [], inline: [], code: [], output: [], table: [], page: []};
  for (const c of document.querySelectorAll("mjx-container")) {
    const math = c.querySelector("mjx-math");
    const inner = math ? math.getBoundingClientRect().width : 0;
    if (c.offsetParent === null || inner === 0) continue;              // not rendered (hidden)
    // the rendered formula against the box it is given: the mjx-container (a scroll box for display
    // maths) and the span/div.math around it (which clips). scrollWidth of the container is not used: it
    // counts MathJax's hidden assistive MathML, a few pixels wider than the formula.
    const holder = c.parentElement && c.parentElement.matches(".math") ? c.parentElement : c;
    const over = Math.max(inner - c.clientWidth, inner - holder.clientWidth);
    if (over > TOL) {
      const box = c.closest("div.math");
      const label = box && box.id ? box.id.replace(/^equation-/, "") : "";
      const kind = c.getAttribute("display") === "true" ? "display" : "inline";
      o[kind].push({what: (label ? label + ": " : "") + short(texOf(c), 50), px: Math.round(over),
                    width: Math.round(inner), box: c.clientWidth});
    }
  }
  for (const pre of document.querySelectorAll("div.highlight pre")) {
    if (pre.offsetParent === null) continue;                          // hidden (a closed drop-down)
    const over = pre.scrollWidth - pre.clientWidth;
    if (over > TOL) {
      const kind = pre.closest(".cell_output, .output") ? "output" : "code";
      o[kind].push({what: short(pre.textContent.split("\n").find(l => l.trim()) || "", 50), px: Math.round(over),
                    width: pre.scrollWidth, box: pre.clientWidth});
    }
  }
  for (const out of document.querySelectorAll(".cell_output .output:not(.highlight-myst-ansi), .cell_output .text_html")) {
    if (out.offsetParent === null || out.querySelector("div.highlight pre")) continue;
    const over = out.scrollWidth - out.clientWidth;
    if (over > TOL) o.output.push({what: short(out.textContent, 50), px: Math.round(over),
                                   width: out.scrollWidth, box: out.clientWidth});
  }
  for (const table of document.querySelectorAll("article table")) {
    if (table.offsetParent === null) continue;
    const box = table.closest(".pst-scrollable-table-container") || table.parentElement;
    const over = Math.max(box.scrollWidth - box.clientWidth, table.getBoundingClientRect().width - box.clientWidth);
    if (over > TOL) o.table.push({what: short(table.textContent, 50), px: Math.round(over),
                                  width: Math.round(table.getBoundingClientRect().width), box: box.clientWidth});
  }
  const doc = document.documentElement;
  if (doc.scrollWidth - doc.clientWidth > TOL) {
    o.page.push({what: "the page scrolls sideways", px: doc.scrollWidth - doc.clientWidth,
                 width: doc.scrollWidth, box: doc.clientWidth});
  }
  result.overflow = o;
  result.viewport = window.innerWidth;
  return result;
}
run().then(done, e => done({error: String(e)}));
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass                     # a browser that drops a connection mid-file is not a failure of the book


@pytest.fixture(scope="module")
def book(request):
    if not (HTML / "index.html").is_file():
        pytest.skip(f"the book is not built ({HTML / 'index.html'} is missing): run `make book`, "
                    "or `make check-book`, which builds it first")
    from browser_support import chromium_driver, quit_driver

    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    drv = chromium_driver(WIDTH, 1000)
    results: dict[str, dict] = {}

    def inspect(page: str) -> dict:
        if page not in results:
            base = f"http://127.0.0.1:{server.server_address[1]}/"
            import urllib.request

            with urllib.request.urlopen(base + page, timeout=30) as r:
                status = r.status
            drv.get_log("browser")                                   # drop earlier messages
            drv.get(base + page)
            res = drv.execute_async_script(_INSPECT_JS)
            res["status"] = status
            # console errors, except the browser's own request for /favicon.ico (the book has no icon)
            res["console"] = [e["message"] for e in drv.get_log("browser")
                              if e.get("level") == "SEVERE" and "/favicon.ico" not in e["message"]]
            results[page] = res
        return results[page]

    inspect.driver = drv
    inspect.base = lambda: f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        yield inspect
    finally:
        quit_driver(drv)
        server.shutdown()
        if results:
            text = report(results)
            REPORT.parent.mkdir(parents=True, exist_ok=True)
            REPORT.write_text(text)
            capture = request.config.pluginmanager.getplugin("capturemanager")
            if capture is not None:
                with capture.global_and_fixture_disabled():
                    print("\n" + text)
            else:
                print("\n" + text)


def report(results: dict) -> str:
    kinds = ["display", "inline", "code", "output", "table", "page"]
    head = f"{'page':44} {'display eq':>10} {'inline eq':>9} {'code':>5} {'output':>6} {'table':>5} {'page':>4}"
    lines = [f"Overflow report at a {WIDTH} px window (elements whose content is wider than their box)", "", head,
             "-" * len(head)]
    details = []
    for page in PAGES:
        if page not in results:
            continue
        o = results[page].get("overflow", {})
        counts = [len(o.get(k, [])) for k in kinds]
        lines.append(f"{page:44} {counts[0]:>10} {counts[1]:>9} {counts[2]:>5} {counts[3]:>6} {counts[4]:>5} {counts[5]:>4}")
        for k in kinds:
            for item in o.get(k, []):
                details.append(f"  {page}  [{k}] {item['what']!r}: {item['px']} px too wide "
                               f"({item['width']} px in {item['box']} px)")
    total = sum(sum(len(v) for v in r.get("overflow", {}).values()) for r in results.values())
    lines += ["-" * len(head), f"total overflowing elements: {total}", ""]
    if details:
        lines += ["Overflowing elements:"] + details
    return "\n".join(lines) + "\n"


@pytest.mark.browser
@pytest.mark.parametrize("page", PAGES)
def test_page_loads(book, page):
    r = book(page)
    assert "error" not in r, r.get("error")
    assert r["status"] == 200
    assert r["title"] and "404" not in r["title"], r["title"]
    assert r["article"], "no article in the page"
    assert r["viewport"] == WIDTH, f"the window is {r['viewport']} px wide, not {WIDTH}"
    assert not r["console"], "console errors:\n" + "\n".join(r["console"])


@pytest.mark.browser
@pytest.mark.parametrize("page", PAGES)
def test_mathjax_typesets_without_errors(book, page):
    r = book(page)
    assert r["mathjax"] in ("ok", "absent"), f"MathJax: {r['mathjax']}"
    problems = ([f"left as TeX: {t}" for t in r.get("untypeset") or []] + [f"TeX error: {e}" for e in r["merror"]]
                + [f"undefined macro: {m}" for m in r["undefined_macros"]])
    assert not problems, f"{page}:\n  " + "\n  ".join(problems)


@pytest.mark.browser
@pytest.mark.parametrize("page", PAGES)
def test_images_load(book, page):
    r = book(page)
    broken = [img["src"] for img in r["images"] if not img["ok"]]
    assert not broken, f"images that did not load: {broken}"


@pytest.mark.browser
@pytest.mark.parametrize("page", PAGES)
def test_nothing_overflows(book, page):
    o = book(page)["overflow"]
    bad = {k: v for k, v in o.items() if v}
    assert not bad, f"{page} at {WIDTH} px:\n" + "\n".join(
        f"  [{k}] {item['what']!r}: {item['px']} px too wide" for k, v in bad.items() for item in v)


@pytest.mark.browser
def test_search_snippets_are_readable(book):
    """Snippets are cut from the pages' HTML, where maths is TeX; book/_static/search-snippets.js fixes that."""
    from browser_support import wait_for
    from selenium.webdriver.common.by import By

    drv = book.driver
    drv.get(book.base() + "search.html?q=Tweedie")
    snippets = wait_for(lambda: [e.text for e in drv.find_elements(By.CSS_SELECTOR, "#search-results p.context")
                                 if e.text.strip()], 90, what="search results with snippets")
    raw = [s for s in snippets if "\\(" in s or "\\[" in s or "\\mathcal" in s or "\\frac" in s]
    assert not raw, "snippets with TeX source:\n" + "\n".join(s[:200] for s in raw)
    # and the conversion itself
    readable = drv.execute_script("return window.sacodeReadableTeX(arguments[0])",
                                  r"\(\mathcal N(0.5, 0.8^2) \le \tfrac{1}{2}\beta\)")
    assert readable == "N(0.5, 0.8^2) ≤ (1)/(2)β", readable


@pytest.mark.parametrize("page", [p for p in PAGES if p.startswith("notebooks/")])
def test_chapter_header_has_repository_download_and_launch_buttons(page):
    import re

    if not (HTML / page).is_file():
        pytest.skip(f"the book is not built ({HTML / page} is missing): run `make book`")
    html = (HTML / page).read_text()
    repo = "https://github.com/sacode-book/sacode"
    stem = Path(page).stem
    assert f'href="{repo}"' in html, "no repository button"
    assert f'href="{repo}/issues/new?' in html, "no issues button"
    binder = f"https://mybinder.org/v2/gh/sacode-book/sacode/main?urlpath=lab/tree/notebooks/{stem}.md"
    assert f'href="{binder}"' in html, "no Binder button for the chapter"
    for ext in (".md", ".ipynb"):
        m = re.search(r'href="([^"]*_sources/notebooks/' + re.escape(stem + ext) + ')"', html)
        assert m, f"no download button for the {ext} file"
        assert (HTML / "_sources" / "notebooks" / f"{stem}{ext}").is_file(), f"the {ext} download is missing"
