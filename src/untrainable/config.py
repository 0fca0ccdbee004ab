"""Typed, self-validating run configuration: its sections and what each field means (read by config_files)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from untrainable.adaptive_alpha import ADAPTIVE
from untrainable.config_files import (  # noqa: F401  (read, saved and compared there; imported from here)
    config_differences,
    from_dict,
    read_table,
    save_config,
    set_dotted,
)
from untrainable.errors import ConfigError
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
    """A registered model (`untrainable list`) or an import path `package.module:callable`."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the model; registered models also get `input_shape` and `num_classes` from the data."""
    checkpoint: str | None = None
    """Weights to load, a `.pt` state_dict (read with `weights_only=True`) or `.safetensors`, e.g. a run's `model.pt`."""
    seed: int | None = None
    """Initialisation seed; default: the run's seed."""

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
    """A registered data set (`untrainable list`), e.g. `mnist1d`, `fashion_mnist`, `image_folder`, `text_file`."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the data set, e.g. `{ root = "PATH", image_size = 224 }` for `image_folder`."""
    batch_size: int = 128
    """Training examples per step, per process under torchrun."""
    eval_batch_size: int = 512
    """Examples per batch when evaluating."""
    num_workers: int = 0
    """DataLoader worker processes; 0 loads in the training process."""
    train_eval_size: int = 2000
    """Training examples evaluated each epoch for the train curve."""

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
    """Weight of the guidance loss; the starting value under `schedule = "adaptive"`; 0 turns guidance off."""
    schedule: str = "constant"
    """How alpha moves: `constant`, `first_steps` (then 0), `linear` or `cosine` decay, or `adaptive`."""
    steps: int | None = None
    """Steps of the `first_steps`, `linear` and `cosine` schedules."""
    adapt_every: int = 10
    """Adaptive alpha: steps between measurements."""
    adapt_ratio: float = 1.0
    """Adaptive alpha: the guidance gradient's norm as a multiple of the task gradient's."""
    adapt_momentum: float = 0.5
    """Adaptive alpha: smoothing of the measurements, in [0, 1)."""
    alpha_max: float = 100.0
    """Adaptive alpha: its upper bound, at least `alpha`."""
    similarity: str = "cka"
    """Similarity measure: `cka` (the paper's), `cka_unbiased`, `rsa`, `procrustes`, `cca`, `svcca` or `cka_rbf` (`untrainable list`)."""
    target_layers: list[str] | None = None
    """Target layers by path, glob or type; default: every Linear, Conv, RNN and attention output but the last."""
    guide_layers: list[str] | None = None
    """Guide layers by path, glob or type; default: as for the target."""
    pairs: list[list[Any]] | None = None
    """Explicit pairs `[[target, guide], [target, guide, weight], ...]`; default: the paper's even spread."""
    guide_input: str = "same"
    """What the guide sees: `same` (the batch) or `noise` (Gaussian noise of the batch's shape)."""
    sequence_mode: str = "flatten"
    """How `(batch, time, features)` activations are compared: `flatten`, `tokenwise` or `tokens`."""
    scope: str = "global"
    """Under torchrun: CKA on the `global` batch (gathered over processes) or per process (`local`)."""
    cache: str = "none"
    """Keep the guide's activations per example: `none`, `memory` or `disk` (only without random augmentation)."""
    log_every: int = 10
    """Steps between per-pair similarity records in metrics.jsonl."""
    gram_dtype: str = "float32"
    """Dtype of CKA's sample-space Gram products: `float32` or `bfloat16`."""

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
    """The guide model, a `[guides.model]` table with the fields of `[model]`."""
    name: str | None = None
    """Prefixes its similarity keys, `name:target<-guide`; default: the model's name."""
    alpha: float = 1.0
    """Weight of this guide's loss; the starting value under `schedule = "adaptive"`."""
    schedule: str = "constant"
    """How its alpha moves: `constant`, `first_steps`, `linear`, `cosine` or `adaptive`, as in `[guidance]`."""
    steps: int | None = None
    """Steps of the `first_steps`, `linear` and `cosine` schedules."""
    adapt_every: int = 10
    """Adaptive alpha: steps between this guide's measurements."""
    adapt_ratio: float = 1.0
    """Adaptive alpha: this guide's gradient norm as a multiple of the task gradient's."""
    adapt_momentum: float = 0.5
    """Adaptive alpha: smoothing of the measurements, in [0, 1)."""
    alpha_max: float = 100.0
    """Adaptive alpha: its upper bound, at least `alpha`."""
    target_layers: list[str] | None = None
    """Target layers this guide pulls on, by path, glob or type; default: the library's."""
    guide_layers: list[str] | None = None
    """This guide's layers, by path, glob or type; default: the library's."""
    pairs: list[list[Any]] | None = None
    """Explicit pairs `[[target, guide], [target, guide, weight], ...]`; default: the even spread."""
    guide_input: str = "same"
    """What this guide sees: `same` (the batch) or `noise`."""

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
    """Optimiser: `adam`, `adamw` or `sgd`."""
    lr: float = 1e-3
    """Learning rate (after warm-up, before decay)."""
    weight_decay: float = 0.0
    """Weight decay."""
    momentum: float = 0.9
    """Momentum, for `sgd` only."""
    lr_schedule: str = "constant"
    """Learning-rate decay after warm-up: `constant`, `cosine`, or `step` (x0.1 at 50% and 75% of the steps)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to `lr`."""
    grad_clip: float | None = None
    """Clip the gradients' global norm to this value; none by default."""
    fused: bool = False
    """One fused kernel for the Adam/AdamW update (same maths, faster on large models)."""

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
    """Weight of the distillation loss; 0 turns it off."""
    temperature: float = 4.0
    """Softmax temperature of the teacher's and the target's logits."""

    def validate(self, where: str) -> None:
        _positive(f"{where}.weight", self.weight, allow_zero=True)
        _positive(f"{where}.temperature", self.temperature)


@dataclass
class TrainSpec:
    """The loop: length, task, seed, device, precision, checkpoints."""

    epochs: int = 10
    """Passes over the training set."""
    seed: int = 0
    """Seed of the data order, the initialisation and everything random in the run."""
    task: str = "classification"
    """Loss and metrics: `classification`, `tokens` (a label per position) or `lm` (next character)."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda` or `cuda:N`."""
    precision: str = "fp32"
    """`fp32`, `bf16` (CPU or GPU) or `fp16` (GPU, with a gradient scaler); the similarity is always float32."""
    deterministic: bool = True
    """Ask torch for deterministic kernels."""
    max_steps: int | None = None
    """Stop after this many steps, within the epochs; may change on `--resume`."""
    checkpoint_every: int = 0
    """Steps between checkpoints within an epoch; 0: at each epoch's end only."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run folder, newest first."""
    progress: bool = True
    """Show a progress bar (or a line per epoch and per minute when stderr is not a terminal)."""
    grad_norm_steps: list[int] = field(default_factory=list)
    """Steps (from 1) at which per-layer gradient norms are logged."""
    early_stopping: bool = False
    """Keep the weights of the best validation epoch (accuracy, else loss) and test them too (result.json `best`)."""
    timeout_s: float = 300.0
    """Under torchrun: seconds a process waits for the others in a collective before it stops with an error."""

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


LOGGERS = ("jsonl", "tensorboard", "mlflow", "wandb")
WANDB_MODES = ("offline", "online")


@dataclass
class LoggingSpec:
    """Where metrics go besides metrics.jsonl (always written): TensorBoard, MLflow, Weights & Biases.

    `run` and `tune` fill `mlflow_uri`, `experiment`, `group` and `parent_run`
    for their runs (the study's store, name and parent run); `train` leaves them.
    """

    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Trackers: `tensorboard`, `mlflow`, `wandb` (`jsonl` is always on); only rank 0 logs."""
    mlflow_uri: str | None = None
    """MLflow tracking URI; default `sqlite:///` + `mlflow.db` in the run folder (`train`) or the study folder."""
    experiment: str | None = None
    """The MLflow experiment and W&B project; default the study's name, else the config's `name`."""
    wandb_mode: str = "offline"
    """`offline` (synced later with `wandb sync`) or `online`."""
    tags: dict[str, str] = field(default_factory=dict)
    """Tags of every tracker run, e.g. `{ lab = "vision" }`."""
    group: str | None = None
    """The study a run belongs to (its W&B group); set by `run` and `tune`."""
    parent_run: str | None = None
    """The MLflow run id of the study's parent run; set by `run` and `tune`."""

    def validate(self, where: str) -> None:
        for i, name in enumerate(self.loggers):
            _choice(f"{where}.loggers[{i}]", name, LOGGERS)
        _choice(f"{where}.wandb_mode", self.wandb_mode, WANDB_MODES)
        for key, value in self.tags.items():
            if not isinstance(value, str):
                raise ConfigError(f"{where}.tags.{key}: expected a string, got {value!r}")
        if self.experiment is not None and not self.experiment.strip():
            raise ConfigError(f"{where}.experiment: empty; give a name or leave it out for the default")

    @property
    def trackers(self) -> list[str]:
        """The loggers beside metrics.jsonl, each once, in the order given."""
        return list(dict.fromkeys(name for name in self.loggers if name != "jsonl"))


@dataclass
class RunConfig:
    """One training run: a target model on a data set, optionally guided.

    One guide is a `[guide]` model with its `[guidance]` section; several are
    `[[guides]]` entries (GuideSpec), each with its own model and PULL_FIELDS,
    the rest of `[guidance]` shared.
    """

    model: ModelSpec
    """The target, the network being trained."""
    data: DataSpec
    """The data set and its batches."""
    guide: ModelSpec | None = None
    """The single frozen guide (and the distillation teacher); none: the target trains alone."""
    guidance: GuidanceSpec = field(default_factory=GuidanceSpec)
    """How the guide pulls on the target; with `[[guides]]`, what all guides share."""
    # None rather than []: a run folder saved before this field existed still compares equal.
    guides: list[GuideSpec] | None = None
    """Several guides, `[[guides]]` entries, instead of `[guide]`."""
    optim: OptimSpec = field(default_factory=OptimSpec)
    """The optimiser and its learning-rate schedule."""
    distill: DistillSpec = field(default_factory=DistillSpec)
    """Knowledge distillation from the `[guide]`'s logits."""
    train: TrainSpec = field(default_factory=TrainSpec)
    """The training loop."""
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    """Where metrics go besides metrics.jsonl: TensorBoard, MLflow, W&B."""
    name: str = "run"
    """The run's name, its folder under `runs/` unless `--out` is given."""

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
        self.logging.validate("logging")
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


def load_config(
    path: str | Path, overrides: dict[str, Any] | None = None, overrides_label: str = "override"
) -> RunConfig:
    """Read a RunConfig from a .toml or .json file, with dotted-key overrides (an error in one names it: `--set KEY`)."""
    data = read_table(path, overrides, overrides_label)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as err:
        field = str(err).split(":", 1)[0].split(" ", 1)[0].split("[", 1)[0]  # a list's item: the list's key
        for key, value in (overrides or {}).items():
            if field == key or field.startswith(key + ".") or key.startswith(field + "."):
                raise ConfigError(f"{overrides_label} {key}={json.dumps(value)}: {err}") from None
        raise ConfigError(f"config file {path}: {err}") from None


def shipped_config(name: str) -> RunConfig:
    """A config shipped with the package: `untrainable/configs/NAME.toml`."""
    from importlib import resources

    return load_config(resources.files("untrainable") / "configs" / f"{name}.toml")
