"""The config's sections and fields with their one-line descriptions, read from config.py's source.

Each field of a config dataclass is described by the string literal under it
(an attribute docstring, as griffe and mkdocstrings read them). This module
reads them with `ast`, without importing config.py, so the docs build needs no
torch; `tests/test_docs.py` checks it against `dataclasses.fields` at run time.
Standard library only: the docs hook loads this file by path.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

CONFIG_SOURCE = Path(__file__).with_name("config.py")
ROOT = "RunConfig"


@dataclass(frozen=True)
class FieldDoc:
    """One config field: its name, type and default as written in config.py, and its description."""

    name: str
    type: str
    default: str | None  # None: required
    help: str  # "" when the field has no docstring


@dataclass(frozen=True)
class SectionDoc:
    """One config section: its key in a config file (`train`, `guides`), its class, and its fields."""

    key: str
    cls: str
    doc: str  # the class docstring's first paragraph
    fields: tuple[FieldDoc, ...]
    many: bool = False  # a list of tables, `[[guides]]`


def _is_dataclass(node: ast.ClassDef) -> bool:
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if (isinstance(target, ast.Name) and target.id == "dataclass") or (
            isinstance(target, ast.Attribute) and target.attr == "dataclass"
        ):
            return True
    return False


def _default(source: str, node: ast.expr | None) -> str | None:
    """The default as a config file would write it: `field(default_factory=dict)` is `{}`."""
    if node is None:
        return None
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "field":
        for keyword in node.keywords:
            if keyword.arg == "default":
                return _default(source, keyword.value)
            if keyword.arg == "default_factory":
                factory = ast.get_source_segment(source, keyword.value) or ""
                return {"dict": "{}", "list": "[]"}.get(factory, f"{factory}()")
        return None
    return ast.get_source_segment(source, node)


def _own_fields(source: str, node: ast.ClassDef) -> list[FieldDoc]:
    fields = []
    body = node.body
    for i, item in enumerate(body):
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        kind = ast.get_source_segment(source, item.annotation) or ""
        if kind.startswith(("ClassVar", "typing.ClassVar")):
            continue
        after = body[i + 1] if i + 1 < len(body) else None
        text = ""
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            text = " ".join(after.value.value.split())
        fields.append(FieldDoc(item.target.id, kind, _default(source, item.value), text))
    return fields


def _package_file(module: str, package: Path) -> Path | None:
    """The source file of `untrainable.x.y` under `package` (the untrainable folder), if it is there."""
    parts = module.split(".")[1:]
    for path in (package.joinpath(*parts).with_suffix(".py"), package.joinpath(*parts, "__init__.py")):
        if parts and path.is_file():
            return path
    return None


def _dataclass_nodes(path: Path, package: Path, seen: set[Path]) -> dict[str, tuple[str, ast.ClassDef]]:
    """name -> (its file's source, its class node): the file's dataclasses, and those it imports from the package."""
    seen.add(path)
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    nodes = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("untrainable."):
            other = _package_file(node.module or "", package)
            if other is None or other in seen:
                continue
            theirs = _dataclass_nodes(other, package, seen)
            nodes.update(
                {alias.asname or alias.name: theirs[alias.name] for alias in node.names if alias.name in theirs}
            )
    nodes.update({n.name: (source, n) for n in tree.body if isinstance(n, ast.ClassDef) and _is_dataclass(n)})
    return nodes


def read_dataclasses(path: str | Path = CONFIG_SOURCE) -> dict[str, tuple[str, list[FieldDoc]]]:
    """The dataclasses of a source file and those it imports from the package.

    name -> (the docstring's first paragraph, the fields, inherited ones first as dataclasses order them).
    """
    nodes = _dataclass_nodes(Path(path), Path(path).parent, set())  # config.py lies in the package's top folder
    found: dict[str, tuple[str, list[FieldDoc]]] = {}

    def fields_of(name: str) -> list[FieldDoc]:
        if name in found:
            return found[name][1]
        source, node = nodes[name]
        merged: dict[str, FieldDoc] = {}
        for base in reversed(node.bases):  # the MRO, for the single and simple bases used here
            if isinstance(base, ast.Name) and base.id in nodes:
                merged.update({f.name: f for f in fields_of(base.id)})
        for own in _own_fields(source, node):
            # An override keeps the inherited position, as dataclasses do; a docstring-less override inherits the text.
            merged[own.name] = (
                own if own.help or own.name not in merged else FieldDoc(**{**vars(own), "help": merged[own.name].help})
            )
        found[name] = ((ast.get_docstring(node) or "").split("\n\n")[0].replace("\n", " "), list(merged.values()))
        return found[name][1]

    for name in nodes:
        fields_of(name)
    return found


def _section_class(kind: str, classes: dict) -> tuple[str | None, bool]:
    """The dataclass a field's type names (`GuidanceSpec`, `ModelSpec | None`, `list[GuideSpec] | None`)."""
    many = kind.replace(" ", "").startswith("list[")
    names = [part.strip("[] ") for part in kind.replace("|", "[").replace(",", "[").split("[")]
    return next((name for name in names if name in classes), None), many


def config_sections(path: str | Path = CONFIG_SOURCE) -> list[SectionDoc]:
    """The run config's sections in file order, then a `top level` section of RunConfig's plain fields."""
    classes = read_dataclasses(path)
    doc, root_fields = classes[ROOT]
    sections, top = [], []
    for f in root_fields:
        cls, many = _section_class(f.type, classes)
        if cls is None:
            top.append(f)
            continue
        sections.append(SectionDoc(f.name, cls, classes[cls][0], tuple(classes[cls][1]), many))
        # A section's own sections (`[guides.model]`).
        for sub in classes[cls][1]:
            sub_cls, sub_many = _section_class(sub.type, classes)
            if sub_cls is not None:
                key = f"{f.name}.{sub.name}"
                sections.append(SectionDoc(key, sub_cls, classes[sub_cls][0], tuple(classes[sub_cls][1]), sub_many))
    sections.append(SectionDoc("", ROOT, doc, tuple(top)))
    return sections
