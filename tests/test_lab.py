"""`make lab`: the repository's Jupyter configuration (.jupyter/) opens the chapters as notebooks.

A JupyterLab server is started on loopback with JUPYTER_CONFIG_PATH=<repo>/.jupyter, as `make lab` does, on a
copy of the chapters (saving must not touch the repository), with the user's own Jupyter settings kept out.
Through its REST API we check that

* the default viewer of Markdown files is jupytext's notebook ("Jupytext Notebook"), so a double click opens a
  chapter as a notebook, and the jupytext front-end extension that provides that viewer is loaded;
* every chapter is served as a valid notebook;
* opening a chapter changes nothing: the notebook metadata already holds the `kernelspec` and `language_info`
  that the kernel reports (JupyterLab writes them on open and marks the notebook unsaved if they differ);
* saving an unchanged chapter rewrites the file byte for byte, and a real edit is saved.

The `browser` test does the same as a user in Chromium: double click, no unsaved mark, Ctrl+S is a no-op.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("jupyterlab")
pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9]*.md"))
TOKEN = "sacode-lab-test"
VIEWER = "Jupytext Notebook"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, base: str, root: Path, log: Path):
        self.base, self.root, self.log = base, root, log
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"token {TOKEN}"

    def get(self, path: str, **params):
        r = self.session.get(self.base + path, params=params, timeout=60)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text[:500]}"
        return r.json() if "json" in r.headers.get("Content-Type", "") else r.text

    def contents(self, path: str, **params):
        return self.get("/api/contents/" + path, **params)

    def save(self, path: str, notebook: dict):
        r = self.session.put(self.base + "/api/contents/" + path, timeout=60,
                             json={"type": "notebook", "format": "json", "content": notebook})
        assert r.status_code in (200, 201), f"PUT {path}: {r.status_code} {r.text[:500]}"
        return r.json()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("lab")
    root = work / "root"
    (root / "notebooks").mkdir(parents=True)
    for ch in CHAPTERS:
        shutil.copy2(ch, root / "notebooks" / ch.name)
    home = work / "home"
    env = dict(os.environ)
    env.update({
        "JUPYTER_CONFIG_PATH": str(ROOT / ".jupyter"),       # what the Makefile exports for `make lab`
        "JUPYTER_CONFIG_DIR": str(home / "config"),          # not the user's ~/.jupyter
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    })
    port = _free_port()
    log = work / "server.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
           f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    server = Lab(f"http://127.0.0.1:{port}", root, log)
    try:
        end = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if server.session.get(server.base + "/api/status", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > end:
                pytest.fail(f"jupyter lab did not start in 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        try:
            server.session.post(server.base + "/api/shutdown", timeout=10)
            proc.wait(timeout=30)
        except Exception:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_markdown_files_open_with_the_jupytext_notebook_viewer(lab):
    plugin = lab.get("/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
    defaults = plugin["schema"]["properties"]["defaultViewers"]["default"]
    assert defaults.get("markdown") == VIEWER, f"default viewers: {defaults}"
    assert defaults.get("myst") == VIEWER, f"default viewers: {defaults}"
    # no user setting overrides it in this clean settings directory
    assert "defaultViewers" not in (plugin.get("settings") or {})
    # the viewer exists: jupytext's front-end extension is installed and loaded by the page
    page = lab.get("/lab")
    m = re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', page, re.S)
    assert m, "no page config in /lab"
    names = [ext["name"] for ext in json.loads(m.group(1)).get("federated_extensions", [])]
    assert "jupyterlab-jupytext" in names, f"federated extensions: {names}"


def test_every_chapter_is_served_as_a_notebook(lab):
    listing = lab.contents("notebooks", content=1)
    kinds = {item["name"]: item["type"] for item in listing["content"]}
    for ch in CHAPTERS:
        assert kinds.get(ch.name) == "notebook", f"{ch.name} is listed as {kinds.get(ch.name)}"
        model = lab.contents(f"notebooks/{ch.name}", type="notebook", content=1)
        assert model["type"] == "notebook" and model["format"] == "json"
        nb = nbformat.from_dict(model["content"])
        nbformat.validate(nb)
        types = {c.cell_type for c in nb.cells}
        assert {"markdown", "code"} <= types, f"{ch.name}: cell types {types}"
        assert nb.cells[0].source.startswith("# "), f"{ch.name} does not start with its title"


def test_opening_a_chapter_records_what_the_kernel_reports(lab):
    """JupyterLab writes the kernel's kernelspec and language_info into the notebook when its kernel starts,
    and marks the notebook unsaved if anything changed; the served notebook must already hold both."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        reply = kc.kernel_info(reply=True, timeout=120)
        language_info = reply["content"]["language_info"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    spec = KernelSpecManager().get_kernel_spec("python3")
    kernelspec = {"display_name": spec.display_name, "language": spec.language, "name": "python3"}
    for ch in CHAPTERS:
        meta = lab.contents(f"notebooks/{ch.name}", type="notebook", content=1)["content"]["metadata"]
        assert meta.get("kernelspec") == kernelspec, f"{ch.name}: {meta.get('kernelspec')} != {kernelspec}"
        assert meta.get("language_info") == language_info, f"{ch.name}: {meta.get('language_info')}"


def test_saving_an_unchanged_chapter_leaves_the_file_as_it_was(lab):
    for ch in CHAPTERS:
        path = lab.root / "notebooks" / ch.name
        before = path.read_bytes()
        model = lab.contents(f"notebooks/{ch.name}", type="notebook", content=1)
        lab.save(f"notebooks/{ch.name}", model["content"])
        after = path.read_bytes()
        if after != before:
            import difflib

            diff = "\n".join(list(difflib.unified_diff(before.decode().splitlines(), after.decode().splitlines(),
                                                       "before", "after", lineterm=""))[:30])
            pytest.fail(f"saving {ch.name} unchanged rewrote it:\n{diff}")
        assert after == ch.read_bytes()


def test_an_edit_is_saved_and_the_header_kept(lab):
    ch = CHAPTERS[0]
    path = lab.root / "notebooks" / f"edited_{ch.name}"
    shutil.copy2(ch, path)
    model = lab.contents(f"notebooks/{path.name}", type="notebook", content=1)
    nb = model["content"]
    nb["cells"].append({"cell_type": "markdown", "metadata": {}, "source": "A new cell written in the lab."})
    lab.save(f"notebooks/{path.name}", nb)
    text = path.read_text()
    original = ch.read_text()
    header = original[:original.index("\n---\n", 3) + 5]
    assert text.startswith(header), text[:400]
    assert text.rstrip().endswith("A new cell written in the lab."), text[-300:]
    reread = lab.contents(f"notebooks/{path.name}", type="notebook", content=1)["content"]
    assert len(reread["cells"]) == len(nb["cells"])


@pytest.mark.browser
def test_double_click_opens_a_chapter_as_a_notebook_with_no_unsaved_mark(lab):
    from browser_support import chromium_driver, quit_driver, wait_for
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    drv = chromium_driver()
    try:
        for ch in (CHAPTERS[0], CHAPTERS[min(4, len(CHAPTERS) - 1)]):
            path = lab.root / "notebooks" / ch.name
            drv.get(f"{lab.base}/lab/tree/notebooks?token={TOKEN}&reset")
            item = wait_for(lambda: drv.find_elements(By.CSS_SELECTOR, f'.jp-DirListing-item[title*="{ch.name}"]'),
                            120, what=f"{ch.name} in the file browser")[0]
            ActionChains(drv).double_click(item).perform()
            tab = f'//li[contains(@class, "lm-TabBar-tab") and .//div[text()="{ch.name}"]]'
            wait_for(lambda: drv.find_elements(By.XPATH, tab), 60, what=f"a tab for {ch.name}")
            editor = drv.find_elements(By.CSS_SELECTOR, ".jp-FileEditor")
            assert not editor, f"{ch.name} opened in the text editor, not as a notebook"
            wait_for(lambda: drv.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell"),
                     60, what=f"{ch.name} as a notebook")
            wait_for(lambda: drv.execute_script(
                "const e = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) "
                ".jp-Notebook-ExecutionIndicator'); return e && e.getAttribute('data-status') === 'idle';"),
                120, what="the kernel to be idle")
            time.sleep(3)                      # metadata updates follow the kernel's info reply
            classes = drv.find_element(By.XPATH, tab).get_attribute("class")
            assert "jp-mod-dirty" not in classes, f"{ch.name} shows the unsaved mark right after opening"
            before, mtime = path.read_bytes(), path.stat().st_mtime_ns
            drv.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell").click()
            ActionChains(drv).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
            wait_for(lambda: path.stat().st_mtime_ns != mtime, 30, what=f"{ch.name} to be saved")
            assert path.read_bytes() == before, f"Ctrl+S on the unchanged {ch.name} changed the file"
            drv.execute_script("window.localStorage.clear()")
    finally:
        quit_driver(drv)
