# Jupyter server configuration for `make lab` (the Makefile exports JUPYTER_CONFIG_PATH=<repo>/.jupyter).
#
# jupyter_server_config.json next to this file sets allow_root; labconfig/default_setting_overrides.json makes
# jupytext's "Jupytext Notebook" the default viewer of .md files, so a double click opens a chapter as a
# notebook. This file makes opening a chapter and saving it unchanged a no-op:
#
# * On open, JupyterLab writes the running kernel's `kernelspec` and `language_info` into the notebook
#   metadata, and any difference from what it loaded marks the notebook as modified. jupytext does not keep
#   `language_info` in a .md file and the chapters' headers name the kernel briefly, so every chapter showed
#   the "unsaved" dot as soon as it opened. The contents manager below fills both entries in, for the kernel
#   that the chapter names, with exactly what that kernel will report.
# * On save, jupytext rewrites the YAML header in its own style and stamps its version. When the header's
#   content is unchanged (ignoring those stamps, and the kernelspec details added above), the file keeps its
#   original header text, so saving an unchanged chapter leaves the file byte for byte the same.
#
# tests/test_lab.py checks all of this through the server's REST API on loopback (and in a real browser
# when Chromium is installed).
import copy
import os
import sys

import yaml
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from jupytext.async_contentsmanager import build_async_jupytext_contents_manager_class

c = get_config()  # noqa: F821  (provided by traitlets when it loads this file)

_STAMPS = ("format_version", "jupytext_version")


def _split_header(text):
    """(header text including both '---' lines, rest) of a MyST notebook; ('', text) without a header."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 3)
        if end >= 0:
            return text[: end + 5], text[end + 5 :]
    return "", text


def _header_data(header):
    try:
        data = yaml.safe_load(header.strip().strip("-")) if header else {}
    except yaml.YAMLError:
        return None
    if not isinstance(data, dict):
        return None
    data = copy.deepcopy(data)
    rep = data.get("jupytext", {}).get("text_representation", {})
    for key in _STAMPS:
        rep.pop(key, None)
    return data


class _KeepHeaderManager(AsyncLargeFileManager):
    """Writes text files as usual, except that a MyST header whose content is unchanged keeps its text."""

    async def save(self, model, path=""):
        if model.get("type") == "file" and model.get("format") == "text" and path.endswith(".md"):
            os_path = self._get_os_path(path.strip("/"))
            if os.path.isfile(os_path):
                with open(os_path, encoding="utf-8") as f:
                    old_header, _ = _split_header(f.read())
                new_header, body = _split_header(model["content"])
                if old_header and new_header and old_header != new_header:
                    old, new = _header_data(old_header), _header_data(new_header)
                    if old is not None and old == new:
                        model = {**model, "content": old_header + body}
        return await super().save(model, path)


def _kernel_metadata(name):
    """(kernelspec, language_info) that JupyterLab will record for kernel `name`; language_info is None
    unless the kernel is this Python's ipykernel (then its kernel_info reply is known without starting it)."""
    from jupyter_client.kernelspec import KernelSpecManager

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except Exception:
        return None, None
    kernelspec = {"display_name": spec.display_name, "language": spec.language, "name": name}
    info = None
    argv = spec.argv or []
    # jupyter_client starts a kernel whose argv[0] is "python" (or pythonX, pythonX.Y) with the server's Python
    pythons = {"python", "python%d" % sys.version_info[0], "python%d.%d" % sys.version_info[:2]}
    same_python = argv and (argv[0] in pythons or os.path.realpath(argv[0]) == os.path.realpath(sys.executable))
    if same_python and argv[1:3] == ["-m", "ipykernel_launcher"]:
        try:
            from ipykernel.ipkernel import IPythonKernel

            info = copy.deepcopy(IPythonKernel.language_info)
        except Exception:
            info = None
    return kernelspec, info


_JupytextManager = build_async_jupytext_contents_manager_class(_KeepHeaderManager)


class ChapterContentsManager(_JupytextManager):
    """jupytext's contents manager, with the kernel metadata that JupyterLab would add filled in on open,
    and the chapter's own kernelspec kept on save."""

    _kernels = {}

    def _kernel(self, name):
        if name not in self._kernels:
            self._kernels[name] = _kernel_metadata(name)
        return self._kernels[name]

    async def get(self, path, content=True, type=None, format=None, **kwargs):
        model = await super().get(path, content=content, type=type, format=format, **kwargs)
        if content and model.get("type") == "notebook" and path.endswith(".md"):
            meta = model["content"]["metadata"]
            name = meta.get("kernelspec", {}).get("name")
            kernelspec, info = self._kernel(name) if name else (None, None)
            if kernelspec is not None:
                meta["kernelspec"] = kernelspec
                if info is not None:
                    meta["language_info"] = info
        return model

    async def save(self, model, path=""):
        if model.get("type") == "notebook" and path.endswith(".md"):
            os_path = self._get_os_path(path.strip("/"))
            if os.path.isfile(os_path):
                with open(os_path, encoding="utf-8") as f:
                    old = _header_data(_split_header(f.read())[0]) or {}
                old_spec = old.get("kernelspec")
                meta = model.get("content", {}).get("metadata", {})
                new_spec = meta.get("kernelspec")
                if isinstance(old_spec, dict) and new_spec and new_spec.get("name") == old_spec.get("name"):
                    if new_spec == self._kernel(new_spec["name"])[0]:
                        content = {**model["content"], "metadata": {**meta, "kernelspec": dict(old_spec)}}
                        model = {**model, "content": content}
        return await super().save(model, path)


c.ServerApp.contents_manager_class = ChapterContentsManager
