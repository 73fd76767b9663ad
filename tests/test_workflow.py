"""The GitHub Actions workflow that publishes the book (.github/workflows/book.yml), checked offline.

check-jsonschema validates it against the GitHub workflow schema that it bundles (no network), and the
structure is checked against what the book needs: triggered by pushes to main, the CPU build of the torch
that requirements.txt pins installed before `make book`, the HTML folder that the Makefile builds uploaded
as the Pages artifact, and a deploy job with the permissions Pages needs.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"


@pytest.fixture(scope="module")
def wf() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def _uses(step: dict, action: str) -> bool:
    return str(step.get("uses", "")).split("@")[0] == action


def test_workflow_is_valid_against_the_github_workflow_schema():
    pytest.importorskip("check_jsonschema")
    proc = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           str(WORKFLOW)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_published_on_pushes_to_main(wf):
    on = wf.get("on", wf.get(True))          # YAML 1.1 reads a bare `on` key as True
    assert on["push"]["branches"] == ["main"]
    perms = wf["permissions"]
    assert perms.get("pages") == "write" and perms.get("id-token") == "write"
    assert perms.get("contents") == "read"


def test_build_job_builds_the_book_with_cpu_torch_and_uploads_the_html(wf):
    steps = _steps(wf["jobs"]["build"])
    assert _uses(steps[0], "actions/checkout")
    py = next(s for s in steps if _uses(s, "actions/setup-python"))
    assert str(py["with"]["python-version"]) == "3.11" and py["with"]["cache"] == "pip"
    runs = [(i, s.get("run", "")) for i, s in enumerate(steps)]
    pin = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    torch_step = next((i for i, r in runs if f"torch=={pin}" in r
                       and "--index-url https://download.pytorch.org/whl/cpu" in r), None)
    assert torch_step is not None, f"no step installs torch=={pin} (requirements.txt) from the CPU wheel index"
    book_step = next((i for i, r in runs if re.search(r"(^|\s)make book(\s|$)", r)), None)
    assert book_step is not None and book_step > torch_step, "`make book` must run after the CPU torch install"
    upload = next((i, s) for i, s in enumerate(steps) if _uses(s, "actions/upload-pages-artifact"))
    assert upload[0] > book_step
    html = re.search(r"^BOOK_HTML := (\S+)/index.html$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert upload[1]["with"]["path"] == html, "the artifact must be the folder that `make book` writes"
    assert any(_uses(s, "actions/configure-pages") for s in steps)


def test_deploy_job_deploys_the_artifact_to_pages(wf):
    deploy = wf["jobs"]["deploy"]
    assert deploy["needs"] == "build" or deploy["needs"] == ["build"]
    assert deploy["environment"]["name"] == "github-pages"
    step = next(s for s in _steps(deploy) if _uses(s, "actions/deploy-pages"))
    assert deploy["environment"]["url"] == "${{ steps.%s.outputs.page_url }}" % step["id"]
