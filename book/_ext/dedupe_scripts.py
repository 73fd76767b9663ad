"""Drop duplicate <script> tags from the pages.

With Sphinx 7.4, a script that an extension adds after the builder starts (sphinx-thebe's and
sphinx-togglebutton's inline configuration) is registered once with no file name and once more, when the pages
are prepared, with an empty file name; the two do not compare equal, so every page got both. The second
`const THEBE_JS_URL = ...` then throws "Identifier 'THEBE_JS_URL' has already been declared" in the browser
(tests/test_book_browser.py checks the console). This keeps the first of scripts with the same file and body.
"""
from __future__ import annotations


def _key(script) -> tuple:
    filename = getattr(script, "filename", script) or ""
    attributes = getattr(script, "attributes", {}) or {}
    return str(filename), tuple(sorted((str(k), str(v)) for k, v in attributes.items()))


def _dedupe(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        key = _key(script)
        if key not in seen:
            seen.add(key)
            kept.append(script)
    scripts[:] = kept


def setup(app):
    app.connect("html-page-context", _dedupe, priority=900)   # after the extensions that add scripts
    return {"parallel_read_safe": True, "parallel_write_safe": True}
