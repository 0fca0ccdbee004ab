"""The docs site: generated references complete, runnable blocks run, the strict build passes."""

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from untrainable import config as config_module
from untrainable.cli import build_parser
from untrainable.config_fields import config_sections, read_dataclasses
from untrainable.models import create_model

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKER = re.compile(r"^<!-- runnable(?:: *(?P<scope>[\w-]+))? -->\n(?P<next>.*)$", re.M)
FENCE = re.compile(r"```(?P<lang>python|bash)\n(?P<code>.*?)^```", re.S | re.M)


def _hook():
    spec = importlib.util.spec_from_file_location("docs_reference_hook", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runnable_blocks() -> list[tuple[str, str, str, str]]:
    """(page, scope, language, code) of every block a page marks `<!-- runnable -->`."""
    blocks = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        for marker in MARKER.finditer(text):
            fence = FENCE.match(text, marker.start("next"))
            name = page.relative_to(DOCS).as_posix()
            assert fence, f"{name}: a runnable marker must be followed at once by a ```python or ```bash block"
            blocks.append((name, marker["scope"] or "", fence["lang"], fence["code"]))
    return blocks


BLOCKS = runnable_blocks()
PYTHON = [block for block in BLOCKS if block[2] == "python"]
SHELL = [block for block in BLOCKS if block[2] == "bash"]


def _sections(markdown: str) -> dict[str, dict[str, str]]:
    """A generated reference read back: heading -> {first cell: last cell} of its table."""
    found: dict[str, dict[str, str]] = {}
    heading = None
    for line in markdown.splitlines():
        if line.startswith("### "):
            heading = line[4:].strip("` ")
            found[heading] = {}
        elif heading and line.startswith("| `"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            found[heading][cells[0].strip("`")] = cells[-1]
    return found


def _runtime_sections() -> dict[str, type]:
    """Every config section by its key in a file (`guides.model`), walked from RunConfig at run time."""
    sections = {"": config_module.RunConfig}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            inner = [t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)]
            inner += [
                t for arg in typing.get_args(hints[f.name]) for t in typing.get_args(arg) if dataclasses.is_dataclass(t)
            ]
            if inner:
                key = f"{prefix}{f.name}"
                sections[key] = inner[0]
                walk(inner[0], key + ".")

    walk(config_module.RunConfig, "")
    return sections


def test_config_fields_read_from_the_source_are_the_dataclasses_fields():
    """The static walker (no torch at build time) sees what dataclasses see, inherited fields included."""
    static = read_dataclasses(config_module.__file__)
    for key, cls in _runtime_sections().items():
        names = [f.name for f in dataclasses.fields(cls)]
        assert [f.name for f in static[cls.__name__][1]] == names, key
    assert {s.key for s in config_sections(config_module.__file__)} == set(_runtime_sections())


def test_static_walker_follows_inherited_fields(tmp_path):
    source = tmp_path / "config.py"
    source.write_text(
        "from dataclasses import dataclass, field\n\n"
        "@dataclass\nclass Base:\n    a: int = 1\n    '''The a.'''\n    b: int = 2\n    '''The b.'''\n\n"
        "@dataclass\nclass Child(Base):\n    b: int = 3\n    c: list[int] = field(default_factory=list)\n    '''The c.'''\n"
    )
    exec(compile(source.read_text(), str(source), "exec"), scope := {})
    child = read_dataclasses(source)["Child"][1]
    assert [f.name for f in child] == [f.name for f in dataclasses.fields(scope["Child"])] == ["a", "b", "c"]
    assert [(f.default, f.help) for f in child] == [("1", "The a."), ("3", "The b."), ("[]", "The c.")]


def test_static_walker_follows_sections_imported_from_the_package(tmp_path):
    """A section whose dataclass lives in another module (`from untrainable.cluster import ClusterSpec`)."""
    (tmp_path / "cluster.py").write_text(
        "from dataclasses import dataclass\n\n@dataclass\nclass ClusterSpec:\n"
        '    """Where runs go."""\n\n    partition: str = \'gpu\'\n    """The SLURM partition."""\n'
    )
    (tmp_path / "config.py").write_text(
        "from dataclasses import dataclass, field\n\nfrom untrainable.cluster import ClusterSpec\n\n"
        "@dataclass\nclass RunConfig:\n    cluster: ClusterSpec = field(default_factory=ClusterSpec)\n"
        '    """Where it runs."""\n    name: str = \'run\'\n    """The name."""\n'
    )
    sections = {section.key: section for section in config_sections(tmp_path / "config.py")}
    assert [(f.name, f.default, f.help) for f in sections["cluster"].fields] == [
        ("partition", "'gpu'", "The SLURM partition.")
    ]
    assert sections["cluster"].doc == "Where runs go." and [f.name for f in sections[""].fields] == ["name"]


def test_config_reference_describes_every_field_of_every_section():
    page = _sections(_hook().config_reference())
    headings = {heading.strip("[]"): rows for heading, rows in page.items()}
    headings[""] = headings.pop("Top level")
    missing = []
    for key, cls in _runtime_sections().items():
        rows = headings.get(key, {})
        for f in dataclasses.fields(cls):
            if key == "" and dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
                continue  # a section of its own, under its own heading
            if key == "" and f.name in headings:
                continue
            if not rows.get(f.name):
                missing.append(f"{key}.{f.name}" if key else f.name)
    assert not missing, f"the configuration reference lacks a description of: {', '.join(missing)} (add a docstring)"


def _verbs(parser, prefix=""):
    """Every subcommand, nested ones as `tune start`."""
    for action in parser._actions:
        if type(action).__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield prefix + name, sub
                yield from _verbs(sub, prefix + name + " ")


def test_cli_reference_names_every_flag_of_every_verb():
    page = _sections(_hook().cli_reference())
    parser = build_parser()
    missing = []
    for title, sub in [("untrainable", parser), *((f"untrainable {name}", sub) for name, sub in _verbs(parser))]:
        rows = page.get(title)
        if rows is None:
            missing.append(title)
            continue
        names = {name.split(" ")[0].rstrip(","): text for name, text in rows.items()}
        names.update({part.split(" ")[0]: text for name, text in rows.items() for part in name.split(", ")})
        for action in sub._actions:
            if action.help == "==SUPPRESS==" or type(action).__name__ in ("_HelpAction", "_SubParsersAction"):
                continue
            for flag in action.option_strings or [action.dest]:
                if not names.get(flag):
                    missing.append(f"{title} {flag}")
    assert not missing, f"the command-line reference lacks: {', '.join(missing)} (give each argument a help)"


def test_the_cli_reference_follows_the_parser(monkeypatch):
    """A flag added to the parser appears in the page without anything else changing."""
    hook = _hook()
    real = hook._load

    def load(name, path):
        module = real(name, path)
        if name == "cli":
            build = module.build_parser

            def build_parser_with_a_new_flag():
                parser = build()
                next(sub for name, sub in _verbs(parser) if name == "train").add_argument(
                    "--new-flag", help="a flag added since"
                )
                verbs = next(a for a in parser._actions if type(a).__name__ == "_SubParsersAction")
                nested = verbs.add_parser("nested", help="a verb with verbs").add_subparsers(dest="what")
                nested.add_parser("start", help="start it").add_argument("--budget", help="how much")
                return parser

            module.build_parser = build_parser_with_a_new_flag
        return module

    monkeypatch.setattr(hook, "_load", load)
    page = _sections(hook.cli_reference())
    assert page["untrainable train"]["--new-flag NEW_FLAG"] == "a flag added since"
    assert page["untrainable nested start"]["--budget BUDGET"] == "how much"


def _loop_scope() -> dict:
    torch.manual_seed(0)
    target = create_model("fcn", input_shape=(40,), depth=3, width=32)
    return {
        "F": F,
        "target": target,
        "guide": create_model("cnn1d", input_shape=(40,), channels=8),
        "x": torch.randn(16, 40),
        "y": torch.randint(0, 10, (16,)),
        "optimizer": torch.optim.Adam(target.parameters(), lr=1e-3),
    }


def _guides_scope() -> dict:
    torch.manual_seed(0)
    image = (1, 28, 28)
    return {
        "F": F,
        "target": create_model("deep_fcn", input_shape=image, depth=8, width=32),
        "resnet": create_model("resnet18", input_shape=image, width=4),
        "vit": create_model("vit_tiny", input_shape=image, dim=16, depth=2, heads=2),
        "x": torch.randn(16, *image),
        "y": torch.randint(0, 10, (16,)),
    }


SCOPES = {"": dict, "loop": _loop_scope, "guides": _guides_scope}


def test_the_pages_mark_blocks_runnable():
    pages = {page for page, *_ in BLOCKS}
    assert {"index.md", "quickstart.md", "guidance.md"} <= pages
    assert {scope for _, scope, *_ in BLOCKS} <= set(SCOPES), "a page names a set-up this test does not provide"


@pytest.mark.parametrize("page, scope, lang, code", PYTHON, ids=[f"{p}:{i}" for i, (p, *_) in enumerate(PYTHON)])
def test_python_block_runs(page, scope, lang, code):
    namespace = SCOPES[scope]()
    target = namespace.get("target")
    before = [p.detach().clone() for p in target.parameters()] if target is not None else []
    exec(compile(code, f"docs/{page}", "exec"), namespace)
    if "loss" in namespace:
        assert torch.isfinite(namespace["loss"])
    if before and "optimizer" in namespace:  # the block's step changed the target
        assert any(not torch.equal(a, b) for a, b in zip(before, target.parameters()))
    if scope == "guides":
        out = namespace["out"]
        assert set(out.guide_losses) == {"resnet18", "vit"} and out.alphas == {"resnet18": 1.0, "vit": 0.5}
        assert {key.split(":")[0] for key in out.similarities} == {"resnet18", "vit"}


@pytest.mark.slow
@pytest.mark.parametrize("page, scope, lang, code", SHELL, ids=[f"{p}:{i}" for i, (p, *_) in enumerate(SHELL)])
def test_shell_block_runs(page, scope, lang, code, tmp_path):
    """Run as written, from a scratch folder holding the repository's src/, so runs/ lands there."""
    (tmp_path / "src").symlink_to(ROOT / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    bin_dir = Path(sys.executable).parent
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"docs/{page}:\n{code}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    for out in re.findall(r"--out (\S+)", code):
        assert (tmp_path / out / "result.json").exists()


def test_nav_lists_every_page():
    nav = set(re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "hooks" not in p.parts}
    assert pages <= nav, f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    # Beside docs/, the nav may name the repository's own files that the hook adds to the site.
    added = {p.relative_to(ROOT).as_posix() for p in [*(ROOT / "results").rglob("*.md"), ROOT / "CHANGELOG.md"]}
    assert nav <= pages | added, f"mkdocs.yml's nav names missing pages: {sorted(nav - pages - added)}"
    studies = {p.relative_to(ROOT).as_posix() for p in (ROOT / "results").glob("*/README.md")}
    assert studies <= nav, f"study READMEs missing from mkdocs.yml's nav: {sorted(studies - nav)}"


def test_the_site_fetches_nothing_from_elsewhere():
    """Formulas, styles and scripts are files the site ships (KaTeX under docs/assets/), never a CDN's."""
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assets = [*config.get("extra_javascript", []), *config.get("extra_css", [])]
    assert any("katex" in asset for asset in assets)
    for asset in assets:
        assert "//" not in asset and (DOCS / asset).is_file(), f"{asset}: not a file under docs/"
    assert config["theme"].get("font") is False, "theme.font fetches Google Fonts: set it to false"
    extensions = [next(iter(e)) if isinstance(e, dict) else e for e in config["markdown_extensions"]]
    assert "pymdownx.arithmatex" in extensions
    assert config["site_url"].startswith("https://") and config["repo_url"].startswith("https://")


def test_layout_names_every_module():
    text = (DOCS / "development.md").read_text()
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    package = ROOT / "src" / "untrainable"
    missing = []
    for path in sorted(package.rglob("*.py")):
        folder = path.parent.relative_to(package).as_posix()
        # Each package's modules are named on its own line of the Layout section.
        prefix = "- `src/untrainable/`" if folder == "." else f"- `src/untrainable/{folder}/`"
        lines = [line for line in layout.splitlines() if line.startswith(prefix)]
        if not any(f"`{path.name}`" in line for line in lines):
            missing.append(path.relative_to(package).as_posix())
    assert not missing, f"docs/development.md's Layout does not name: {', '.join(missing)}"


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: a broken link, a missing page or a docstring warning fails it."""
    if shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]' (the dev extra includes it)")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    configuration = (site / "configuration" / "index.html").read_text()
    assert "grad_norm_steps" in configuration and "config-reference" not in configuration
    cli = (site / "cli" / "index.html").read_text()
    assert "--guide-checkpoint" in cli and "cli-reference" not in cli
    assert "guide_input" in (site / "api" / "guidance" / "index.html").read_text()  # mkdocstrings wrote the API
    assert (site / "results" / "rescue" / "rescue-long" / "rescue_curves.png").exists()
    assert (site / "assets" / "katex" / "katex.min.js").is_file()  # the formulas' renderer, shipped
    assert 'class="arithmatex"' in (site / "concepts" / "index.html").read_text()
    assert "<loc>https://" in (site / "sitemap.xml").read_text()  # site_url set: the sitemap lists the pages
    index = json.loads((site / "search" / "search_index.json").read_text())["docs"]
    # Pages under the repository's results/ (docs/results.md, the Results page, is at results/ itself).
    pages = [(doc["location"].split("#")[0], doc) for doc in index]
    results = [doc for page, doc in pages if page.startswith("results/") and page != "results/"]
    assert results and all(doc.get("boost", 1) < 1 for doc in results), "results pages must rank below the guides"


def test_lists_start_after_a_blank_line():
    """Python-Markdown (MkDocs) reads a list glued to the paragraph above as part of it; GitHub does not."""
    glued = []
    for page in sorted(DOCS.rglob("*.md")):
        lines, fenced = page.read_text().split("\n"), False
        for i, line in enumerate(lines):
            fenced ^= line.startswith("```")
            previous = lines[i - 1] if i else ""
            if not fenced and line.startswith("- ") and previous.strip() and not previous.startswith(("- ", "  ")):
                glued.append(f"{page.relative_to(DOCS)}:{i + 1}")
    assert not glued, f"a list needs a blank line before it: {', '.join(glued)}"
