"""Cluster settings for studies run as SLURM jobs: the `[slurm]` table of a `--cluster` file, and flags over it."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from untrainable.config_files import from_dict, tomllib
from untrainable.errors import ConfigError

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_minutes(value: int | str, where: str = "slurm.time") -> int:
    """A SLURM time limit in minutes: an integer, or "MM", "HH:MM:SS", "D-HH:MM" (seconds round up)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{where}: expected minutes (an integer) or a string like '4:00:00', got {value!r}")
    if isinstance(value, int):
        minutes = value
    else:
        match = _TIME.match(value.strip())
        if not match:
            raise ConfigError(f"{where}: {value!r} is not a time; write minutes (240) or 'HH:MM:SS' ('4:00:00')")
        days, first, second, third = (int(g) if g else 0 for g in match.groups())
        if match.group(3) is None and match.group(4) is None:  # "MM" or "D-HH"
            minutes = days * 1440 + (first * 60 if match.group(1) else first)
        elif match.group(4) is None:  # "HH:MM" after a day, else "MM:SS"
            minutes = days * 1440 + first * 60 + second if match.group(1) else first + (second > 0)
        else:  # "HH:MM:SS"
            minutes = days * 1440 + first * 60 + second + (third > 0)
    if minutes < 1:
        raise ConfigError(f"{where}: must be at least one minute, got {value!r}")
    return minutes


@dataclass
class SlurmSettings:
    """Where and how each run of a study is a SLURM job (submitit's executor parameters, typed).

    A run is one job of `nodes` x `tasks_per_node` tasks: one task per GPU when
    `gpus_per_run` > 0 (spread over the nodes), else `tasks_per_node` CPU tasks
    (2 for a two-process gloo run). `cpus_per_run` is per task.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int | str = 60  # minutes, or "HH:MM:SS"
    gpus_per_run: int = 0
    cpus_per_run: int = 1
    mem: str | None = None  # per node, as sbatch writes it: "32G"
    nodes: int = 1
    tasks_per_node: int = 1  # CPU runs only; with GPUs, one task per GPU
    constraint: str | None = None
    array_parallelism: int = 64  # array tasks running at once
    max_requeues: int = 3  # requeues after a time limit (preemptions are not counted)
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to finish a step and write a checkpoint
    poll_s: float = 10.0  # how often the runner asks squeue while it waits
    # A job pending this long for a reason that does not pass by itself (PartitionConfig, ReqNodeNotAvail, ...)
    # stops the runner with an error naming it; 0 keeps waiting.
    stuck_after_s: int = 120
    setup: list[str] = field(default_factory=list)  # shell lines run before each job (module load, conda activate)
    sbatch: dict[str, Any] = field(default_factory=dict)  # any other sbatch option, e.g. { exclusive = true }

    def __post_init__(self) -> None:
        self.time = time_minutes(self.time)
        for name in ("cpus_per_run", "nodes", "tasks_per_node", "array_parallelism"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"slurm.{name}: expected an integer >= 1, got {value!r}")
        for name in ("gpus_per_run", "max_requeues", "signal_delay_s", "stuck_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"slurm.{name}: expected an integer >= 0, got {value!r}")
        if self.gpus_per_run and self.gpus_per_run % self.nodes:
            raise ConfigError(
                f"slurm.gpus_per_run: {self.gpus_per_run} GPUs do not split evenly over {self.nodes} nodes; "
                "give a multiple of slurm.nodes"
            )
        if self.signal_delay_s >= self.time * 60:
            raise ConfigError(
                f"slurm.signal_delay_s: {self.signal_delay_s} s is not shorter than slurm.time ({self.time} min); "
                "give a shorter delay or a longer time"
            )
        if not self.poll_s > 0:
            raise ConfigError(f"slurm.poll_s: expected a number of seconds > 0, got {self.poll_s!r}")
        for name in ("partition", "account", "qos", "mem", "constraint"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise ConfigError(f"slurm.{name}: empty; leave it out for the cluster's default")

    def request(self) -> str:
        """What each job asks for, in sbatch's words: `1 node(s) x 2 task(s) x 1 CPU(s), 60 min, partition debug`."""
        parts = [f"{self.nodes} node(s) x {self.tasks} task(s) x {self.cpus_per_run} CPU(s)"]
        if self.gpus_per_run:
            parts[0] += f", {self.gpus_per_run} GPU(s)"
        parts.append(f"{self.time} min")
        parts += [
            f"{name} {getattr(self, name)}"
            for name in ("partition", "account", "qos", "mem", "constraint")
            if getattr(self, name) is not None
        ]
        return ", ".join(parts)

    @property
    def tasks(self) -> int:
        """Tasks (processes) per node: one per GPU, else `tasks_per_node`."""
        return self.gpus_per_run // self.nodes if self.gpus_per_run else self.tasks_per_node

    def executor_parameters(self) -> dict[str, Any]:
        """The keyword arguments of submitit's `SlurmExecutor.update_parameters` (sbatch's own names)."""
        params: dict[str, Any] = {
            "time": self.time,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks,
            "cpus_per_task": self.cpus_per_run,
            "signal_delay_s": self.signal_delay_s,
            "array_parallelism": self.array_parallelism,
            "job_name": "untrainable",
            "stderr_to_stdout": True,  # one log per task: the path a failed row gives
        }
        if self.gpus_per_run:
            params["gpus_per_node"] = self.gpus_per_run // self.nodes
        for name in ("partition", "account", "qos", "constraint", "mem"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        if self.setup:
            params["setup"] = list(self.setup)
        if self.sbatch:
            params["additional_parameters"] = dict(self.sbatch)
        return params


FLAGS = (
    "partition",
    "account",
    "qos",
    "time",
    "gpus_per_run",
    "cpus_per_run",
    "array_parallelism",
    "max_requeues",
    "stuck_after_s",
)


def load_cluster(path: str | Path | None, overrides: dict[str, Any] | None = None) -> SlurmSettings:
    """The `[slurm]` table of a TOML file (or the defaults without one), with flag values over it."""
    data: dict[str, Any] = {}
    where = "cluster settings"
    if path is not None:
        path = Path(path)
        where = f"cluster file {path}"
        if not path.is_file():
            state = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise ConfigError(
                f"{where} {state}; give a TOML file with a [slurm] table (see configs/cluster_example.toml)"
            )
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"{where} is not valid TOML: {err}; fix the file") from None
        unknown = sorted(set(document) - {"slurm"})
        if unknown or "slurm" not in document:
            raise ConfigError(f"{where}: expected one [slurm] table, found {sorted(document) or 'nothing'}")
        if not isinstance(document["slurm"], dict):
            raise ConfigError(
                f"{where}: slurm is {type(document['slurm']).__name__} {document['slurm']!r}, not a table; "
                'write the settings under a [slurm] header (partition = "gpu", time = "4:00:00", ...)'
            )
        data = dict(document["slurm"])
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return from_dict(SlurmSettings, data, where="slurm")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def require_slurm() -> None:
    """Refuse, in one line saying what to install, where SLURM's commands or submitit are missing."""
    missing = [name for name in ("sbatch", "squeue", "scontrol", "srun") if shutil.which(name) is None]
    if missing:
        raise ConfigError(
            f"--executor slurm: {', '.join(missing)} not found on PATH; run this on a SLURM login node, "
            "install SLURM's client commands (Debian: apt-get install slurm-client; a one-node test cluster: "
            "bash scripts/slurm_local.sh start), or use --executor local"
        )
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--executor slurm: the submitit package is missing; pip install 'untrainable[slurm]'"
        ) from None
