"""Packaged and typed like a library: py.typed and the configs in the wheel, mypy and the wheel check in CI."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CI = (ROOT / ".ci" / "run").read_text().splitlines()
PUBLIC_API = {"guidance", "schedule", "adaptive_alpha", "similarity", "capture"}
STRICT = ("disallow_untyped_defs", "disallow_incomplete_defs", "disallow_untyped_calls", "disallow_any_generics")


def test_the_wheel_carries_py_typed_and_the_shipped_configs():
    assert (ROOT / "src" / "untrainable" / "py.typed").is_file()
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["untrainable"]
    assert "py.typed" in data and "configs/*.toml" in data
    assert {"mypy", "build", "pytest-xdist"} <= {
        dep.split(">")[0].split("=")[0] for dep in PYPROJECT["project"]["optional-dependencies"]["dev"]
    }


def test_ci_type_checks_src_strictly_on_the_public_api_and_runs_the_wheel():
    assert "python -m mypy" in CI and "bash scripts/check_package.sh" in CI
    mypy = PYPROJECT["tool"]["mypy"]
    assert mypy["files"] == ["src/untrainable"]
    strict = [o for o in mypy["overrides"] if all(o.get(flag) for flag in STRICT)]
    assert len(strict) == 1 and set(strict[0]["module"]) == {f"untrainable.{m}" for m in PUBLIC_API}
    assert all((ROOT / "src" / "untrainable" / f"{m}.py").is_file() for m in PUBLIC_API)
    # No error code is switched off for a public API module.
    relaxed = {m for o in mypy["overrides"] if "disable_error_code" in o for m in o["module"]}
    assert not relaxed & {f"untrainable.{m}" for m in PUBLIC_API}
