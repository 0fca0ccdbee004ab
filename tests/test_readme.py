"""The README's commands and library example are the ones that work."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
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
    # exactly that command, with SLURM's commands hidden as on a fresh machine
    assert f"bash scripts/without_slurm.sh bash -c '{commands[1]}'" in ci.splitlines()


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


def test_readme_gives_the_fast_tier_command():
    assert re.search(r'^    python -m pytest -q -m "not slow"$', README, flags=re.M)


def test_readme_links_resolve():
    """Every relative link of the front page names a file or folder of the repository (the docs pages)."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="unshare -m needs root")
def test_the_ci_wrapper_hides_slurm_commands_that_are_installed(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun", "slurmd"):
        (bin_dir / name).write_text("#!/bin/sh\necho installed\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    probe = "import shutil; print([shutil.which(n) for n in ('sbatch', 'srun', 'slurmd')])"
    outside = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert str(bin_dir / "srun") in outside.stdout  # installed, and found without the wrapper
    inside = subprocess.run(
        ["bash", str(ROOT / "scripts" / "without_slurm.sh"), sys.executable, "-c", probe],
        env=env,
        capture_output=True,
        text=True,
    )
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.strip() == "[None, None, None]"
    assert (bin_dir / "srun").read_text().startswith("#!/bin/sh")  # the files themselves are untouched
