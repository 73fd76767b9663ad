"""Exercise handouts: student and instructor notebooks generated from the chapters.

``python -m sacode.handouts SRC_DIR OUT_DIR`` reads every chapter in SRC_DIR (the ``.ipynb`` files that
``make notebooks`` converts with jupytext, or the MyST ``.md`` chapters themselves when there is no
``.ipynb``) and writes

* ``OUT_DIR/student/NAME.ipynb``: the chapter with each exercise as a Markdown cell followed by an empty
  answer cell, and without the gated solutions of sphinx-exercise (everything from a
  ```` ```{solution-start} ```` fence to the end of its ```` ```{solution-end} ```` fence, across cells);
* ``OUT_DIR/instructor/NAME.ipynb``: the same with each solution after its exercise.

Handouts are read in plain Jupyter (JupyterLab, Colab, GitHub), which knows no MyST, so every MyST construct
is turned into Markdown and maths that any notebook viewer renders: ```` ```{math} ```` blocks become
``$$ ... $$`` (with ``\\tag{3.2}`` when the equation is labelled: the number the book gives it), ``{eq}``
references become those numbers, ``{cite}``/``{cite:t}`` become author–year from ``book/references.bib``,
``{ref}``/``{doc}`` become the title of their target, admonitions become block quotes, ``(label)=`` targets and
``%`` comments are dropped, and the book's TeX macros (``book/_config.yml``) are expanded. A handout is
always generated from the chapters, never a copy to maintain.
"""
from __future__ import annotations

import copy
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BookContext", "make_handouts", "strip_solutions", "convert_markdown", "main"]

_FENCE_LINE = re.compile(r"^\s*(`{3,}|:{3,})(.*)$")
_DIRECTIVE = re.compile(r"^\s*(`{3,}|:{3,})\{([^}]+)\}\s*(.*?)\s*$")
_OPTION = re.compile(r"^\s*:([\w-]+):\s*(.*?)\s*$")
_ROLE = re.compile(r"\{([a-zA-Z][\w:-]*)\}`([^`]+)`")
_TARGET = re.compile(r"^\(([^()\s]+)\)=\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_DOLLAR_LABEL = re.compile(r"\$\$\s*\(([^()\s]+)\)\s*$")
_TITLED = {"note", "warning", "tip", "hint", "important", "caution", "attention", "danger", "error",
           "seealso", "admonition", "margin", "sidebar", "topic", "dropdown", "prf:theorem", "prf:lemma",
           "prf:definition", "prf:proof", "prf:remark", "prf:example", "prf:proposition", "prf:corollary"}


# ----------------------------------------------------------------------------------------------------------
# parsing: a Markdown cell is a list of text blocks and directive blocks


@dataclass
class Directive:
    name: str
    argument: str
    options: dict
    body: str


def _closing_fence(lines: list[str], start: int, fence: str) -> int:
    """Index of the line that closes the fence opened at lines[start] (nested fences skipped); -1 if none."""
    stack = [(fence[0], len(fence))]
    for j in range(start + 1, len(lines)):
        m = _FENCE_LINE.match(lines[j])
        if not m:
            continue
        f, info = m.group(1), m.group(2).strip()
        char, n = stack[-1]
        if not info and f[0] == char and len(f) >= n:
            stack.pop()
            if not stack:
                return j
        elif info and not (f[0] == ":" and char == "`"):
            stack.append((f[0], len(f)))
    return -1


def split_blocks(text: str) -> list:
    """Split MyST Markdown into ``str`` blocks and :class:`Directive` blocks (outermost directives only).

    A directive whose closing fence is not in ``text`` (a solution fence that spans cells, say) is returned
    with ``body=None``: only its opening line and options belong to this text.
    """
    lines = text.split("\n")
    blocks, buf, i = [], [], 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if not m:
            # a plain fenced code block is kept whole, so a "{role}`" inside it is not touched
            fm = _FENCE_LINE.match(lines[i])
            if fm and fm.group(2).strip() and fm.group(1)[0] == "`":
                end = _closing_fence(lines, i, fm.group(1))
                end = len(lines) - 1 if end < 0 else end
                buf.extend(lines[i:end + 1])
                i = end + 1
                continue
            buf.append(lines[i])
            i += 1
            continue
        if buf:
            blocks.append("\n".join(buf))
            buf = []
        fence, name, arg = m.group(1), m.group(2).strip(), m.group(3)
        end = _closing_fence(lines, i, fence)
        body_lines = lines[i + 1:end] if end >= 0 else lines[i + 1:]
        options, k = {}, 0
        while k < len(body_lines) and _OPTION.match(body_lines[k]):
            om = _OPTION.match(body_lines[k])
            options[om.group(1)] = om.group(2)
            k += 1
        if end < 0:
            rest = body_lines[k:]
            blocks.append(Directive(name, arg, options, None))
            if rest:
                blocks.append("\n".join(rest))
            return blocks
        blocks.append(Directive(name, arg, options, "\n".join(body_lines[k:]).strip("\n")))
        i = end + 1
    if buf:
        blocks.append("\n".join(buf))
    return blocks


# ----------------------------------------------------------------------------------------------------------
# what the book knows: numbers, titles, citations, macros


def _find_book_dir() -> Path | None:
    for cand in (Path.cwd() / "book", Path(__file__).resolve().parents[1] / "book"):
        if (cand / "_config.yml").is_file():
            return cand
    return None


def _strip_latex(s: str) -> str:
    try:
        import latexcodec  # noqa: F401  (registers the "latex" codec; installed with the book extra's pybtex)

        s = s.encode("utf-8").decode("latex")
    except Exception:
        pass
    return re.sub(r"[{}]", "", s).strip()


def _bib_fields(entry: str) -> dict:
    fields, i = {}, 0
    for m in re.finditer(r"(\w+)\s*=\s*", entry):
        if m.start() < i:
            continue
        name, j = m.group(1).lower(), m.end()
        if j < len(entry) and entry[j] == "{":
            depth, k = 0, j
            while k < len(entry):
                depth += {"{": 1, "}": -1}.get(entry[k], 0)
                if depth == 0:
                    break
                k += 1
            fields[name], i = entry[j + 1:k], k + 1
        elif j < len(entry) and entry[j] == '"':
            k = entry.index('"', j + 1)
            fields[name], i = entry[j + 1:k], k + 1
        else:
            v = re.match(r"[^,}\s]+", entry[j:])
            fields[name], i = (v.group(0) if v else ""), j + (v.end() if v else 0)
    return fields


def parse_bib(text: str) -> dict:
    """``{key: (authors for an author-year citation, year)}`` from BibTeX source."""
    out = {}
    starts = [m for m in re.finditer(r"@(\w+)\s*\{\s*([^,\s]+)\s*,", text)]
    for m, nxt in zip(starts, starts[1:] + [None]):
        if m.group(1).lower() in ("comment", "string", "preamble"):
            continue
        fields = _bib_fields(text[m.end(): nxt.start() if nxt else len(text)])
        people = [p.strip() for p in re.split(r"\s+and\s+", fields.get("author", fields.get("editor", ""))) if p.strip()]
        last = []
        for p in people:
            if p.lower() == "others":
                continue
            name = p.split(",")[0] if "," in p else p.split()[-1]
            last.append(_strip_latex(name))
        if not last:
            authors = _strip_latex(fields.get("title", m.group(2)))
        elif len(last) == 1:
            authors = last[0]
        elif len(last) == 2:
            authors = f"{last[0]} and {last[1]}"
        else:
            authors = f"{last[0]} et al."
        out[m.group(2)] = (authors, _strip_latex(fields.get("year", "n.d.")))
    return out


def _chapter_numbers(book_dir: Path | None, stems: list[str]) -> dict:
    """Chapter numbers as the book shows them: numbered parts of _toc.yml, counted continuously."""
    numbers = {}
    toc = book_dir / "_toc.yml" if book_dir else None
    if toc is not None and toc.is_file():
        import yaml

        data = yaml.safe_load(toc.read_text()) or {}
        n = 0
        for part in data.get("parts", []):
            for ch in part.get("chapters", []):
                stem = Path(ch.get("file", "")).name
                if part.get("numbered"):
                    n += 1
                    numbers[stem] = str(n)
    for stem in stems:                                       # not in the toc: the file name's number
        if stem not in numbers:
            m = re.match(r"(\d+)", stem)
            if m:
                numbers[stem] = str(int(m.group(1)))
    return numbers


@dataclass
class BookContext:
    """What the handouts need to know about the whole book to turn references into text."""

    equations: dict = field(default_factory=dict)      # label -> "3.2"
    exercises: dict = field(default_factory=dict)      # label -> ("3.1", title)
    targets: dict = field(default_factory=dict)        # label -> section title
    docs: dict = field(default_factory=dict)           # doc name (stem) -> title
    citations: dict = field(default_factory=dict)      # key -> (authors, year)
    macros: dict = field(default_factory=dict)         # name -> replacement (no arguments)
    unresolved: list = field(default_factory=list)     # references that could not be turned into text

    @classmethod
    def from_chapters(cls, chapters: dict, book_dir: Path | None = None) -> "BookContext":
        """``chapters``: ``{stem: notebook dict}`` in book order. ``book_dir`` defaults to the repository's
        ``book/`` (for references.bib, _config.yml, _toc.yml and the titles of the other pages)."""
        book_dir = book_dir if book_dir is not None else _find_book_dir()
        ctx = cls()
        numbers = _chapter_numbers(book_dir, list(chapters))
        if book_dir is not None:
            bib = book_dir / "references.bib"
            if bib.is_file():
                ctx.citations = parse_bib(bib.read_text(encoding="utf-8"))
            cfg = book_dir / "_config.yml"
            if cfg.is_file():
                import yaml

                conf = yaml.safe_load(cfg.read_text()) or {}
                macros = (conf.get("sphinx", {}).get("config", {}).get("mathjax3_config", {})
                          .get("tex", {}).get("macros", {}))
                ctx.macros = {k: v for k, v in macros.items() if isinstance(v, str)}
            for page in sorted(book_dir.glob("*.md")):
                for line in page.read_text(encoding="utf-8").splitlines():
                    hm = _HEADING.match(line)
                    if hm and len(hm.group(1)) == 1:
                        ctx.docs[page.stem] = hm.group(2)
                        break
        for stem, nb in chapters.items():
            ctx._collect(stem, nb, numbers.get(stem))
        return ctx

    def _collect(self, stem: str, nb: dict, number: str | None):
        prefix = f"{number}." if number else ""
        n_eq = n_ex = 0
        pending_targets = []
        for cell in nb["cells"]:
            if cell["cell_type"] != "markdown":
                continue
            text = _source(cell)
            for line in text.split("\n"):
                tm = _TARGET.match(line)
                if tm:
                    pending_targets.append(tm.group(1))
                hm = _HEADING.match(line)
                if hm:
                    if len(hm.group(1)) == 1 and stem not in self.docs:
                        self.docs[stem] = hm.group(2)
                    for t in pending_targets:
                        self.targets[t] = hm.group(2)
                    pending_targets = []
                dm = _DOLLAR_LABEL.search(line)
                if dm:
                    n_eq += 1
                    self.equations[dm.group(1)] = f"{prefix}{n_eq}"
            for block in _all_directives(text):
                if block.name == "math" and "label" in block.options:
                    n_eq += 1
                    self.equations[block.options["label"]] = f"{prefix}{n_eq}"
                elif block.name == "exercise":
                    n_ex += 1
                    if "label" in block.options:
                        self.exercises[block.options["label"]] = (f"{prefix}{n_ex}", block.argument)


def _all_directives(text: str):
    """Every directive in text, nested ones included, in document order."""
    for block in split_blocks(text):
        if isinstance(block, Directive):
            yield block
            if block.body:
                yield from _all_directives(block.body)


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


# ----------------------------------------------------------------------------------------------------------
# conversion of Markdown text


def _expand_macros(text: str, macros: dict) -> str:
    for name, value in macros.items():
        text = re.sub(r"\\" + re.escape(name) + r"(?![A-Za-z])", lambda _m, v=value: v, text)
    return text


def _cite(keys: str, ctx: BookContext, textual: bool) -> str:
    parts = []
    for key in (k.strip() for k in keys.split(",")):
        if key in ctx.citations:
            authors, year = ctx.citations[key]
            parts.append(f"{authors} ({year})" if textual else f"{authors}, {year}")
        else:
            ctx.unresolved.append(f"cite:{key}")
            parts.append(key)
    return "; ".join(parts) if textual else "(" + "; ".join(parts) + ")"


def _role(name: str, content: str, ctx: BookContext) -> str:
    explicit = re.match(r"^(.*?)\s*<([^<>]+)>$", content, re.S)
    title, target = (explicit.group(1), explicit.group(2)) if explicit else (None, content.strip())
    if name == "eq":
        if target in ctx.equations:
            return f"({ctx.equations[target]})"
        ctx.unresolved.append(f"eq:{target}")
        return "(the equation above)"
    if name in ("cite", "cite:p", "cite:ps", "cite:alp", "cite:cts"):
        return _cite(content, ctx, textual=False)
    if name in ("cite:t", "cite:ts", "cite:ct", "cite:author"):
        return _cite(content, ctx, textual=True)
    if name == "math":
        return f"${content}$"
    if title:
        return title
    if name in ("ref", "numref"):
        if target in ctx.exercises:                  # as the book shows it
            return f"Exercise {ctx.exercises[target][0]}"
        if target in ctx.targets:
            return f"“{ctx.targets[target]}”"
        if target in ctx.equations:
            return f"({ctx.equations[target]})"
        ctx.unresolved.append(f"{name}:{target}")
        return target
    if name == "doc":
        stem = Path(target).name
        if stem in ctx.docs:
            return f"“{ctx.docs[stem]}”"
        ctx.unresolved.append(f"doc:{target}")
        return stem
    return content                                   # {term}, {abbr}, {sub-ref} ...: the text itself


def _convert_text(text: str, ctx: BookContext) -> str:
    """Roles, targets, comments and macros in a text block (fenced code is left alone)."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        fm = _FENCE_LINE.match(lines[i])
        if fm and fm.group(2).strip() and fm.group(1)[0] == "`":          # plain code block: verbatim
            end = _closing_fence(lines, i, fm.group(1))
            end = len(lines) - 1 if end < 0 else end
            out.extend(lines[i:end + 1])
            i = end + 1
            continue
        line = lines[i]
        i += 1
        if _TARGET.match(line) or re.match(r"^%", line) or line.strip() == "+++" or line.startswith("+++ {"):
            continue
        dm = _DOLLAR_LABEL.search(line)
        if dm:
            label = dm.group(1)
            tag = f" \\tag{{{ctx.equations[label]}}}" if label in ctx.equations else ""
            line = line[:dm.start()] + tag + "$$"
        line = _ROLE.sub(lambda m: _role(m.group(1), m.group(2), ctx), line)
        out.append(_expand_macros(line, ctx.macros))
    return "\n".join(out)


def _math_block(d: Directive, ctx: BookContext) -> str:
    body = _expand_macros(d.body or d.argument, ctx.macros).strip("\n")
    label = d.options.get("label")
    tag = f" \\tag{{{ctx.equations[label]}}}" if label in ctx.equations else ""
    return f"$$\n{body}{tag}\n$$"


def _quote(title: str, body: str) -> str:
    lines = [f"> **{title}**" if title else ">", ">"] if title else []
    lines += ["> " + ln if ln.strip() else ">" for ln in body.split("\n")]
    return "\n".join(lines)


def convert_markdown(text: str, ctx: BookContext) -> str:
    """MyST Markdown without exercises or solutions -> plain Jupyter Markdown."""
    parts = []
    for block in split_blocks(text):
        if isinstance(block, str):
            parts.append(_convert_text(block, ctx))
            continue
        d = block
        body = d.body or ""
        if d.name == "math":
            parts.append(_math_block(d, ctx))
        elif d.name in ("code-block", "code", "sourcecode"):
            parts.append(f"```{d.argument}\n{body}\n```")
        elif d.name in ("figure", "image"):
            caption = convert_markdown(body, ctx).strip() if body else d.options.get("alt", "")
            parts.append(f"![{d.options.get('alt', caption)}]({d.argument})" + (f"\n\n*{caption}*" if caption else ""))
        elif d.name in ("exercise", "solution-start", "solution-end", "solution"):
            parts.append(convert_markdown(body, ctx))       # only reached outside make_handouts' cell walk
        else:
            if d.name in _TITLED or d.name.startswith("prf:"):
                kind = d.name.split(":")[-1].capitalize()
                title = _convert_text(d.argument, ctx) if d.name == "admonition" else (
                    f"{kind}: {_convert_text(d.argument, ctx)}" if d.argument else kind)
            else:
                title = _convert_text(d.argument, ctx)
            parts.append(_quote(title, convert_markdown(body, ctx)))
    return "\n".join(p for p in parts)


# ----------------------------------------------------------------------------------------------------------
# the cell walk: exercises, answers and solutions


def _cells_from_text(text: str, meta: dict) -> list:
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return [{"cell_type": "markdown", "metadata": meta, "source": text}] if text.strip() else []


def _exercise_cell(d: Directive, ctx: BookContext) -> dict:
    number = ctx.exercises.get(d.options.get("label"), ("", d.argument))[0]
    title = _convert_text(d.argument, ctx)
    head = f"### Exercise {number}" + (f" ({title})" if title else "")
    return {"cell_type": "markdown", "metadata": {"tags": ["exercise"]},
            "source": head + "\n\n" + convert_markdown(d.body or "", ctx).strip("\n")}


def make_handouts(nb: dict, ctx: BookContext) -> tuple[dict, dict, int]:
    """(student notebook, instructor notebook, number of exercises) for one chapter notebook."""
    student, instructor = [], []
    in_solution = False
    n_ex = 0
    last_exercise = None

    def emit(cells, to_student=True, to_instructor=True):
        if to_student:
            student.extend(copy.deepcopy(cells))
        if to_instructor:
            instructor.extend(copy.deepcopy(cells))

    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown":
            emit([cell], to_student=not in_solution)
            continue
        meta = {k: v for k, v in cell.get("metadata", {}).items()}
        text_buf = []

        def flush():
            if text_buf:
                emit(_cells_from_text(convert_markdown("\n".join(text_buf), ctx), meta),
                     to_student=not in_solution)
                text_buf.clear()

        blocks = split_blocks(_source(cell))
        for block in blocks:
            if isinstance(block, str):
                text_buf.append(block)
                continue
            if block.name == "exercise":
                flush()
                n_ex += 1
                last_exercise = ctx.exercises.get(block.options.get("label"), (str(n_ex), ""))[0]
                emit([_exercise_cell(block, ctx)])
                student.append({"cell_type": "markdown", "metadata": {"tags": ["answer"]}, "source": ""})
            elif block.name == "solution-start":
                flush()
                if in_solution:
                    raise ValueError("a {solution-start} inside a solution; fix the chapter")
                in_solution = True
                target = ctx.exercises.get(block.argument.strip(), (last_exercise, ""))[0]
                instructor.append({"cell_type": "markdown", "metadata": {"tags": ["solution"]},
                                   "source": f"**Solution to exercise {target}.**"})
            elif block.name == "solution-end":
                flush()
                if not in_solution:
                    raise ValueError("a {solution-end} without a {solution-start}; fix the chapter")
                in_solution = False
            elif block.name == "solution":          # an ungated solution directive: body in the instructor's
                flush()
                instructor.extend(_cells_from_text("**Solution.**\n\n" + convert_markdown(block.body or "", ctx),
                                                   {"tags": ["solution"]}))
            else:
                text_buf.append(_reassemble(block))
        flush()
    if in_solution:
        raise ValueError("a {solution-start} has no matching {solution-end}; fix the chapter")
    return _finish(nb, student, "student"), _finish(nb, instructor, "instructor"), n_ex


def _reassemble(d: Directive) -> str:
    """A directive back as MyST text (converted later with the text around it)."""
    opts = "".join(f":{k}: {v}\n" for k, v in d.options.items())
    return f"```{{{d.name}}} {d.argument}".rstrip() + "\n" + opts + (d.body or "") + "\n```"


_NOTES = {
    "student": "> *Exercise handout, generated from the book's chapter: run the cells from the top. Each exercise "
               "is followed by an empty cell for your answer; add code cells below it as you need.*",
    "instructor": "> *Instructor version of the exercise handout: each exercise is followed by its solution.*",
}


def _finish(nb: dict, cells: list, version: str) -> dict:
    meta = {k: v for k, v in nb.get("metadata", {}).items() if k != "jupytext"}
    meta["sacode"] = {"handout": version}
    if meta.get("kernelspec", {}).get("name") == "python3":
        meta["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    if cells and cells[0]["cell_type"] == "markdown" and cells[0]["source"].startswith("# "):
        title, _, rest = cells[0]["source"].partition("\n")
        cells = [{**cells[0], "source": f"{title}\n\n{_NOTES[version]}\n{rest}"}] + cells[1:]
    out_cells, seen = [], set()
    for i, cell in enumerate(cells):
        cell = dict(cell)
        cid = str(cell.get("id") or f"h{i:04d}")
        while cid in seen:
            cid = f"{cid[:58]}-{i:04d}"
        seen.add(cid)
        cell["id"] = cid
        if cell["cell_type"] == "code":
            cell.setdefault("outputs", [])
            cell.setdefault("execution_count", None)
        cell.setdefault("metadata", {})
        out_cells.append(cell)
    return {"cells": out_cells, "metadata": meta, "nbformat": 4, "nbformat_minor": 5}


def strip_solutions(nb: dict, ctx: BookContext | None = None) -> tuple[dict, int]:
    """The student handout of one notebook and its number of exercises (kept for the old interface)."""
    student, _, n = make_handouts(nb, ctx if ctx is not None else BookContext())
    return student, n


# ----------------------------------------------------------------------------------------------------------
# command line


def _read_chapters(src: Path) -> dict:
    files = sorted(src.glob("*.ipynb"))
    if files:
        return {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in files}
    chapters = {}
    for f in sorted(src.glob("*.md")):
        head = f.read_text(encoding="utf-8")[:400]
        if "format_name: myst" not in head:
            continue
        import jupytext
        import nbformat

        chapters[f.stem] = json.loads(nbformat.writes(jupytext.read(f)))
    return chapters


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print("usage: python -m sacode.handouts SRC_DIR OUT_DIR\n"
              "  SRC_DIR: the chapters as .ipynb (make notebooks) or as MyST .md files\n"
              "  writes OUT_DIR/student/*.ipynb (exercises with empty answer cells, no solutions)\n"
              "     and OUT_DIR/instructor/*.ipynb (exercises with their solutions)", file=sys.stderr)
        return 2
    src, out = Path(argv[0]), Path(argv[1])
    chapters = _read_chapters(src)
    if not chapters:
        print(f"no chapters (.ipynb, or MyST .md) in {src}; run `make notebooks` first", file=sys.stderr)
        return 2
    ctx = BookContext.from_chapters(chapters)
    for version in ("student", "instructor"):
        (out / version).mkdir(parents=True, exist_ok=True)
    for stem, nb in chapters.items():
        student, instructor, n = make_handouts(nb, ctx)
        (out / "student" / f"{stem}.ipynb").write_text(json.dumps(student, indent=1, ensure_ascii=False) + "\n",
                                                       encoding="utf-8")
        (out / "instructor" / f"{stem}.ipynb").write_text(
            json.dumps(instructor, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{stem}: {n} exercise(s)")
    if ctx.unresolved:
        print("unresolved references (left as text): " + ", ".join(sorted(set(ctx.unresolved))), file=sys.stderr)
    print(f"handouts: {out / 'student'} and {out / 'instructor'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
