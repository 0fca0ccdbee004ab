"""Typed, self-validating run configuration, read from TOML or JSON files."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from untrainable.adaptive_alpha import ADAPTIVE
from untrainable.guidance import GUIDE_INPUTS, GUIDE_NAME, MIN_EXAMPLES
from untrainable.guide_cache import STORAGES
from untrainable.optim import FUSED_OPTIMIZERS, LR_SCHEDULES, OPTIMIZERS
from untrainable.schedule import SCHEDULES
from untrainable.sequence import SEQUENCE_MODES
from untrainable.step import PRECISIONS
from untrainable.tasks import TASKS as _TASKS

TASKS = tuple(_TASKS)
SIMILARITY_SCOPES = ("global", "local")
GUIDE_CACHES = ("none", *STORAGES)
GRAM_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what is allowed."""


def _choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")


def _positive(where: str, value: float | int | None, allow_zero: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = value is not None and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{where}: must be a number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class ModelSpec:
    """A model by registry name or import path (`package.module:callable`), its keyword arguments, optional weights."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    seed: int | None = None  # initialisation seed; default: the run's seed

    def validate(self, where: str) -> None:
        from untrainable.models import list_models
        from untrainable.models.imported import check_import_path, is_import_path

        if is_import_path(self.name):  # imported when the model is built
            check_import_path(self.name, f"{where}.name")
        elif self.name not in list_models():
            raise ConfigError(
                f"{where}.name: {self.name!r} is not one of {', '.join(list_models())}, "
                "nor an import path 'package.module:callable' (e.g. 'torchvision.models:resnet18')"
            )
        if self.checkpoint is not None and not Path(self.checkpoint).expanduser().exists():
            raise ConfigError(f"{where}.checkpoint: file {self.checkpoint!r} does not exist")


@dataclass
class DataSpec:
    """A data set by registry name, its arguments, and how it is batched."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 0
    train_eval_size: int = 2000  # training examples evaluated each epoch for the train curve

    def validate(self, where: str) -> None:
        from untrainable.data import list_datasets

        _choice(f"{where}.name", self.name, tuple(list_datasets()))
        _positive(f"{where}.batch_size", self.batch_size)
        _positive(f"{where}.eval_batch_size", self.eval_batch_size)
        _positive(f"{where}.num_workers", self.num_workers, allow_zero=True)
        _positive(f"{where}.train_eval_size", self.train_eval_size, allow_zero=True)


# The fields that say how one guide pulls: in `[guidance]` for the single
# `[guide]`, in each `[[guides]]` entry for several.
PULL_FIELDS = (
    "alpha",
    "schedule",
    "steps",
    "adapt_every",
    "adapt_ratio",
    "adapt_momentum",
    "alpha_max",
    "target_layers",
    "guide_layers",
    "pairs",
    "guide_input",
)


def _check_pull(where: str, spec: "GuidanceSpec | GuideSpec") -> None:
    """Validate how one guide pulls: its alpha and schedule, its pairs, its input."""
    _positive(f"{where}.alpha", spec.alpha, allow_zero=True)
    _choice(f"{where}.schedule", spec.schedule, (*SCHEDULES, ADAPTIVE))
    if spec.schedule not in ("constant", ADAPTIVE):
        _positive(f"{where}.steps", spec.steps)
    if spec.schedule == ADAPTIVE:
        _check_adaptive(where, spec)
    _choice(f"{where}.guide_input", spec.guide_input, GUIDE_INPUTS)
    for i, pair in enumerate(spec.pairs or []):
        if not (isinstance(pair, list) and len(pair) in (2, 3)):
            raise ConfigError(f"{where}.pairs[{i}]: expected [target, guide] or [target, guide, weight], got {pair!r}")
        if not all(isinstance(name, str) and name for name in pair[:2]):
            raise ConfigError(
                f"{where}.pairs[{i}]: the target and guide layers must be layer paths (strings), got {pair[:2]!r}"
            )
        if len(pair) == 3 and (isinstance(pair[2], bool) or not isinstance(pair[2], (int, float))):
            raise ConfigError(f"{where}.pairs[{i}]: the weight must be a number >= 0, got {pair[2]!r}")
        if len(pair) == 3:
            _positive(f"{where}.pairs[{i}] weight", pair[2], allow_zero=True)
        if any(other[:2] == pair[:2] for other in (spec.pairs or [])[:i]):
            raise ConfigError(f"{where}.pairs[{i}]: {pair[:2]!r} is given twice; use one pair with a weight instead")


def _check_adaptive(where: str, spec: "GuidanceSpec | GuideSpec") -> None:
    """Validate an adaptive alpha's fields (see `adaptive_alpha.AdaptiveAlpha`)."""
    _positive(f"{where}.adapt_every", spec.adapt_every)
    _positive(f"{where}.adapt_ratio", spec.adapt_ratio)
    _positive(f"{where}.alpha_max", spec.alpha_max)
    if spec.alpha_max < spec.alpha:
        raise ConfigError(
            f"{where}.alpha_max: must be >= {where}.alpha, the starting value ({spec.alpha:g}), got {spec.alpha_max:g}"
        )
    if not 0 <= spec.adapt_momentum < 1:
        raise ConfigError(f"{where}.adapt_momentum: must be a number in [0, 1), got {spec.adapt_momentum!r}")


@dataclass
class GuidanceSpec:
    """How the guide pulls on the target: alpha, its schedule, the layers, the measure.

    `schedule = "adaptive"` measures alpha every `adapt_every` steps so the
    guidance gradient is `adapt_ratio` times the task gradient, smoothed by
    `adapt_momentum` and capped at `alpha_max`; `alpha` is its starting value
    (see `adaptive_alpha.AdaptiveAlpha`).

    With several guides (`[[guides]]`), the fields of PULL_FIELDS belong to
    each guide's entry; the measure, scope, cache and logging stay here.
    """

    alpha: float = 1.0
    schedule: str = "constant"
    steps: int | None = None
    adapt_every: int = 10
    adapt_ratio: float = 1.0
    adapt_momentum: float = 0.5
    alpha_max: float = 100.0
    similarity: str = "cka"
    target_layers: list[str] | None = None
    guide_layers: list[str] | None = None
    pairs: list[list[Any]] | None = None  # [[target, guide], [target, guide, weight], ...]
    guide_input: str = "same"
    sequence_mode: str = "flatten"
    scope: str = "global"  # under DDP: CKA on the global batch, or per rank ("local")
    cache: str = "none"  # keep the guide's activations per example: "memory" or "disk" (no augmentation only)
    log_every: int = 10  # steps between per-pair similarity records
    gram_dtype: str = "float32"  # dtype of CKA's sample-space Gram products: "float32" or "bfloat16"

    def validate(self, where: str) -> None:
        from untrainable.similarity import list_similarities

        _check_pull(where, self)
        _choice(f"{where}.similarity", self.similarity, tuple(list_similarities()))
        _choice(f"{where}.sequence_mode", self.sequence_mode, SEQUENCE_MODES)
        _choice(f"{where}.scope", self.scope, SIMILARITY_SCOPES)
        _choice(f"{where}.cache", self.cache, GUIDE_CACHES)
        if self.cache != "none" and self.guide_input != "same":
            raise ConfigError(
                f"{where}.cache: {self.cache!r} needs guide_input = 'same' (noise inputs change every step)"
            )
        _positive(f"{where}.log_every", self.log_every)
        _choice(f"{where}.gram_dtype", self.gram_dtype, GRAM_DTYPES)


@dataclass
class GuideSpec:
    """One of several guides, a `[[guides]]` entry: its model, the name its similarity keys carry, how it pulls."""

    model: ModelSpec
    name: str | None = None  # prefixes its similarity keys, `name:target<-guide`; default: the model's name
    alpha: float = 1.0
    schedule: str = "constant"
    steps: int | None = None
    adapt_every: int = 10  # the adapt_* fields and alpha_max: for schedule = "adaptive", as in [guidance]
    adapt_ratio: float = 1.0
    adapt_momentum: float = 0.5
    alpha_max: float = 100.0
    target_layers: list[str] | None = None
    guide_layers: list[str] | None = None
    pairs: list[list[Any]] | None = None  # [[target, guide], [target, guide, weight], ...]
    guide_input: str = "same"

    @property
    def label(self) -> str:
        """The guide's name in similarity keys and logs ("" for the single `[guide]`: plain keys)."""
        return self.name if self.name is not None else self.model.name

    @property
    def pulls(self) -> bool:
        """False at alpha 0 under a constant schedule: the guide then never pulls (it may still teach by distillation)."""
        return not (self.alpha == 0 and self.schedule == "constant")

    def validate(self, where: str) -> None:
        self.model.validate(f"{where}.model")
        if not GUIDE_NAME.fullmatch(self.label):
            raise ConfigError(f"{where}.name: {self.label!r}: use letters, digits, _ and - only")
        _check_pull(where, self)


@dataclass
class OptimSpec:
    """Optimiser and learning-rate schedule."""

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = None
    fused: bool = False  # one fused kernel for the Adam/AdamW update (same maths, faster on large models)

    def validate(self, where: str) -> None:
        _choice(f"{where}.name", self.name, tuple(OPTIMIZERS))
        _positive(f"{where}.lr", self.lr)
        _positive(f"{where}.weight_decay", self.weight_decay, allow_zero=True)
        _positive(f"{where}.momentum", self.momentum, allow_zero=True)
        _choice(f"{where}.lr_schedule", self.lr_schedule, tuple(LR_SCHEDULES))
        _positive(f"{where}.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive(f"{where}.grad_clip", self.grad_clip, optional=True)
        if self.fused and self.name not in FUSED_OPTIMIZERS:
            raise ConfigError(
                f"{where}.fused: only {', '.join(FUSED_OPTIMIZERS)} have a fused update here; set fused = false for {self.name}"
            )


@dataclass
class DistillSpec:
    """Knowledge distillation from the `[guide]` model's logits (the paper's contrast to guidance); off at weight 0."""

    weight: float = 0.0
    temperature: float = 4.0

    def validate(self, where: str) -> None:
        _positive(f"{where}.weight", self.weight, allow_zero=True)
        _positive(f"{where}.temperature", self.temperature)


@dataclass
class TrainSpec:
    """The loop: length, task, seed, device, precision, checkpoints."""

    epochs: int = 10
    seed: int = 0
    task: str = "classification"
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: str = "fp32"
    deterministic: bool = True
    max_steps: int | None = None  # stop early after this many steps
    checkpoint_every: int = 0  # steps between checkpoints within an epoch; 0: each epoch only
    keep_checkpoints: int = 2
    progress: bool = True
    grad_norm_steps: list[int] = field(
        default_factory=list
    )  # steps (from 1) at which per-layer gradient norms are logged
    # Early stopping: keep the weights of the epoch with the best validation metric
    # (accuracy, else loss); the test set is evaluated with them too (result.json "best").
    early_stopping: bool = False
    # Under torchrun: seconds a process waits for the others in a collective before it stops with an error.
    timeout_s: float = 300.0

    def validate(self, where: str) -> None:
        _positive(f"{where}.timeout_s", self.timeout_s)
        _positive(f"{where}.epochs", self.epochs)
        _choice(f"{where}.task", self.task, TASKS)
        _choice(f"{where}.precision", self.precision, PRECISIONS)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"{where}.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        _positive(f"{where}.max_steps", self.max_steps, optional=True)
        _positive(f"{where}.checkpoint_every", self.checkpoint_every, allow_zero=True)
        _positive(f"{where}.keep_checkpoints", self.keep_checkpoints)
        for i, step in enumerate(self.grad_norm_steps):
            _positive(f"{where}.grad_norm_steps[{i}]", step)


@dataclass
class RunConfig:
    """One training run: a target model on a data set, optionally guided.

    One guide is a `[guide]` model with its `[guidance]` section; several are
    `[[guides]]` entries (GuideSpec), each with its own model and PULL_FIELDS,
    the rest of `[guidance]` shared.
    """

    model: ModelSpec
    data: DataSpec
    guide: ModelSpec | None = None
    guidance: GuidanceSpec = field(default_factory=GuidanceSpec)
    # None rather than []: a run folder saved before this field existed still compares equal.
    guides: list[GuideSpec] | None = None
    optim: OptimSpec = field(default_factory=OptimSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    name: str = "run"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "RunConfig":
        if (
            not isinstance(self.name, str)
            or self.name.strip() in ("", ".", "..")
            or any(c in self.name for c in "/\\\0")
        ):
            raise ConfigError(
                f"name: {self.name!r} is not a folder name (it names the run folder under runs/); "
                "use letters, digits, '-', '_' and '.', without '/'; give --out to write elsewhere"
            )
        self.model.validate("model")
        self.data.validate("data")
        if self.guide is not None:
            self.guide.validate("guide")
        self.guidance.validate("guidance")
        if self.guides:
            self._validate_guides()
        self.optim.validate("optim")
        self.distill.validate("distill")
        if self.distill.weight > 0 and self.guide is None:
            raise ConfigError(
                "distill.weight: distillation needs a teacher; name it in the [guide] section"
                + (" ([[guides]] entries are not teachers)" if self.guides else "")
            )
        self.train.validate("train")
        least = MIN_EXAMPLES.get(self.guidance.similarity)
        guided = any(spec.alpha > 0 or spec.schedule == ADAPTIVE for _, spec in self.guide_entries())
        if guided and least is not None and self.data.batch_size < least:
            raise ConfigError(
                f"data.batch_size: {self.data.batch_size} is too small for guidance.similarity "
                f"{self.guidance.similarity!r}, which needs at least {least} examples; use a larger batch"
            )
        return self

    def _validate_guides(self) -> None:
        """The `[[guides]]` form: no `[guide]` beside it, its fields left to the entries, each entry named once."""
        if self.guide is not None:
            raise ConfigError("guides: give one [guide] (with [guidance]) or [[guides]] entries, not both")
        defaults = GuidanceSpec()
        for name in PULL_FIELDS:
            if getattr(self.guidance, name) != getattr(defaults, name):
                raise ConfigError(
                    f"guidance.{name}: with [[guides]], each guide sets its own {name}; move it into the guides entries"
                )
        labels: list[str] = []
        for i, spec in enumerate(self.guides or []):
            spec.validate(f"guides[{i}]")
            if spec.label in labels:
                raise ConfigError(
                    f"guides[{i}].name: {spec.label!r} already names guides[{labels.index(spec.label)}]; "
                    "give each guide its own name"
                )
            labels.append(spec.label)
        cache = self.guidance.cache
        if cache != "none" and len(labels) > 1:
            raise ConfigError(
                f"guidance.cache: {cache!r} keeps one guide's activations; use cache = 'none' with several [[guides]]"
            )
        if cache != "none" and self.guides[0].guide_input != "same":
            raise ConfigError(f"guides[0].guide_input: guidance.cache {cache!r} needs guide_input = 'same'")

    def guide_entries(self) -> list[tuple[str, GuideSpec]]:
        """Each guide with the config path of its model: the `[[guides]]` entries, or `[guide]` as one unnamed guide."""
        if self.guides:
            return [(f"guides[{i}].model", spec) for i, spec in enumerate(self.guides)]
        if self.guide is None:
            return []
        pull = {name: getattr(self.guidance, name) for name in PULL_FIELDS}
        return [("guide", GuideSpec(model=self.guide, name="", **pull))]

    def with_guides(self, guides: list[GuideSpec]) -> "RunConfig":
        """A copy guided by `guides` as `[[guides]]` entries: no `[guide]`, `[guidance]` keeping what guides share."""
        defaults = GuidanceSpec()
        shared = dataclasses.replace(self.guidance, **{name: getattr(defaults, name) for name in PULL_FIELDS})
        return self.replace(guide=None, guides=list(guides), guidance=shared)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with top-level sections replaced, validated again."""
        return dataclasses.replace(self, **changes)

    def with_section(self, section: str, **changes: Any) -> "RunConfig":
        """A copy with fields of one section changed: `config.with_section("train", epochs=5)`."""
        return self.replace(**{section: dataclasses.replace(getattr(self, section), **changes)})

    def with_args(self, section: str, **args: Any) -> "RunConfig":
        """A copy with keyword arguments of a model or data section added or changed."""
        spec = getattr(self, section)
        return self.with_section(section, args={**spec.args, **args})


def _check_type(where: str, value: Any, hint: Any) -> Any:
    """Coerce a parsed value to a field's type hint, or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(where, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_check_type(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of values, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from nested dicts; unknown keys name the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {', '.join(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or 'config'}: missing required key(s) {missing}")
    kwargs = {
        name: _check_type(f"{where}.{name}" if where else name, value, hints[name]) for name, value in data.items()
    }
    # Sections validate as part of RunConfig (in its __post_init__), where each field's path is known.
    return cls(**kwargs)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a RunConfig from a .toml or .json file, with optional dotted-key overrides."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix not in (".json", ".toml"):
        raise ConfigError(f"config file {path}: use a .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {err}; fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a table of sections (model, data, ...), got {type(data).__name__}"
        )
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}") from None


def shipped_config(name: str) -> RunConfig:
    """A config shipped with the package: `untrainable/configs/NAME.toml`."""
    from importlib import resources

    return load_config(resources.files("untrainable") / "configs" / f"{name}.toml")


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data['a']['b'] = value for key 'a.b', creating tables on the way."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part!r} is not a table")
    node[last] = value


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def config_differences(saved: dict[str, Any], config: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between a saved config.json and `config` (keys in `ignore` skipped).

    A key that the saved file lacks counts as its default: a field added
    since the run was made, left at its default, is no difference.
    """
    current = json.loads(json.dumps(config.to_dict()))

    def walk(a: Any, b: Any, path: str) -> list[str]:
        if path in ignore:
            return []
        if isinstance(a, dict) and isinstance(b, dict):
            found = []
            for key in sorted(set(a) | set(b)):
                where = f"{path}.{key}" if path else key
                # A field newer than the saved file: that run had its default.
                older = key not in a and key in b and _json_default(where) == b[key]
                found += [] if older else walk(a.get(key), b.get(key), where)
            return found
        return [] if a == b else [path]

    return walk(saved, current, "")


_NO_DEFAULT = object()


def _json_default(path: str) -> Any:
    """The default of a dotted RunConfig field (`guidance.gram_dtype`) as config.json holds it; a marker if none."""
    cls: Any = RunConfig
    default: Any = _NO_DEFAULT
    for name in path.split("."):
        if not dataclasses.is_dataclass(cls):
            return _NO_DEFAULT
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            return _NO_DEFAULT
        f = fields[name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = _NO_DEFAULT
        hint = typing.get_type_hints(cls)[name]
        cls = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
    if dataclasses.is_dataclass(default):
        default = dataclasses.asdict(default)
    return default if default is _NO_DEFAULT else json.loads(json.dumps(default))
