#!/usr/bin/env python3
"""Move the code to one import namespace: ``router`` -> ``vllm_fleet.router``, ``launcher`` ->
``vllm_fleet.launcher`` (issue 16, "An installable package").

Why a script: top-level ``router`` and ``launcher`` packages in site-packages collide with any
other project's. The folders stay where they are (setuptools' package-dir maps them); only the
names code and docs import them by change, and that touches nearly every file, so it is applied
in one step, by this script, when nobody else is mid-edit. It is idempotent: a second run
changes nothing, and a run after someone landed old-style imports fixes just those.

What it rewrites, in router/ launcher/ tests/ bench/ compose/ helm/ docs/ README.md Makefile .ci/:
- import statements: ``from router.x import y``, ``import launcher.tiny_model`` (also inside
  strings and Markdown code blocks);
- module references in Python string literals and comments, Markdown, Dockerfiles and scripts:
  ``"launcher.cli"``, ``python -m launcher.cli``, ``launcher.planner.plan`` (a dotted name is a
  module reference when its parts name a module of the tree, then at most one name that module
  defines), and ``sys.modules["router"]``; in helm/ only ``-m`` forms (``router.config.*`` there
  are chart values);
- pyproject.toml: the package list (computed from the tree) with the package-dir mapping, the
  console script, mypy's packages and mypy_path, ruff's first-party namespace;
- compose/Dockerfile.engine-cpu's staging directory for the tiny model.
Words are left alone: "router" in prose, ``vllm-router``, ``sglang-router``, ``tests.launcher``,
``router/balancer.py`` paths, chart values like ``router.config.policy``, logger names already
under ``vllm_fleet.``. Changed Python files are then import-sorted and formatted with ruff, and
comment or docstring lines the longer names pushed past the line length are re-wrapped.

Usage: python .ci/rename-namespace.py [--check] [--no-ruff] [ROOT]
  --check: change nothing, list the files that would change, exit 1 if any would.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tokenize
from collections.abc import Iterator
from pathlib import Path

NAMESPACE = "vllm_fleet"
PACKAGES = ("router", "launcher")
TARGETS = (
    "router",
    "launcher",
    "tests",
    "bench",
    "compose",
    "helm",
    "docs",
    "README.md",
    "Makefile",
    ".ci",
)
SKIP_DIRS = {
    "__pycache__",
    ".git",
    ".venv",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".env",
    ".work",
    ".fleet",
    "build",
    "dist",
}
SKIP_SUFFIXES = {".png", ".svg", ".pdf", ".gz", ".tgz", ".whl", ".pyc", ".safetensors"}
SELF = Path(__file__).resolve()
#: records of what ran (bench/results) and the page generated from them keep their words.
SKIP_FILES = {"bench/results", "docs/benchmarks.md"}
#: mypy reads the packages through symlinks there (.ci/install makes them): mypy does not run
#: setuptools' editable-install import hook, so it cannot find vllm_fleet.* otherwise.
MYPY_PATH = "build/mypy-path"

_PKG = "|".join(PACKAGES)
#: ``from router.x import y`` / ``from launcher import z`` (at a line start, maybe in a string).
FROM_IMPORT = re.compile(rf"(?m)^(\s*(?:>>> |\.\.\. )?from\s+)((?:{_PKG})(?:\.\w+)*\s+import\b)")
#: ``import launcher.tiny_model`` (alone on its line, maybe with ``as``).
PLAIN_IMPORT = re.compile(
    rf"(?m)^(\s*(?:>>> |\.\.\. )?import\s+)((?:{_PKG})(?:\.\w+)*(?:\s+as\s+\w+)?\s*(?:#.*)?)$"
)
#: a dotted name starting with a package, not part of a longer name, a path or a hyphenated word.
DOTTED = re.compile(rf"(?<![\w./\\-])({_PKG})((?:\.\w+)+)")
#: ``-m launcher.cli`` (helm/ gets only this form).
DASH_M = re.compile(rf"(-m\s+)(({_PKG})(?:\.\w+)*)\b")
SYS_MODULES = re.compile(rf"""(sys\.modules\[)(["'])({_PKG})(\2\])""")
#: the engine image stages launcher files for the tiny model under this directory.
TINY_STAGE = re.compile(rf"(/tmp/tiny/)(?=(?:{_PKG})/)")


#: Exact rewrites the rules above cannot know: (file, old, new). Each applies where ``old`` is
#: found; already applied (or the file changed since) it does nothing.
SPECIAL: tuple[tuple[str, str, str], ...] = (
    # The staged build's code, in a string: a line the longer name pushes past the limit, and a
    # comment naming the import that must fail.
    (
        "tests/launcher/test_tiny_model.py",
        'assert os.path.realpath(launcher.tiny_model.__file__).startswith(here), "not the staged'
        ' copy"\n',
        "staged = os.path.realpath(launcher.tiny_model.__file__)\n"
        'assert staged.startswith(here), "not the staged copy"\n',
    ),
    (
        "tests/launcher/test_tiny_model.py",
        "# any `import router...` now fails, as in the image",
        "# `import vllm_fleet.router...` fails, as in the image",
    ),
)


class Tree:
    """What the packages contain: which dotted names are modules and what each defines."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: dict[str, Path] = {}
        for package in PACKAGES:
            base = root / package
            for path in sorted(base.rglob("*.py")):
                if "__pycache__" in path.parts:
                    continue
                rel = path.relative_to(root).with_suffix("")
                parts = list(rel.parts)
                if parts[-1] == "__init__":
                    parts.pop()
                self.modules[".".join(parts)] = path
        self._names: dict[str, set[str]] = {}

    def packages(self) -> list[str]:
        """Every package (a folder with __init__.py) under router/ and launcher/, dotted."""
        return sorted(name for name, path in self.modules.items() if path.name == "__init__.py")

    def defines(self, module: str, name: str) -> bool:
        """Whether ``module`` binds ``name`` at its top level (dunders always count)."""
        if name.startswith("__") and name.endswith("__"):
            return True
        if module not in self._names:
            names: set[str] = set()
            try:
                tree = ast.parse(self.modules[module].read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                tree = ast.Module(body=[], type_ignores=[])
            for node in tree.body:
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    names.add(node.name)
                elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for target in targets:
                        names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
                elif isinstance(node, ast.Import | ast.ImportFrom):
                    names.update((a.asname or a.name).split(".")[0] for a in node.names)
            self._names[module] = names
        return name in self._names[module]

    def module_reference(self, dotted: str) -> bool:
        """``launcher.cli``, ``launcher.cli.main``: module parts, then at most one name the
        module defines. ``router.config.policy`` (a chart value) and ``router.port`` (a config
        key) are not."""
        parts = dotted.split(".")
        i = 1
        while i < len(parts) and ".".join(parts[: i + 1]) in self.modules:
            i += 1
        if i == 1:
            return False
        rest = parts[i:]
        if not rest:
            return True
        return self.defines(".".join(parts[:i]), rest[0]) and (
            len(rest) == 1 or rest[0].startswith("__") or rest[0][:1].isupper()
        )


def _sub_dotted(tree: Tree, text: str) -> str:
    def repl(m: re.Match[str]) -> str:
        dotted = m.group(1) + m.group(2)
        # A sentence's closing dot is not matched (no word follows it); a file name such as
        # router.py or a key such as router.port is not a module reference and stays.
        return f"{NAMESPACE}.{dotted}" if tree.module_reference(dotted) else m.group(0)

    return DOTTED.sub(repl, text)


def _sub_imports(text: str) -> str:
    text = FROM_IMPORT.sub(rf"\1{NAMESPACE}.\2", text)
    return PLAIN_IMPORT.sub(rf"\1{NAMESPACE}.\2", text)


def _sub_common(text: str) -> str:
    text = SYS_MODULES.sub(rf"\1\2{NAMESPACE}.\3\4", text)
    return TINY_STAGE.sub(rf"\g<1>{NAMESPACE}/", text)


def _row_starts(text: str) -> list[int]:
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return starts


def _docstring_tokens(tokens: list[tokenize.TokenInfo]) -> set[int]:
    """Indexes of the string tokens that stand alone as a statement (docstrings)."""
    found: set[int] = set()
    prev = tokenize.NEWLINE
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1].type if i + 1 < len(tokens) else tokenize.ENDMARKER
        if (
            tok.type == tokenize.STRING
            and prev in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
            and nxt in (tokenize.NEWLINE, tokenize.ENDMARKER)
        ):
            found.add(i)
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            prev = tok.type
    return found


#: a string that holds code: an import of the packages, before or after the rename.
CODE_STRING = re.compile(
    rf"(?m)^\s*(?:from\s+(?:{NAMESPACE}\.)?(?:{_PKG})[\w.]*\s+import\b"
    rf"|import\s+(?:{NAMESPACE}\.)?(?:{_PKG})\b)"
)
#: a string literal whose whole value is a module reference: "launcher.cli", "launcher.cli:main"
WHOLE_STRING = re.compile(rf"""^([rbuRBU]*)(["'])((?:{_PKG})(?:\.\w+)+)(:\w+)?\2$""")


def _rewrite_string(tree: Tree, literal: str, docstring: bool) -> str:
    """Docstrings read like comments: every module reference changes. Other strings change
    when they are one (``"launcher.cli"``), hold ``-m`` forms, or hold code (an import line)."""
    if docstring or CODE_STRING.search(literal):
        return _sub_dotted(tree, literal)
    m = WHOLE_STRING.match(literal)
    if m and tree.module_reference(m.group(3)):
        return f"{m.group(1)}{m.group(2)}{NAMESPACE}.{m.group(3)}{m.group(4) or ''}{m.group(2)}"
    return _sub_dash_m(tree, literal)


def _sub_dash_m(tree: Tree, text: str) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(2)
        if tree.module_reference(name) or name in PACKAGES:
            return f"{m.group(1)}{NAMESPACE}.{name}"
        return m.group(0)

    return DASH_M.sub(repl, text)


def rewrite_python(tree: Tree, text: str) -> str:
    """Imports anywhere; module references in comments, docstrings and module-name strings,
    not in code (``router.logs()`` there is a variable's method, not the module)."""
    text = _sub_imports(_sub_common(text))
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        print("warning: cannot tokenize, only imports renamed", file=sys.stderr)
        return text
    docstrings = _docstring_tokens(tokens)
    starts = _row_starts(text)
    out, last = [], 0
    for i, tok in enumerate(tokens):
        if tok.type not in (tokenize.STRING, tokenize.COMMENT):
            continue
        start = starts[tok.start[0] - 1] + tok.start[1]
        end = starts[tok.end[0] - 1] + tok.end[1]
        out.append(text[last:start])
        piece = text[start:end]
        if tok.type == tokenize.COMMENT:
            out.append(_sub_dotted(tree, piece))
        else:
            out.append(_rewrite_string(tree, piece, i in docstrings))
        last = end
    out.append(text[last:])
    return "".join(out)


def rewrite_text(tree: Tree, text: str, helm: bool) -> str:
    """Markdown, Dockerfiles, YAML, shell: imports and module references everywhere, except in
    helm/ where dotted ``router.*`` names are chart values and only ``-m`` forms change."""
    text = _sub_common(text)
    if helm:
        return _sub_dash_m(tree, text)
    return _sub_dotted(tree, _sub_imports(text))


def _setuptools_block(tree: Tree) -> str:
    packages = "\n".join(f'    "{NAMESPACE}.{p}",' for p in tree.packages())
    mapping = "\n".join(f'"{NAMESPACE}.{p}" = "{p}"' for p in PACKAGES)
    return (
        "# One import namespace, vllm_fleet.router and vllm_fleet.launcher: top-level `router`\n"
        "# or `launcher` packages would collide with other projects'. The folders stay at the\n"
        "# top of the repository and package-dir maps them; vllm_fleet is an implicit namespace\n"
        "# package (no folder, no __init__.py). The list: every folder with an __init__.py\n"
        "# under router/ and launcher/ (.ci/rename-namespace.py wrote it, tests/test_package.py\n"
        "# checks it).\n"
        "[tool.setuptools]\n"
        f"packages = [\n{packages}\n]\n\n"
        f"[tool.setuptools.package-dir]\n{mapping}\n"
    )


SETUPTOOLS_SECTION = re.compile(
    r"(?ms)^(?:#[^\n]*\n)*\[tool\.setuptools(?:\.packages\.find)?\]\n.*?"
    r"(?=^\[(?!tool\.setuptools\.package-dir\])|\Z)"
)


def rewrite_pyproject(tree: Tree, text: str) -> str:
    """The package list and mapping, the console script, mypy's and ruff's view of the names."""
    text = _sub_dotted(tree, text)  # "launcher.cli:main", comments naming modules
    block = _setuptools_block(tree)
    if not SETUPTOOLS_SECTION.search(text):
        raise SystemExit("pyproject.toml: no [tool.setuptools] section to replace")
    text = SETUPTOOLS_SECTION.sub(lambda _: block + "\n", text, count=1)
    old = ", ".join(f'"{p}"' for p in PACKAGES)
    new = ", ".join(f'"{NAMESPACE}.{p}"' for p in PACKAGES)
    text = re.sub(rf"(?m)^(packages = \[){re.escape(old)}", rf"\g<1>{new}", text)
    if "mypy_path" not in text:
        text = re.sub(
            r"(?m)^(packages = \[\"vllm_fleet\.[^\n]*\n)",
            r"\1# mypy does not run setuptools' editable-install import hook: .ci/install links\n"
            rf"# {MYPY_PATH}/{NAMESPACE}/<package> to the folders so it finds {NAMESPACE}.*.\n"
            rf'mypy_path = "$MYPY_CONFIG_FILE_DIR/{MYPY_PATH}"\n',
            text,
            count=1,
        )
    test_extra = re.search(r"(?ms)^test = \[\n.*?^\]", text)
    if test_extra and '"setuptools' not in test_extra.group(0):
        end = test_extra.end() - 1
        text = (
            text[:end]
            + "    # tests/test_package.py builds the sdist and the wheel with the build backend.\n"
            + '    "setuptools>=68",\n'
            + text[end:]
        )
    if "[tool.ruff.lint.isort]" not in text:
        text = re.sub(
            r"(?ms)^(\[tool\.ruff\.lint\]\n.*?\n)(?=\n\[|\Z)",
            r"\1\n[tool.ruff.lint.isort]\n"
            r"# No vllm_fleet/ folder for ruff to see: say the namespace is ours.\n"
            rf'known-first-party = ["{NAMESPACE}"]\n',
            text,
            count=1,
        )
    return text


def files(root: Path) -> Iterator[Path]:
    for target in TARGETS:
        path = root / target
        if path.is_file():
            yield path
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(
                    d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")
                )
                for name in sorted(filenames):
                    yield Path(dirpath) / name


def rewrite_file(tree: Tree, path: Path) -> str | None:
    """The file's new text, or None when it is not text."""
    if path.resolve() == SELF or path.suffix in SKIP_SUFFIXES:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    rel = path.relative_to(tree.root)
    for name, old, new in SPECIAL:
        if rel.as_posix() == name:
            text = text.replace(old, new)
    if any(rel.as_posix() == skip or rel.as_posix().startswith(skip + "/") for skip in SKIP_FILES):
        return None
    if path.suffix == ".py":
        return rewrite_python(tree, text)
    return rewrite_text(tree, text, helm=rel.parts[0] == "helm")


def _ruff(root: Path) -> list[str]:
    for candidate in (root / ".venv" / "bin" / "ruff", shutil.which("ruff")):
        if candidate and Path(candidate).exists():
            return [str(candidate)]
    return [sys.executable, "-m", "ruff"]


def _line_length(root: Path) -> int:
    m = re.search(r"(?m)^line-length\s*=\s*(\d+)", (root / "pyproject.toml").read_text())
    return int(m.group(1)) if m else 88


COMMENT_MARK = re.compile(r"#+:?\s?")
BULLET = re.compile(r"(?:[-*+]|\d+[.)]|:\w+)\s")


class _Row:
    """One line of prose: ``head`` (indent, comment mark or opening quotes), the words, and a
    ``tail`` (closing quotes) that must stay last."""

    def __init__(
        self, head: str, prose: str, tail: str, kind: str, token: int, base: int = 0
    ) -> None:
        self.head, self.prose, self.tail, self.kind, self.token = head, prose, tail, kind, token
        #: a docstring's own indentation: rows indented deeper than a bullet's are examples.
        self.base = base

    def render(self) -> str:
        return f"{self.head}{self.prose}{self.tail}".rstrip() + "\n"

    @property
    def indent(self) -> str:
        return self.head[: len(self.head) - len(self.head.lstrip())]

    @property
    def code(self) -> bool:
        """A docstring's example line: never merged with its neighbours."""
        if self.kind != "doc":
            return False
        deep = not self.head.strip() and len(self.indent) > self.base + 2
        return deep or self.prose.lstrip().startswith((">>>", "..."))


def _prose_rows(text: str) -> dict[int, _Row]:
    """Rows that hold prose: comment-only lines and the lines of docstrings, by row number."""
    rows: dict[int, _Row] = {}
    lines = text.splitlines()
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    for i in _docstring_tokens(tokens):
        tok = tokens[i]
        quote = re.match(r"[rbuRBU]*(\"\"\"|\'\'\'|\"|\')", tok.string)
        if not quote:
            continue
        q = quote.group(1)
        opening = lines[tok.start[0] - 1]
        base = len(opening) - len(opening.lstrip())
        for row in range(tok.start[0], tok.end[0] + 1):
            line = lines[row - 1]
            head_end = tok.start[1] + quote.end() if row == tok.start[0] else 0
            if row != tok.start[0]:
                head_end = len(line) - len(line.lstrip())
            tail_start = len(line) - len(q) if row == tok.end[0] else len(line)
            if tail_start < head_end:
                continue
            head, prose, tail = line[:head_end], line[head_end:tail_start], line[tail_start:]
            rows[row] = _Row(head, prose, tail, "doc", i, base)
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            line = lines[tok.start[0] - 1]
            if line[: tok.start[1]].strip():
                continue  # a comment after code stays where it is
            mark = COMMENT_MARK.match(tok.string)
            assert mark is not None
            head = line[: tok.start[1]] + mark.group(0).rstrip() + " "
            rows[tok.start[0]] = _Row(head, tok.string[mark.end() :], "", "comment", -1)
    return rows


def _continues(row: _Row, nxt: _Row | None) -> bool:
    """Whether ``nxt`` is the same paragraph, so words pushed off ``row`` can go in front."""
    if nxt is None or nxt.kind != row.kind or nxt.token != row.token or not nxt.prose.strip():
        return False
    if BULLET.match(nxt.prose) or row.code or nxt.code:
        return False
    if row.kind == "comment":
        return nxt.head == row.head
    return len(nxt.indent) >= len(row.indent) and not nxt.head.strip()


def rewrap_long_prose(text: str, limit: int) -> str:
    """Re-wrap comment and docstring lines that the longer names pushed past ``limit``: the
    words that no longer fit move to the front of the paragraph's next line, or to a new line
    (ruff format leaves prose alone; E501 would fail)."""
    try:
        rows = _prose_rows(text)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return text
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    carry: list[str] = []
    for number, line in enumerate(lines, start=1):
        row = rows.get(number)
        if row is None:
            out.append(line)
            continue
        if carry:
            row.prose = " ".join([*carry, row.prose.strip()])
            carry = []
        elif len(line.rstrip("\n")) <= limit or NAMESPACE not in line:
            out.append(line)
            continue
        words = row.prose.split(" ")
        moved: list[str] = []
        while len(words) > 1 and len(f"{row.head}{' '.join(words)}{row.tail}".rstrip()) > limit:
            moved.insert(0, words.pop())
        if row.code and moved and any(w.endswith(",") for w in words[1:]):
            while not words[-1].endswith(","):  # an example line breaks after a comma
                moved.insert(0, words.pop())
        row.prose = " ".join(words)
        if not moved:
            out.append(row.render())
            continue
        nxt = rows.get(number + 1)
        if not row.tail and _continues(row, nxt):
            out.append(row.render())
            carry = moved
            continue
        tail, row.tail = row.tail, ""
        out.append(row.render())
        if row.kind == "comment":
            head = row.head
        else:
            extra = "  " if BULLET.match(row.prose) and not row.head.strip() else ""
            indent = row.indent if not row.head.strip() else _token_indent(row.head)
            head = indent + extra + ("    " if row.code else "")
        rest = _Row(head, " ".join(moved), tail, row.kind, row.token)
        # A new line can itself be too long: split it the same way.
        out.extend(rewrap_long_prose_line(rest, limit))
    return "".join(out)


def _token_indent(head: str) -> str:
    """The indentation of a docstring whose opening quotes are in ``head``."""
    return head[: len(head) - len(head.lstrip())]


def rewrap_long_prose_line(row: _Row, limit: int) -> list[str]:
    words = row.prose.split(" ")
    width = limit - len(row.head)
    wrapped = textwrap.wrap(" ".join(words), width=width, break_long_words=False)
    if not wrapped:
        return [row.render()]
    out = [f"{row.head}{w}".rstrip() + "\n" for w in wrapped]
    if row.tail:
        last = out[-1].rstrip("\n") + row.tail
        if len(last) > limit:
            out.append(f"{row.head}{row.tail.strip()}\n")
        else:
            out[-1] = last + "\n"
    return out


def _split_code_line(text: str, limit: int) -> str | None:
    """Break the first code line the longer names pushed past ``limit`` after a comma inside
    brackets (lines ruff format leaves alone: ``# fmt: skip`` blocks). None when none is left."""
    lines = text.splitlines(keepends=True)
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    prose = _prose_rows(text)
    long_rows = {
        n
        for n, line in enumerate(lines, start=1)
        if len(line.rstrip("\n")) > limit and NAMESPACE in line and n not in prose
    }
    if not long_rows:
        return None
    stack: list[int] = []  # indexes of open-bracket tokens
    best: dict[int, tuple[int, int]] = {}  # row -> (column after the comma, open bracket)
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.OP and tok.string in "([{":
            stack.append(i)
        elif tok.type == tokenize.OP and tok.string in ")]}" and stack:
            stack.pop()
        elif (
            tok.type == tokenize.OP
            and tok.string == ","
            and stack
            and tok.start[0] in long_rows
            and tok.end[1] < limit
        ):
            best[tok.start[0]] = (tok.end[1], stack[-1])
    for row in sorted(long_rows):
        if row not in best:
            continue
        col, bracket = best[row]
        opener = tokens[bracket]
        after = next(
            t for t in tokens[bracket + 1 :] if t.type not in (tokenize.NL, tokenize.COMMENT)
        )
        line = lines[row - 1]
        if after.start[0] != opener.start[0]:  # hanging: the bracket ends its line
            indent = line[: len(line) - len(line.lstrip())]
        else:
            indent = " " * (opener.start[1] + 1)
        lines[row - 1] = line[:col].rstrip() + "\n" + indent + line[col:].lstrip()
        return "".join(lines)
    return None


def wrap_long_code(text: str, limit: int) -> str:
    for _ in range(50):  # bounded: each pass breaks one line
        try:
            new = _split_code_line(text, limit)
        except (tokenize.TokenError, SyntaxError, IndentationError):
            return text
        if new is None:
            return text
        text = new
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("root", nargs="?", default=str(SELF.parents[1]))
    parser.add_argument("--check", action="store_true", help="list what would change, exit 1")
    parser.add_argument("--no-ruff", action="store_true", help="skip ruff fix/format")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    if not all((root / p / "__init__.py").is_file() for p in PACKAGES):
        parser.error(f"{root}: not the vllm-fleet repository (no router/ and launcher/ packages)")
    tree = Tree(root)
    changed: list[Path] = []
    for path in [*files(root), root / "pyproject.toml"]:
        if path.name == "pyproject.toml" and path.parent == root:
            old = path.read_text(encoding="utf-8")
            new: str | None = rewrite_pyproject(tree, old)
        else:
            old = ""
            new = rewrite_file(tree, path)
            if new is not None:
                old = path.read_text(encoding="utf-8")
        if new is None or new == old:
            continue
        changed.append(path)
        if not args.check:
            path.write_text(new, encoding="utf-8")
    rel = [str(p.relative_to(root)) for p in changed]
    if args.check:
        print("\n".join(rel))
        return 1 if changed else 0
    py = [p for p in rel if p.endswith(".py")]
    limit = _line_length(root)
    if py and not args.no_ruff:
        ruff = _ruff(root)
        # Import blocks re-sort (vllm_fleet sorts after tests/bench), long imports re-wrap.
        subprocess.run([*ruff, "check", "--quiet", "--select", "I", "--fix", *py], cwd=root)
        subprocess.run([*ruff, "format", "--quiet", *py], cwd=root, check=True)
        for p in py:
            path = root / p
            text = path.read_text(encoding="utf-8")
            wrapped = wrap_long_code(rewrap_long_prose(text, limit), limit)
            if wrapped != text:
                path.write_text(wrapped, encoding="utf-8")
    print(f"rename-namespace: {len(changed)} files changed")
    for p in rel:
        print(f"  {p}")
    too_long = [
        f"{p}:{n}"
        for p in py
        for n, line in enumerate((root / p).read_text(encoding="utf-8").splitlines(), start=1)
        if len(line) > limit and NAMESPACE in line
    ]
    if too_long:
        print(f"rename-namespace: wrap these by hand (over {limit} characters):", *too_long)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
