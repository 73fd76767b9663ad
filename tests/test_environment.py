"""environment.yml, requirements.txt and pyproject.toml stay in step.

conda is not available here, so this test is what keeps the conda mirror honest: environment.yml installs exactly
`-r requirements.txt` through pip with a python that pyproject allows; requirements.txt pins the CPU torch and
installs the package itself with extras that pyproject defines.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
specifiers = pytest.importorskip("packaging.specifiers")
version = pytest.importorskip("packaging.version")
try:
    import tomllib
except ModuleNotFoundError:  # python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
TORCH_PIN = "2.13.0"


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def env_yml() -> dict:
    return yaml.safe_load((REPO / "environment.yml").read_text())


@pytest.fixture(scope="module")
def requirements() -> list[str]:
    lines = [ln.split("#", 1)[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    return [ln for ln in lines if ln]


def _conda_deps(env_yml):
    deps = env_yml["dependencies"]
    strings = [d for d in deps if isinstance(d, str)]
    dicts = [d for d in deps if isinstance(d, dict)]
    return strings, dicts


def test_environment_yml_installs_exactly_the_requirements(env_yml):
    assert env_yml.get("name") == "sacode"
    strings, dicts = _conda_deps(env_yml)
    assert "pip" in strings, "environment.yml must install pip"
    assert dicts == [{"pip": ["-r requirements.txt"]}], \
        f"environment.yml must install exactly `-r requirements.txt` via pip; got {dicts}"
    # nothing else than python and pip from conda: every other package comes from requirements.txt
    others = [s for s in strings if not re.match(r"^(python|pip)\b", s)]
    assert others == [], f"conda packages outside requirements.txt would drift from it: {others}"


def test_python_version_satisfies_requires_python(env_yml, pyproject):
    strings, _ = _conda_deps(env_yml)
    py = [s for s in strings if re.match(r"^python\s*[=<>!~]", s)]
    assert len(py) == 1, f"environment.yml must pin one python version; got {py}"
    ver = re.sub(r"^python\s*=*\s*", "", py[0]).rstrip(".*")
    requires = specifiers.SpecifierSet(pyproject["project"]["requires-python"])
    assert version.Version(ver) in requires, f"python {ver} does not satisfy requires-python {requires}"


def test_requirements_pin_torch_and_install_the_package(requirements, pyproject):
    assert f"torch=={TORCH_PIN}" in requirements, "requirements.txt must pin the CPU build torch==" + TORCH_PIN
    editable = [ln for ln in requirements if ln.startswith("-e")]
    assert len(editable) == 1 and re.fullmatch(r"-e\s+\.(\[[\w,\s-]+\])?", editable[0]), editable
    # the pin agrees with the package's own torch requirement
    torch_req = [d for d in pyproject["project"]["dependencies"] if re.match(r"^torch\b", d)]
    assert len(torch_req) == 1
    spec = specifiers.SpecifierSet(torch_req[0][len("torch"):].strip())
    assert version.Version(TORCH_PIN) in spec, f"torch=={TORCH_PIN} violates pyproject's {torch_req[0]}"


def test_every_extra_in_requirements_exists_in_pyproject(requirements, pyproject):
    extras = pyproject["project"].get("optional-dependencies", {})
    named = []
    for ln in requirements:
        m = re.fullmatch(r"-e\s+\.\[([\w,\s-]+)\]", ln)
        if m:
            named += [e.strip() for e in m.group(1).split(",")]
    assert named, "requirements.txt should install the package with its extras, e.g. -e .[dev]"
    missing = [e for e in named if e not in extras]
    assert not missing, f"extras {missing} named in requirements.txt are not defined in pyproject.toml"
    # extras that refer back to the package (dev = ["sacode[sd,book,test]"]) must name defined extras too
    name = pyproject["project"]["name"]
    for extra, deps in extras.items():
        for dep in deps:
            m = re.fullmatch(rf"{re.escape(name)}\[([\w,\s-]+)\]", dep.strip())
            if m:
                inner = [e.strip() for e in m.group(1).split(",")]
                assert all(e in extras for e in inner), f"extra {extra!r} refers to undefined extras {inner}"


def test_installed_torch_is_the_pinned_one():
    import torch
    assert version.Version(torch.__version__).public.split("+")[0] == TORCH_PIN, (
        f"the environment runs torch {torch.__version__}, requirements.txt pins {TORCH_PIN}: rebuild .venv")


def test_pytest_markers_are_declared(pyproject):
    markers = " ".join(pyproject["tool"]["pytest"]["ini_options"]["markers"])
    assert "slow:" in markers and "gpu:" in markers
