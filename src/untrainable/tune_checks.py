"""The refusals a study makes before any work: its folder, its storage, its files, the guided arm's extra fields.

Each is one line naming the flag or the file, what was expected and what to
do; nothing a user had in a folder is overwritten.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from untrainable.errors import ConfigError
from untrainable.space import Space

# What a study file holds, each key with the type it must have.
SPEC_KEYS = {"config": dict, "space": dict, "settings": dict, "metric": str, "direction": str, "study_name": str}
# The sections `unguided` removes: the only fields the guided arm may tune beyond the baseline's space.
GUIDED_SECTIONS = ("guide", "guides", "guidance", "distill")


def check_tune_flags(args: Any) -> None:
    """Refuse the `tune` flags that the other flags given make meaningless (they would be ignored silently)."""
    if args.worker:
        given = [
            flag
            for flag, value in (
                ("--config", args.config), ("--compare", args.compare), ("--space", args.space),
                ("--guided-space", args.guided_space), ("--trials", args.trials), ("--out", args.out),
                ("--seeds", args.seeds), ("--set", args.set), ("--enqueue", getattr(args, "enqueue", None)),
            )
            if value is not None
        ]  # fmt: skip
        if given:
            raise ConfigError(
                f"{', '.join(given)}: not with --worker {args.worker} (a worker reads the config, space and budget "
                f"from {Path(args.worker) / 'study.json'}); leave {'them' if len(given) > 1 else 'it'} out"
            )
    elif args.worker_index is not None:
        raise ConfigError("--worker-index: only with --worker STUDY_DIR (it numbers that worker, recorded beside its seed)")
    if args.seeds is not None and not args.compare:
        raise ConfigError("--seeds: only with --compare GUIDED.toml (the final seeds of the comparison)")
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds: expected a number >= 1, got {args.seeds}")


def check_out(folder: Path, marks: tuple[str, ...], flag: str = "--out") -> None:
    """Refuse a file, or an existing folder that holds files and none of `marks` (what a study of ours writes first)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder}: a file, not a folder; give {flag} a new folder")
    if not folder.is_dir() or any((folder / mark).is_file() for mark in marks):
        return
    theirs = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if theirs:
        shown = ", ".join(theirs[:4]) + (", ..." if len(theirs) > 4 else "")
        raise ConfigError(
            f"{flag} {folder}: holds {shown} but no study ({' or '.join(marks)}); a study would write over them: "
            f"give {flag} a new or empty folder"
        )


def storage_label(storage_url: str | None) -> str | None:
    """How a study file records its storage: the URL without its password; None for the folder's journal file."""
    if not storage_url:
        return None
    from sqlalchemy.engine import make_url

    try:
        return make_url(storage_url).render_as_string(hide_password=True)
    except Exception:  # refused by check_storage with its reason
        return storage_url


def check_storage(storage_url: str | None) -> None:
    """Open the RDB a `--storage` URL names (creating Optuna's tables), refusing in one line what cannot be opened."""
    if storage_url is None:
        return
    import optuna

    if not storage_url.strip():
        raise ConfigError("--storage is empty; give an RDB URL such as sqlite:///studies.db, or leave it out")
    try:
        optuna.storages.RDBStorage(storage_url)
    except Exception as err:  # SQLAlchemy's ArgumentError, NoSuchModuleError, OperationalError; Optuna's ImportError
        reason = " ".join(str(err).split("\n")[0].split())
        if isinstance(err, ImportError):
            reason = "its database driver is not installed, e.g. psycopg2 for postgresql://"
        raise ConfigError(
            f"--storage {storage_label(storage_url)}: cannot open it ({reason}); give an RDB URL such as "
            "sqlite:///PATH/studies.db (its folder must exist) or postgresql://USER@HOST/DB, or leave --storage out "
            "for a journal file in the study folder"
        ) from None


def check_same_storage(study_file: Path, saved: dict[str, Any], storage_url: str | None) -> None:
    """Refuse a storage other than the one the study file records (a study folder made before it was recorded passes)."""
    if "storage" not in saved:
        return
    recorded, given = saved["storage"], storage_label(storage_url)
    if recorded != given:
        want = f"--storage {recorded}" if recorded else "no --storage (its journal file)"
        got = f"--storage {given}" if given else "no --storage"
        where = recorded or "the folder's journal file"
        raise ConfigError(
            f"{got}: {study_file} records a study in {where}; give {want}, or another --out for a new study"
        )


def check_spec(path: Path, data: Any) -> dict[str, Any]:
    """A study file's content, refused in one line naming the file when it is not what `prepare` writes."""
    wrong = [k for k, t in SPEC_KEYS.items() if not isinstance(data, dict) or not isinstance(data.get(k), t)]
    if wrong:
        raise ValueError(
            f"{path} is not a study file (no valid {', '.join(wrong)}); restore it from a copy, or start the study "
            "again in another --out"
        )
    return data


def recorded_name(study_file: Path) -> str | None:
    """The study name a study file records, so a copied or moved folder continues its own study; None when there is none."""
    try:
        data = json.loads(Path(study_file).read_text())
    except (OSError, ValueError):
        return None
    name = data.get("study_name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def check_journal(path: Path) -> None:
    """Refuse a journal file with a line that is no whole JSON record (cut, or garbage appended), naming the line.

    Optuna skips a bad last line (it may be a record being written) and then
    appends after it, which damages the study further. A last line still bad
    a moment later is no write in progress.
    """
    if not path.is_file():
        return
    size, bad = path.stat().st_size, _bad_line(path)
    for _ in range(10):  # while another worker appends, its last line may be half written
        if bad is None or bad[0] < bad[1]:
            break
        time.sleep(0.2)
        before, size, bad = size, path.stat().st_size, _bad_line(path)
        if size == before:
            break
    if bad is None:
        return
    number, total = bad
    raise ValueError(
        f"{path}: line {number} of {total} is not a whole record (the file was cut or something was appended); "
        f"keep a copy, delete line {number} and every line after it, then run the same command to continue from "
        "the trials recorded before it (a trial cut short is run again), or start again in another --out"
    )


def _bad_line(path: Path) -> tuple[int, int] | None:
    """(number of the first line that is no JSON record, number of lines), or None."""
    lines = path.read_bytes().split(b"\n")
    ended = lines[-1] == b""  # the file ends with a newline
    lines = lines[:-1] if ended else lines
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            return number, len(lines)
        if not isinstance(record, dict) or (number == len(lines) and not ended):
            return number, len(lines)
    return None


def check_guided_space(space: Space, guided_space: Space) -> None:
    """Refuse a guided-space field the baseline would not tune: only guide fields, or one in both with the same range."""
    base = set(space.paths)
    for path in guided_space.paths:
        if path.split(".")[0].split("[")[0] not in GUIDED_SECTIONS and path not in base:
            raise ConfigError(
                f"{guided_space.source}: {path}: not a guidance field, so only the guided arm would tune it; "
                f"move it to --space {space.source} (both arms tune it) or leave it out. The guided space takes "
                f"fields of {', '.join(f'[{s}]' for s in GUIDED_SECTIONS)}"
            )
