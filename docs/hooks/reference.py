"""MkDocs hooks: the configuration and command-line references, generated from the code at build time.

`<!-- config-reference -->` in a page becomes a table of every field of every
config section, read from config.py's dataclasses (their attribute docstrings)
by `untrainable.config_fields`; `<!-- cli-reference -->` becomes every verb of
`untrainable` with its usage and arguments, walked from `cli.build_parser()`.
Both modules are loaded by path, so the build imports no torch. The committed
results (figures, tables, their READMEs) are added to the site under
`results/`, so the pages can show and link them where they lie in the repository;
the study READMEs are in the navigation, and every page under `results/` is
ranked below the guides in search. CHANGELOG.md joins the site as it is.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "untrainable"
CONFIG_MARKER = "<!-- config-reference -->"
CLI_MARKER = "<!-- cli-reference -->"
# Search ranks a page's sections by match, times this: the results' tables and READMEs repeat the
# words of the guides ("alpha schedule") in every row, and must not come before the pages that explain them.
RESULTS_SEARCH_BOOST = 0.1


def _load(name: str, path: Path) -> ModuleType:
    """A module of the package by file path, without importing the package (whose __init__ imports torch)."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))  # for imports a module makes inside its functions
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference(source: Path = PACKAGE / "config.py") -> str:
    """Markdown: one table per config section, each field with its type, default and description."""
    fields = _load("config_fields", PACKAGE / "config_fields.py")
    out = []
    for section in fields.config_sections(source):
        if section.key:
            title = f"[[{section.key}]]" if section.many else f"[{section.key}]"
            out += [f"### `{title}`", "", f"{section.doc} (`{section.cls}`)", ""]
        else:
            out += ["### Top level", "", "Keys outside any section.", ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for f in section.fields:
            default = "required" if f.default is None else f"`{_cell(f.default)}`"
            kind = " or ".join(f"`{part.strip()}`" for part in f.type.split("|"))  # a `|` would end the cell
            out.append(f"| `{f.name}` | {kind} | {default} | {_cell(f.help)} |")
        out.append("")
    return "\n".join(out)


def _verbs(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of every subcommand, nested ones as `tune start`, in the order they were added."""
    verbs, seen = [], set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if id(sub) in seen:  # an alias of a verb already listed
                    continue
                seen.add(id(sub))
                verbs.append((prefix + name, helps.get(name, ""), sub))
                verbs += _verbs(sub, prefix + name + " ")
    return verbs


def _argument_rows(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            name = ", ".join(action.option_strings)
            if action.nargs != 0:
                name += " " + formatter._format_args(action, action.dest.upper())
        else:
            name = formatter._format_args(action, action.dest)
        text = formatter._expand_help(action) if action.help else ""
        if action.required and action.option_strings:
            text += " (required)"
        rows.append(f"| `{_cell(name)}` | {_cell(text)} |")
    return rows


def cli_reference() -> str:
    """Markdown: the tool's usage and options, then each verb's usage and arguments, from `build_parser()`."""
    parser = _load("cli", PACKAGE / "cli.py").build_parser()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "84"  # argparse wraps usage lines to the terminal: the same page on every machine
    try:
        return _cli_markdown(parser)
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def _cli_markdown(parser: argparse.ArgumentParser) -> str:
    out = ["### `untrainable`", "", parser.description or "", "", "```text", parser.format_usage().strip(), "```", ""]
    out += ["| argument | description |", "|---|---|", *_argument_rows(parser), ""]
    for name, help_text, sub in _verbs(parser):
        sentence = help_text[:1].upper() + help_text[1:] + ("" if help_text.endswith(".") else ".")
        out += [f"### `untrainable {name}`", "", sentence if help_text else "", ""]
        out += ["```text", sub.format_usage().strip(), "```", ""]
        rows = _argument_rows(sub)
        out += ["| argument | description |", "|---|---|", *rows, ""] if rows else ["No arguments.", ""]
    return "\n".join(out)


def _repository_links(markdown: str, depth: int) -> str:
    """`../results/...` (right where GitHub shows docs/ pages) as the site holds it: one `../` fewer."""
    up = "../" * (depth + 1)
    return re.sub(rf"\]\({re.escape(up)}(results|examples|configs)/", lambda m: f"]({'../' * depth}{m[1]}/", markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri.startswith("results/"):
        page.meta.setdefault("search", {}).setdefault("boost", RESULTS_SEARCH_BOOST)
    markdown = _repository_links(markdown, page.file.src_uri.count("/"))
    if CONFIG_MARKER in markdown:
        # In a block of its own, so the stylesheet can lay its tables out as cards on a phone.
        table = config_reference()
        markdown = markdown.replace(CONFIG_MARKER, f'<div class="config-fields" markdown>\n\n{table}\n\n</div>')
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return markdown


def on_files(files, config):
    """The committed results, examples and cluster configs, under `results/`, `examples/`, `configs/` as in the repository."""
    from mkdocs.structure.files import File

    shown = [*(ROOT / "results").rglob("*"), *(ROOT / "examples").glob("*.py"), *(ROOT / "configs").glob("*.toml")]
    shown.append(ROOT / "CHANGELOG.md")
    for path in sorted(shown):
        if path.is_file() and path.suffix in (".md", ".png", ".json", ".py", ".toml"):
            uri = path.relative_to(ROOT).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
