"""Every reference the project's prose makes to its own code names something that exists.

Prose is README.md, docs/*.md, the comments of conf/**/*.yaml and of the Makefile, and the module docstrings and
comments of src/ddpm/*.py, train.py, sample.py and bench/*.py. Four kinds of reference are read out of it, each by
its own extractor and checked by its own parametrized test, whose id names the file, the line and the reference:

- dotted module paths: `ddpm.<module>`, `ddpm.<module>.<name>`, `ddpm.<module>.<Class>.<attr>`, a name of the
  package's public API (`ddpm.UNet`), and the bare names a list continues one with (`ddpm.config.a`, `b`);
- repository file paths: `src/...`, `tests/...`, `bench/...`, `conf/...`, `docs/...`, `scripts/...`, `.ci/run`;
- test node ids: `tests/test_x.py::test_name[case]` and the shorthand `::test_name` after one in the same table
  cell or line;
- README section references: (README.md, "Section") and README's "Section".

Everything is read with `ast`, `tokenize` and regular expressions: nothing of the project is imported.
"""

from __future__ import annotations

import ast
import functools
import io
import re
import tokenize
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "ddpm"


class Prose(NamedTuple):
    file: str  # relative to the repository root
    line: int
    text: str


class Ref(NamedTuple):
    file: str
    line: int
    ref: str

    def id(self) -> str:
        return f"{self.file}:{self.line}:{self.ref}"


# ---------------------------------------------------------------------------------------------------------------
# prose: (file, line, text) for every line of prose
# ---------------------------------------------------------------------------------------------------------------


def _markdown(path: Path) -> list[Prose]:
    rel = path.relative_to(ROOT).as_posix()
    return [Prose(rel, i, line) for i, line in enumerate(path.read_text().splitlines(), 1)]


def _hash_comments(path: Path) -> list[Prose]:
    """The `#` comments of a YAML file or the Makefile (a `#` inside quotes is not one)."""
    rel = path.relative_to(ROOT).as_posix()
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        quote = None
        for j, ch in enumerate(line):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#" and (j == 0 or line[j - 1] in " \t@"):
                out.append(Prose(rel, i, line[j + 1 :]))
                break
    return out


def _python(path: Path) -> list[Prose]:
    """The module docstring and the `#` comments of a Python file."""
    rel = path.relative_to(ROOT).as_posix()
    source = path.read_text()
    out = []
    tree = ast.parse(source)
    if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant):
        doc = tree.body[0]
        if isinstance(doc.value.value, str):
            # the docstring's lines as written (line numbers stay those of the file)
            lines = source.splitlines()[doc.lineno - 1 : doc.end_lineno]
            out += [Prose(rel, doc.lineno + k, text) for k, text in enumerate(lines)]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out.append(Prose(rel, tok.start[0], tok.string[1:]))
    return out


@functools.cache
def prose() -> tuple[Prose, ...]:
    out: list[Prose] = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        out += _markdown(path)
    for path in [*sorted((ROOT / "conf").rglob("*.yaml")), ROOT / "Makefile"]:
        out += _hash_comments(path)
    scripts = [ROOT / "train.py", ROOT / "sample.py"]
    for path in [*sorted(PACKAGE.glob("*.py")), *scripts, *sorted((ROOT / "bench").glob("*.py"))]:
        out += _python(path)
    return tuple(out)


def _ids(refs: list[Ref]) -> list:
    return [pytest.param(r, id=r.id()) for r in refs]


# ---------------------------------------------------------------------------------------------------------------
# static facts about the code (ast, never import)
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _bound_names(body: list[ast.stmt]) -> set[str]:
    """Names a module or class body binds: def, class, assignment, import (also inside if/try at that level)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                names |= _bound_names(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                names |= _bound_names(handler.body)
    return names


def _module_file(module: str) -> Path | None:
    for candidate in (PACKAGE / f"{module}.py", PACKAGE / module / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _package_api() -> dict[str, str]:
    """The names src/ddpm/__init__.py imports from its modules (`from ddpm.unet import UNet`): name -> module."""
    return {
        alias.asname or alias.name: node.module.split(".")[1]
        for node in _tree(PACKAGE / "__init__.py").body
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddpm.")
        for alias in node.names
    }


# ---------------------------------------------------------------------------------------------------------------
# 1. dotted module paths: ddpm.<module>[.<name>[.<attr>]]
# ---------------------------------------------------------------------------------------------------------------

# Not preceded by a word character, '.', '/', '-' (a URL, a file name such as cifar10_ddpm.yaml, a path);
# each part must be an identifier, so a sentence's full stop ("... ddpm.data.") is not taken for one.
DOTTED = re.compile(r"(?<![\w./:-])ddpm((?:\.[A-Za-z_]\w*)+)")


@functools.cache
def dotted_refs() -> list[Ref]:
    refs = []
    for p in prose():
        for m in DOTTED.finditer(p.text):
            if m.group(1) in (".py", ".yaml", ".md", ".json"):  # a file name, not a module
                continue
            refs.append(Ref(p.file, p.line, m.group(0)))
    return refs


# A list that goes on from `ddpm.<module>.<name>` with bare names, `ddpm.config.resolve_ckpt`, `unreadable_checkpoint`
# or `ddpm.schema.check_train` / `check_sample`, names them in the same module: each is checked as ddpm.<module>.<bare>.
LISTED = re.compile(r"`(ddpm\.[A-Za-z_]\w*)\.[A-Za-z_]\w*`((?:\s*(?:,|/|\()\s*`[A-Za-z_]\w*`\)?)+)")


@functools.cache
def listed_refs() -> list[Ref]:
    refs = []
    for p in prose():
        for m in LISTED.finditer(p.text):
            refs += [Ref(p.file, p.line, f"{m.group(1)}.{bare}") for bare in re.findall(r"`(\w+)`", m.group(2))]
    return refs


@pytest.mark.parametrize("ref", _ids(dotted_refs() + listed_refs()))
def test_dotted_module_path_exists(ref: Ref) -> None:
    _, module, *rest = ref.ref.split(".")
    path = _module_file(module)
    if path is None and module in _package_api():  # ddpm.UNet: the package's public API (src/ddpm/__init__.py)
        module, rest = _package_api()[module], [module, *rest]
        path = _module_file(module)
    assert path is not None, f"{ref.file}:{ref.line}: {ref.ref}: there is no src/ddpm/{module}.py"
    if not rest:
        return
    name, *attrs = rest
    tree = _tree(path)
    assert name in _bound_names(tree.body), (
        f"{ref.file}:{ref.line}: {ref.ref}: src/ddpm/{module}.py defines no top-level {name}"
    )
    if attrs:
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
        assert classes, f"{ref.file}:{ref.line}: {ref.ref}: {name} is not a class of src/ddpm/{module}.py"
        assert attrs[0] in _bound_names(classes[0].body), (
            f"{ref.file}:{ref.line}: {ref.ref}: class {name} defines no {attrs[0]}"
        )


# ---------------------------------------------------------------------------------------------------------------
# 2. repository file paths
# ---------------------------------------------------------------------------------------------------------------

# A path under one of the repository's own top-level folders, not inside another path (outputs/bench/x is a run's
# output, not bench/x) nor inside a word.
PATH = re.compile(r"(?<![\w./~$-])((?:src|tests|bench|conf|docs|scripts)/[\w./<>*{}-]*|\.ci/run\b)")
PLACEHOLDER = re.compile(r"[<>*{}]|\.\.\.")
PLACEHOLDER_STEMS = {"name", "option", "x", "foo"}  # conf/data/name.yaml: "add your dataset as ..."


@functools.cache
def path_refs() -> list[Ref]:
    refs = []
    for p in prose():
        for m in PATH.finditer(p.text):
            path = m.group(1).rstrip(".,:;")
            if PLACEHOLDER.search(path) or Path(path).stem in PLACEHOLDER_STEMS:
                continue
            refs.append(Ref(p.file, p.line, path))
    return refs


@pytest.mark.parametrize("ref", _ids(path_refs()))
def test_repository_path_exists(ref: Ref) -> None:
    target = ROOT / ref.ref
    ok = target.is_dir() if ref.ref.endswith("/") else target.exists()
    assert ok, f"{ref.file}:{ref.line}: {ref.ref} does not exist"


# ---------------------------------------------------------------------------------------------------------------
# 3. test node ids
# ---------------------------------------------------------------------------------------------------------------

NODE = re.compile(r"(?:(tests/[\w/]+\.py)|(?<![\w.]))::(\w+)(?:\[[^\]]*\])?")


@functools.cache
def node_refs() -> list[Ref]:
    """`tests/x.py::name` and, in the same table cell (or line outside a table), `::name` meaning the same file."""
    refs = []
    for p in prose():
        segments = p.text.split("|") if p.text.lstrip().startswith("|") else [p.text]
        for segment in segments:
            current = None
            for m in NODE.finditer(segment):
                current = m.group(1) or current
                refs.append(Ref(p.file, p.line, f"{current or '?'}::{m.group(2)}"))
    return refs


@functools.cache
def _functions(path: Path) -> set[str]:
    tree = _tree(path)
    names = _bound_names(tree.body)
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        names |= {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


@pytest.mark.parametrize("ref", _ids(node_refs()))
def test_test_node_id_exists(ref: Ref) -> None:
    file, name = ref.ref.split("::")
    assert file != "?", f"{ref.file}:{ref.line}: ::{name} follows no tests/<file>.py::<test> to say its file"
    path = ROOT / file
    assert path.is_file(), f"{ref.file}:{ref.line}: {file} does not exist"
    assert name in _functions(path), f"{ref.file}:{ref.line}: {file} defines no {name}"


# ---------------------------------------------------------------------------------------------------------------
# 4. README section references
# ---------------------------------------------------------------------------------------------------------------

SECTION = re.compile(r"\(README(?:\.md)?, \"([^\"]+)\"\)|README(?:\.md)?'s \"([^\"]+)\"")


@functools.cache
def section_refs() -> list[Ref]:
    return [
        Ref(p.file, p.line, m.group(1) or m.group(2)) for p in prose() for m in SECTION.finditer(p.text)
    ]


def _readme_headings() -> set[str]:
    """README's headings, each also without a trailing parenthesis: "Command line (stable)" is "Command line" too."""
    headings = set()
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"#+\s+(.*?)\s*$", line)
        if m:
            headings |= {m.group(1).lower(), re.sub(r"\s*\([^)]*\)$", "", m.group(1)).lower()}
    return headings


@pytest.mark.parametrize("ref", _ids(section_refs()))
def test_readme_section_exists(ref: Ref) -> None:
    assert ref.ref.lower() in _readme_headings(), f'{ref.file}:{ref.line}: README.md has no section "{ref.ref}"'


def test_the_extractors_find_references() -> None:
    """A broken extractor that finds nothing would pass every test above: each kind is known to be written."""
    assert len(dotted_refs()) > 50 and len(path_refs()) > 50 and len(node_refs()) > 20 and len(section_refs()) >= 2
