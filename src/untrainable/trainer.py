"""A small, task-agnostic training loop for guided and unguided runs."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from untrainable import distributed
from untrainable.build import (
    build_data,
    build_guidance,
    build_guides,
    build_lr_schedule,
    build_model,
    build_optimizer,
    pick_device,
)
from untrainable.checkpoint import CheckpointManager, save_checkpoint, save_safetensors, write_atomic
from untrainable.config import ConfigError, RunConfig
from untrainable.data import DataSplits
from untrainable.distillation import Distillation
from untrainable.guide_cache import GuideCache, IndexedDataset
from untrainable.logs import MetricsLog, ProgressLines
from untrainable.runs import (
    check_folder,
    check_resumed_config,
    rng_state,
    seed_everything,
    set_rng_state,
    start_again,
    write_run_files,
    writer_lock,
)
from untrainable.step import NonFiniteError, StepParts, autocast, train_step
from untrainable.tasks import add_sums, get_task

__all__ = ["NonFiniteError", "RunResult", "TrainingInterrupted", "evaluate", "train"]


@dataclass
class RunResult:
    """What a finished run reports: per-epoch history and final metrics."""

    folder: Path
    history: list[dict[str, float]]
    final: dict[str, Any]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    config: RunConfig,
    device: torch.device,
    keep_predictions: bool = False,
    dist_info: distributed.DistInfo | None = None,
    prepare: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """Task metrics of `model` on `dataset` (inputs through `prepare`) in eval mode; optionally the argmax predictions.

    With `dist_info` of several processes, each rank evaluates every
    world_size-th example and the sums are added over ranks, so every rank
    returns the metrics of the whole set (the model's buffers must agree
    across ranks: see `distributed.broadcast_buffers`).
    """
    task = get_task(config.train.task)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    predictions = []
    sharded = dist_info is not None and dist_info.world_size > 1
    full_size = len(dataset)  # type: ignore[arg-type]
    if sharded:
        dataset = Subset(dataset, distributed.shard_indices(full_size, dist_info))
    # Its own generator: iterating a loader must not draw from the global RNG
    # the training steps use (a resumed run would otherwise diverge).
    loader = DataLoader(dataset, batch_size=config.data.eval_batch_size, shuffle=False, generator=torch.Generator())
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        x = prepare(x) if prepare is not None else x
        with autocast(device, config.train.precision):
            output = model(x)
        add_sums(sums, task.sums(output, y))
        if keep_predictions:
            predictions.append(output.argmax(-1).cpu())
    model.train(was_training)
    if sharded:
        sums = distributed.all_reduce_sums(sums, dist_info)
    metrics: dict[str, Any] = task.metrics(sums)
    if keep_predictions:
        mine = torch.cat(predictions).numpy() if predictions else np.zeros((0,), dtype=np.int64)
        if sharded:
            parts = distributed.gather_objects(mine, dist_info)
            merged = np.empty((full_size, *mine.shape[1:]), dtype=mine.dtype)
            for rank, part in enumerate(parts):
                merged[rank :: dist_info.world_size] = part
            mine = merged
        metrics["predictions"] = mine
    return metrics


@dataclass
class _Run:
    """A run in progress: its parts, where it is, and where it writes."""

    config: RunConfig
    folder: Path
    data: DataSplits
    parts: StepParts
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    loader: DataLoader
    sampler: DistributedSampler
    total_steps: int
    checkpoints: CheckpointManager
    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # in the current epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_requested: bool = False
    resumed_from: str | None = None  # the checkpoint's file name
    stop_signal: int = signal.SIGINT
    # Early stopping: the best validation epoch so far, {"epoch", "step", "score", "val", "model"} (weights on the CPU).
    best: dict[str, Any] | None = None
    started: float = field(default_factory=time.time)  # when this process started training
    earlier_seconds: float = 0.0  # training time of the sessions before a resume

    def seconds(self) -> float:
        """Training time so far, over every session of the run."""
        return self.earlier_seconds + time.time() - self.started

    @property
    def is_main(self) -> bool:
        return self.parts.dist_info.rank == 0

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds, bar the RNG states."""
        p = self.parts
        return {
            "model": p.target.state_dict(),
            "optimizer": p.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": p.scaler.state_dict(),
            "guidance": p.guidance.get_extra_state() if p.guidance is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batches_done,
            "history": self.history,
            "best": self.best,
            "seconds": self.seconds(),
            "config": self.config.to_dict(),  # compared on resume when config.json is gone
        }

    def checkpoint(self) -> None:
        rng = distributed.gather_objects(rng_state(), self.parts.dist_info)
        if self.is_main:
            self.checkpoints.save({**self.state(), "rng": rng}, self.step)
        distributed.barrier(self.parts.dist_info)

    def restore(self, state: dict[str, Any]) -> None:
        p = self.parts
        p.target.load_state_dict(state["model"])
        p.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        p.scaler.load_state_dict(state["scaler"])
        if p.guidance is not None:
            p.guidance.set_extra_state(state["guidance"])
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batch"]
        self.history = state["history"]
        self.best = state.get("best")
        self.earlier_seconds = state.get("seconds", 0.0)
        rng = state["rng"]
        if isinstance(rng, list):  # one state per rank of the run that saved it
            rng = rng[p.dist_info.rank] if len(rng) == p.dist_info.world_size else rng[0]
        set_rng_state(rng)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGUSR2 stopped the run after a checkpoint of its last finished step; `signum` says which."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


def _build_parts(
    config: RunConfig,
    folder: Path,
    resume: bool,
    data: DataSplits,
    dist_info: distributed.DistInfo,
    device: torch.device,
) -> tuple[StepParts, Dataset]:
    """The models, losses and optimiser of a run, and the training set the loader reads."""
    target = build_model(config.model, data, config.train.seed).to(device)
    guides = [guide.to(device) for guide in build_guides(config, data)]
    model: nn.Module = distributed.wrap(target, dist_info)  # guides are never wrapped
    guidance = build_guidance(config, model, guides) if guides else None
    # The teacher is the `[guide]` model (the config refuses distillation with [[guides]]).
    distillation = (
        Distillation(guides[0], config.distill.weight, config.distill.temperature)
        if config.distill.weight > 0
        else None
    )
    guide_cache = None
    train_set: Dataset = data.train
    if guidance is not None and config.guidance.cache != "none":
        if data.train_transform is not None:
            raise ValueError(
                f"guidance.cache = {config.guidance.cache!r} needs training data without random augmentation, "
                f"but data set {config.data.name!r} has a train_transform; use guidance.cache = 'none'"
            )
        # The guide sees the batch without augmentation, so an example's
        # activations never change: compute them once, reuse every epoch.
        train_set = IndexedDataset(data.train)
        cache_folder = folder / "guide_cache" / f"rank{dist_info.rank}"
        if not resume and cache_folder.exists():
            shutil.rmtree(cache_folder)  # another run's guide may have written it
        guide_cache = GuideCache(len(data.train), config.guidance.cache, cache_folder)
    parts = StepParts(
        model=model,
        target=target,
        optimizer=build_optimizer(config, target.parameters()),
        task=get_task(config.train.task),
        device=device,
        dist_info=dist_info,
        scaler=torch.amp.GradScaler("cuda", enabled=config.train.precision == "fp16"),
        guidance=guidance,
        distillation=distillation,
        guide_cache=guide_cache,
        train_transform=data.train_transform,
        prepare=data.prepare,
        precision=config.train.precision,
        grad_clip=config.optim.grad_clip,
        pad_id=data.meta.get("pad_id"),
    )
    return parts, train_set


def _set_up(
    config: RunConfig, folder: Path, resume: bool, data: DataSplits | None, accept_config: bool = False
) -> tuple[_Run, dict[str, Any]]:
    """Build a run, restore it from its newest good checkpoint when resuming, and refuse what must not start.

    The checkpoint is read, and the config compared with its copy when
    config.json is gone, before the data and models are built. Returns the
    run and what the run's records say of an accepted config (`--accept-config`).
    """
    dist_info = distributed.setup(config.train.device, config.train.timeout_s)
    device = dist_info.device if dist_info.world_size > 1 else pick_device(config.train.device)
    if config.train.precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision 'fp16' needs a CUDA device; use 'bf16' on CPU")
    checkpoints = CheckpointManager(folder / "checkpoints", keep=config.train.keep_checkpoints)
    loaded = checkpoints.load_latest_on_every_rank(dist_info, device) if resume else None
    record = check_resumed_config(folder, config, loaded, accept_config) if resume else {}
    seed_everything(config.train.seed + dist_info.rank, config.train.deterministic)
    data = data if data is not None else build_data(config.data)
    parts, train_set = _build_parts(config, folder, resume, data, dist_info, device)
    # The sampler shards the training set over ranks (one shard in a single
    # process); data.batch_size is per process.
    sampler = DistributedSampler(
        train_set,
        num_replicas=dist_info.world_size,
        rank=dist_info.rank,
        shuffle=True,
        seed=config.train.seed,
        drop_last=True,
    )
    # A generator of its own: starting an epoch's iterator must not draw from
    # the global RNG, or a run resumed in the middle of an epoch would see
    # different dropout masks than the uninterrupted run.
    loader = DataLoader(
        train_set,
        batch_size=config.data.batch_size,
        sampler=sampler,
        num_workers=config.data.num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    if len(loader) == 0:
        raise ValueError(
            f"data.batch_size {config.data.batch_size} is larger than the training shard ({len(sampler)} examples)"
        )
    total_steps = config.train.epochs * len(loader)
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)
    lr_schedule = build_lr_schedule(config, parts.optimizer, total_steps)
    run = _Run(config, folder, data, parts, lr_schedule, loader, sampler, total_steps, checkpoints)
    if run.is_main:
        written = ("config.json", "meta.json", "history.json", "result.json")  # written atomically too
        checkpoints.remove_leftovers(
            *(folder / f"{stem}.{ext}" for stem in ("model", "model_best") for ext in ("pt", "safetensors")),
            *(folder / name for name in written),
        )
    if loaded is not None:
        run.restore(loaded[0])
        run.resumed_from = loaded[1].name
    return run, record


def _train_epoch(run: _Run, logger: MetricsLog, lines: ProgressLines) -> dict[str, Any]:
    """Steps of the current epoch from `run.batches_done` on, until its end, `total_steps` or a stop request.

    Returns the last step's record (empty when no step ran).
    """
    config, parts = run.config, run.parts
    record: dict[str, Any] = {}
    run.sampler.set_epoch(run.epoch)
    bar = tqdm(
        itertools.islice(iter(run.loader), run.batches_done, None),
        total=len(run.loader) - run.batches_done,
        desc=f"{config.name} epoch {run.epoch + 1}/{config.train.epochs}",
        disable=None if (config.train.progress and run.is_main) else True,
        leave=False,
    )
    for batch in bar:
        record, similarities = train_step(
            parts, batch, run.step + 1, log_grad_norms=run.step + 1 in config.train.grad_norm_steps
        )
        run.lr_schedule.step()
        run.step += 1
        run.batches_done += 1
        record = {"step": run.step, "epoch": run.epoch, **record}
        if similarities and (run.step % config.guidance.log_every == 0 or run.step == 1):
            record.update({f"similarity/{k}": float(v) for k, v in similarities.items()})
        logger.log(record)
        lines.step(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", guide=f"{record['guidance_loss']:.3f}")
        if run.step >= run.total_steps or _stop_requested(run):
            break
        if config.train.checkpoint_every and run.step % config.train.checkpoint_every == 0:
            run.checkpoint()
    bar.close()
    return record


def _stop_requested(run: _Run) -> bool:
    """Whether any process was asked to stop (Ctrl-C, SIGTERM): all of them then stop at the same step."""
    info = run.parts.dist_info
    if info.world_size == 1:
        return run.stop_requested
    flag = torch.tensor([int(run.stop_requested)], device=info.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _end_epoch(run: _Run, logger: MetricsLog) -> dict[str, Any]:
    """Evaluate on train and validation examples, record the epoch (its history entry, returned), checkpoint.

    An epoch cut short by `max_steps` and continued on resume keeps one entry:
    the one at its end replaces the one at the cut.
    """
    config, parts = run.config, run.parts
    distributed.broadcast_buffers(parts.target, parts.dist_info)
    rng_eval = torch.Generator().manual_seed(config.train.seed)
    train_eval_idx = torch.randperm(len(run.data.train), generator=rng_eval)[: config.data.train_eval_size].tolist()
    train_eval = Subset(run.data.train, train_eval_idx)
    prepare = run.data.prepare
    train_metrics = (
        evaluate(parts.target, train_eval, config, parts.device, dist_info=parts.dist_info, prepare=prepare)
        if len(train_eval)
        else {}
    )
    val_metrics = evaluate(parts.target, run.data.val, config, parts.device, dist_info=parts.dist_info, prepare=prepare)
    entry = {"epoch": run.epoch + 1, "step": run.step, "seconds": run.seconds()}
    entry.update({f"train_{k}": v for k, v in train_metrics.items()})
    entry.update({f"val_{k}": v for k, v in val_metrics.items()})
    if run.history and run.history[-1]["epoch"] == entry["epoch"]:
        run.history.pop()
    run.history.append(entry)
    if config.train.early_stopping:
        _keep_best(run, val_metrics)
    logger.log({"kind": "epoch", **entry}, prefix="epoch")
    if run.is_main:
        write_atomic(run.folder / "history.json", json.dumps(run.history, indent=1) + "\n")
    if run.batches_done >= len(run.loader):
        run.epoch, run.batches_done = run.epoch + 1, 0
    run.checkpoint()  # else stopped by max_steps inside the epoch
    return entry


def _score(metrics: dict[str, float]) -> float:
    """Higher is better: validation accuracy, else minus the validation loss."""
    return metrics["accuracy"] if "accuracy" in metrics else -metrics["loss"]


def _keep_best(run: _Run, val_metrics: dict[str, float]) -> None:
    """Keep the target's weights when this epoch's validation score beats every earlier one (first wins ties)."""
    score = _score(val_metrics)
    if run.best is None or score > run.best["score"]:
        weights = {k: v.detach().to("cpu", copy=True) for k, v in run.parts.target.state_dict().items()}
        run.best = {"epoch": run.epoch + 1, "step": run.step, "score": score, "val": val_metrics, "model": weights}


@contextlib.contextmanager
def _stop_on_signals(run: _Run) -> Iterator[None]:
    """Turn Ctrl-C, SIGTERM and SIGUSR2 into a request to stop after the current step; a second Ctrl-C stops at once.

    SIGUSR2 is what a SLURM job receives before its time limit (`slurm.signal_delay_s`).
    """

    def request(signum: int, frame: Any) -> None:
        if run.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        run.stop_requested, run.stop_signal = True, signum

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGUSR2,) if hasattr(signal, "SIGUSR2") else ())
    previous = {sig: signal.signal(sig, request) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(
    config: RunConfig,
    folder: str | Path,
    resume: bool = False,
    data: DataSplits | None = None,
    *,
    accept_config: bool = False,
    locked: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train `config.model` on `config.data`, guided when the config names a `[guide]` or `[[guides]]`.

    Writes into `folder`: config.json, meta.json, metrics.jsonl (a record per
    step), what `config.logging`'s trackers write (tensorboard/ by default), checkpoints/ (atomic, the last
    `train.keep_checkpoints`), history.json (per epoch), model.pt and
    model.safetensors (final weights, usable as a guide checkpoint) and result.json.

    One process writes a folder at a time (an OS lock, `runs.writer_lock`);
    a folder that must not be written is refused before data and models are
    built. Under torchrun, each process trains on its shard; only rank 0
    writes. Ctrl-C or SIGTERM stops the run after a checkpoint of its last
    step (raising TrainingInterrupted); `resume=True` continues from there.
    A resume refuses a config other than the run's (beyond `runs.RESUMABLE`),
    or one it cannot check, unless `accept_config`: meta.json then records
    the changes. `locked`: the caller already holds the folder's writer lock.
    A run that stopped before its first checkpoint (bad data, a crash, a
    kill) is trained again from step 0 by the same call, its step log kept
    as `metrics.attemptN.jsonl`, with a warning.

    `on_epoch(entry)` is called after each epoch's evaluation and checkpoint
    with its history entry (`epoch`, `step`, `val_<metric>`, ...): how a tuner
    reports the validation curve. An exception it raises (a pruned trial)
    stops the run there, its logs and that epoch's checkpoint kept.
    """
    folder = Path(folder)
    if accept_config and not resume:
        raise ConfigError("--accept-config lets a resumed run change its config: it needs --resume")
    if resume and not folder.is_dir():
        check_folder(folder, config, resume)  # refuses: nothing to resume, and nothing to lock
    with writer_lock(folder, hold=not locked and os.environ.get("RANK", "0") == "0"):
        changes = check_folder(folder, config, resume, accept_config)
        if not resume and os.environ.get("RANK", "0") == "0":
            start_again(folder)
        return _train_locked(
            config, folder, resume, data, accept_config, {"config_changes": changes} if changes else {}, on_epoch
        )


def _train_locked(
    config: RunConfig,
    folder: Path,
    resume: bool,
    data: DataSplits | None,
    accept_config: bool,
    record: dict[str, Any],
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    run, checked = _set_up(config, folder, resume, data, accept_config)
    if run.is_main:
        write_run_files(folder, config, run.resumed_from, record | checked)
    logger = MetricsLog(folder, run.is_main, run.step if run.resumed_from else None, config)
    if run.resumed_from:
        logger.log({"kind": "resume", "step": run.step, "checkpoint": run.resumed_from}, prefix="resume")
    # Lines for a log file where no progress bar shows (tqdm draws on stderr only when it is a terminal).
    lines = ProgressLines(
        config.name, run.total_steps, config.train.progress and run.is_main and not sys.stderr.isatty(), run.step
    )
    run.started = time.time()
    run.parts.model.train()
    if run.parts.guidance is not None:
        run.parts.guidance.train()
    with _stop_on_signals(run):
        while run.epoch < config.train.epochs and run.step < run.total_steps:
            record = _train_epoch(run, logger, lines)
            if _stop_requested(run):
                run.checkpoint()
                logger.close()
                raise TrainingInterrupted(
                    f"stopped at step {run.step}; checkpoint written to {run.checkpoints.folder}; continue with --resume",
                    run.stop_signal,
                )
            entry = _end_epoch(run, logger)
            if record:
                lines.epoch(record, entry, config.train.epochs)
            if on_epoch is not None:
                try:
                    on_epoch(dict(entry))
                except BaseException:
                    logger.close()
                    if run.parts.guidance is not None:
                        run.parts.guidance.remove_hooks()
                    raise
    return _finish(run, logger, run.seconds())


def _evaluate_best(run: _Run, last: dict[str, Any]) -> dict[str, Any]:
    """Early stopping: the test metrics with the best validation epoch's weights (`last` where they are the final ones)."""
    config, parts, best = run.config, run.parts, run.best
    if best["step"] == run.step and parts.dist_info.world_size == 1:
        test = dict(last)  # the weights just tested
    else:
        parts.target.load_state_dict(best["model"])
        prepare = run.data.prepare
        test = evaluate(parts.target, run.data.test, config, parts.device, dist_info=parts.dist_info, prepare=prepare)
    if run.is_main:
        _save_model(best["model"], config, run.folder / "model_best.pt")
    val = best.get("val")
    if val is None:  # a checkpoint written before the best epoch kept its own metrics
        entry = next(e for e in run.history if e["epoch"] == best["epoch"] and e["step"] == best["step"])
        val = {k[len("val_") :]: v for k, v in entry.items() if k.startswith("val_")}
    return {"epoch": best["epoch"], "step": best["step"], "val": val, "test": test}


def _save_model(weights: dict[str, Any], config: RunConfig, path: Path) -> None:
    """Final weights as `path` (a checkpoint with the config) and beside it as `.safetensors`, for sharing."""
    save_checkpoint({"model": weights, "config": config.to_dict()}, path)
    save_safetensors(weights, path.with_suffix(".safetensors"), config.to_dict())


def _finish(run: _Run, logger: MetricsLog, seconds: float) -> RunResult:
    """Final evaluation on the test set(s); writes model.pt, predictions and result.json."""
    config, parts, data = run.config, run.parts, run.data
    if parts.guide_cache is not None and run.is_main:
        cache = parts.guide_cache
        logger.log(
            {
                "kind": "guide_cache",
                "step": run.step,
                "hits": cache.hits,
                "misses": cache.misses,
                "bytes": cache.nbytes(),
            },
            prefix="guide_cache",
        )
    distributed.broadcast_buffers(parts.target, parts.dist_info)
    classification = config.train.task == "classification"
    test = evaluate(
        parts.target, data.test, config, parts.device, classification, dist_info=parts.dist_info, prepare=data.prepare
    )
    predictions = test.pop("predictions", None)
    final: dict[str, Any] = {"steps": run.step, "seconds": seconds, "test": test}
    final["extra_test"] = {
        name: evaluate(parts.target, ds, config, parts.device, dist_info=parts.dist_info, prepare=data.prepare)
        for name, ds in data.extra_test.items()
    }
    if run.history:
        last = run.history[-1]
        final["train"] = {k[len("train_") :]: v for k, v in last.items() if k.startswith("train_")}
        final["val"] = {k[len("val_") :]: v for k, v in last.items() if k.startswith("val_")}
        metric = "accuracy" if "accuracy" in test else "loss"
        if metric in final["train"]:
            final["gap"] = final["train"][metric] - test[metric]
    if run.is_main:
        _save_model(parts.target.state_dict(), config, run.folder / "model.pt")
        if predictions is not None:
            np.save(run.folder / "test_predictions.npy", predictions)
    if run.best is not None:
        final["best"] = _evaluate_best(run, test)
    if run.is_main:
        write_atomic(run.folder / "result.json", json.dumps(final, indent=2) + "\n")
    logger.close(final)  # the trackers get result.json's numbers
    if parts.guidance is not None:
        parts.guidance.remove_hooks()
    distributed.barrier(parts.dist_info)
    return RunResult(run.folder, run.history, final)
