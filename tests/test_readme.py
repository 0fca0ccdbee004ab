"""The README's commands and library example are the ones that work."""

import re
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^    (bash scripts/install\.sh && .+)$", README, flags=re.M)
    assert commands[:2] == [
        "bash scripts/install.sh && untrainable run rescue --quick --jobs 2",
        "bash scripts/install.sh && python -m pytest -q",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


def test_library_example_runs():
    code = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)
    from untrainable.models import create_model

    torch.manual_seed(0)
    target = create_model("fcn", input_shape=(40,), depth=3, width=32)
    scope = {
        "F": F,
        "target": target,
        "guide": create_model("cnn1d", input_shape=(40,), channels=8),
        "x": torch.randn(16, 40),
        "y": torch.randint(0, 10, (16,)),
        "optimizer": torch.optim.Adam(target.parameters(), lr=1e-3),
    }
    before = [p.detach().clone() for p in target.parameters()]
    exec(code, scope)
    assert torch.isfinite(scope["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, target.parameters()))


def test_several_guides_example_runs():
    code = re.findall(r"```python\n(.*?)```", README, flags=re.S)[1]
    from untrainable.models import create_model

    torch.manual_seed(0)
    image = (1, 28, 28)
    scope = {
        "F": F,
        "target": create_model("deep_fcn", input_shape=image, depth=8, width=32),
        "resnet": create_model("resnet18", input_shape=image, width=4),
        "vit": create_model("vit_tiny", input_shape=image, dim=16, depth=2, heads=2),
        "x": torch.randn(16, *image),
        "y": torch.randint(0, 10, (16,)),
    }
    exec(code, scope)
    out = scope["out"]
    assert torch.isfinite(scope["loss"]) and set(out.guide_losses) == {"resnet18", "vit"}
    assert out.alphas == {"resnet18": 1.0, "vit": 0.5}
    assert {key.split(":")[0] for key in out.similarities} == {"resnet18", "vit"}


def test_readme_gives_the_fast_tier_command():
    assert re.search(r'^    python -m pytest -q -m "not slow"$', README, flags=re.M)


def test_layout_names_every_module():
    layout = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    package = ROOT / "src" / "untrainable"
    missing = []
    for path in sorted(package.rglob("*.py")):
        folder = path.parent.relative_to(package).as_posix()
        # Each package's modules are named on its own line of the Layout section.
        prefix = "- `src/untrainable/`" if folder == "." else f"- `src/untrainable/{folder}/`"
        lines = [line for line in layout.splitlines() if line.startswith(prefix)]
        if not any(f"`{path.name}`" in line for line in lines):
            missing.append(path.relative_to(package).as_posix())
    assert not missing, f"README's Layout does not name: {', '.join(missing)}"
