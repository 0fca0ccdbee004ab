"""A small, task-agnostic training loop for guided and unguided runs."""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from untrainable import distributed
from untrainable.build import build_data, build_guidance, build_lr_schedule, build_model, build_optimizer, pick_device
from untrainable.checkpoint import CheckpointError, CheckpointManager, save_checkpoint
from untrainable.config import RunConfig, config_differences
from untrainable.data import DataSplits
from untrainable.distillation import Distillation
from untrainable.guide_cache import GuideCache, IndexedDataset
from untrainable.runs import seed_everything, write_run_files
from untrainable.tasks import add_sums, get_task, padding_mask


class NonFiniteError(FloatingPointError):
    """A NaN or inf in the inputs or a loss term; the message names the step and the term."""


@dataclass
class RunResult:
    """What a finished run reports: per-epoch history and final metrics."""

    folder: Path
    history: list[dict[str, float]]
    final: dict[str, Any]


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_finite(step: int, info: distributed.DistInfo, **terms: Tensor) -> None:
    """Raise NonFiniteError naming the step and the first term with a NaN or inf.

    `step` is numbered as in metrics.jsonl (the first step is 1). Under DDP
    every rank learns that some rank failed, so none waits forever in the
    next collective; the message says which rank saw it first.
    """
    flags = [torch.is_floating_point(v) and not bool(torch.isfinite(v).all()) for v in terms.values()]
    # On the process group's device: nccl reduces CUDA tensors only.
    bad = torch.tensor(flags, dtype=torch.int32, device=info.device)
    local = flags
    if info.world_size > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    for i, (name, value) in enumerate(terms.items()):
        if bad[i].item():
            where = f" (rank {info.rank})" if info.world_size > 1 else ""
            shown = value.detach().float().flatten()
            shown = shown[~torch.isfinite(shown)][:4].tolist() if local[i] else "on another rank"
            raise NonFiniteError(f"step {step}: {name} is not finite{where}: {shown}; the run stops, its checkpoints are kept")


def _grad_norm(parameters: list[nn.Parameter]) -> Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


def _layer_grad_norms(model: nn.Module) -> dict[str, float]:
    """`grad_norm/NAME` for every weight matrix or kernel (dim >= 2) of the model, before the update."""
    return {
        f"grad_norm/{name}": float(torch.linalg.vector_norm(p.grad.detach().float()))
        for name, p in model.named_parameters()
        if p.grad is not None and p.dim() >= 2
    }


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    config: RunConfig,
    device: torch.device,
    pad_id: int | None = None,
    keep_predictions: bool = False,
    dist_info: distributed.DistInfo | None = None,
) -> dict[str, Any]:
    """Task metrics of `model` on `dataset` in eval mode; optionally the argmax predictions.

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
        with _autocast(device, config.train.precision):
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


class _Logger:
    """Rank-0 sinks for step records: JSONL and TensorBoard."""

    def __init__(self, folder: Path, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = folder / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop records written after the checkpoint we resume from: those steps run again.
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        self.file = open(self.path, "a")

    def log(self, record: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = int(record["step"])
        for key, value in record.items():
            if key not in ("step", "epoch", "kind") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.writer.close()


def train(config: RunConfig, folder: str | Path, resume: bool = False, data: DataSplits | None = None) -> RunResult:
    """Train `config.model` on `config.data`, guided when `config.guide` is set.

    Writes into `folder`: config.json, meta.json, metrics.jsonl (a record per
    step), tensorboard/ events, checkpoints/ (atomic, the last
    `train.keep_checkpoints`), history.json (per epoch), model.pt (final
    weights, usable as a guide checkpoint) and result.json.

    Under torchrun, each process trains on its shard; only rank 0 writes.
    """
    folder = Path(folder)
    dist_info = distributed.setup(config.train.device)
    device = dist_info.device if dist_info.world_size > 1 else pick_device(config.train.device)
    if config.train.precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision 'fp16' needs a CUDA device; use 'bf16' on CPU")
    is_main = dist_info.rank == 0
    seed_everything(config.train.seed + dist_info.rank, config.train.deterministic)
    data = data if data is not None else build_data(config.data)
    task = get_task(config.train.task)
    pad_id = data.meta.get("pad_id")

    target = build_model(config.model, data, config.train.seed).to(device)
    guide = build_model(config.guide, data, config.train.seed, where="guide").to(device) if config.guide else None
    model: nn.Module = distributed.wrap(target, dist_info)  # the guide is never wrapped
    # alpha 0 under a constant schedule: the guide serves only as a distillation teacher.
    guided = guide is not None and not (config.guidance.alpha == 0 and config.guidance.schedule == "constant")
    guidance = build_guidance(config, model, guide) if guided else None
    distillation = Distillation(guide, config.distill.weight, config.distill.temperature) if config.distill.weight > 0 else None
    optimizer = build_optimizer(config, target.parameters())

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

    # The sampler shards the training set over ranks (one shard in a single
    # process); data.batch_size is per process.
    sampler = DistributedSampler(train_set, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=config.train.seed, drop_last=True)
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
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"data.batch_size {config.data.batch_size} is larger than the training shard ({len(sampler)} examples)")
    total_steps = config.train.epochs * steps_per_epoch
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)
    lr_schedule = build_lr_schedule(config, optimizer, total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=config.train.precision == "fp16")

    checkpoints = CheckpointManager(folder / "checkpoints", keep=config.train.keep_checkpoints)
    step, start_epoch, skip_batches, history = 0, 0, 0, []
    loaded = None
    if resume:
        # Rank 0 first: it sets aside corrupted files, then the others read what is left.
        if is_main:
            loaded = checkpoints.load_latest(map_location=device)
        distributed.barrier(dist_info)
        if not is_main:
            loaded = checkpoints.load_latest(map_location=device, quarantine=False)
    saved_config = folder / "config.json"
    if resume and saved_config.exists():
        # The run length and the progress bar may change on resume; nothing else.
        changed = config_differences(json.loads(saved_config.read_text()), config, ignore=("train.max_steps", "train.progress"))
        if changed:
            raise ValueError(f"{folder} holds a run with a different config (differs in {', '.join(changed)}); resume it with its own config.json or choose another folder")
    if not resume and checkpoints.paths():
        raise FileExistsError(f"{folder} already holds checkpoints; resume with --resume or choose another folder")
    if resume and loaded is None and (checkpoints.set_aside() or (folder / "metrics.jsonl").exists()):
        # The run did start: starting over would silently throw its logs away.
        raise CheckpointError(
            f"{folder} holds a started run but no checkpoint that loads (set aside: "
            f"{', '.join(p.name for p in checkpoints.set_aside()) or 'none'}); restore a checkpoint or choose another folder"
        )
    if is_main:
        checkpoints.remove_leftovers()
    if loaded is not None:
        state, resumed_from = loaded
        target.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        scaler.load_state_dict(state["scaler"])
        if guidance is not None:
            guidance.set_extra_state(state["guidance"])
        step, start_epoch, skip_batches, history = state["step"], state["epoch"], state["batch"], state["history"]
        rng = state["rng"]
        if isinstance(rng, list):  # one state per rank of the run that saved it
            rng = rng[dist_info.rank] if len(rng) == dist_info.world_size else rng[0]
        _set_rng_state(rng)
    if is_main:
        write_run_files(folder, config)
    logger = _Logger(folder, is_main, step if loaded is not None else None)
    if loaded is not None:
        logger.log({"kind": "resume", "step": step, "checkpoint": resumed_from.name}, prefix="resume")

    def checkpoint(epoch: int, batch: int) -> None:
        rng = distributed.gather_objects(_rng_state(), dist_info)
        if is_main:
            checkpoints.save(
                {
                    "model": target.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "lr_schedule": lr_schedule.state_dict(),
                    "scaler": scaler.state_dict(),
                    "guidance": guidance.get_extra_state() if guidance is not None else None,
                    "step": step,
                    "epoch": epoch,
                    "batch": batch,
                    "history": history,
                    "rng": rng,
                },
                step,
            )
        distributed.barrier(dist_info)

    def train_step(batch: tuple[Tensor, ...], step: int, epoch: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """One optimisation step; returns the step's record and the per-pair similarities."""
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        raw_x = x
        if data.train_transform is not None:
            x = data.train_transform(x)
        similarities: dict[str, Tensor] = {}
        with _autocast(device, config.train.precision):
            if guidance is not None:
                cached = None
                if guide_cache is not None and guidance.alpha != 0.0:
                    cached = guide_cache.activations(batch[-1], x, guidance.run_guide)
                out = guidance(x, mask=padding_mask(x, pad_id), guide_activations=cached)
                output, guidance_loss, alpha, similarities = out.output, out.guidance_loss, out.alpha, out.similarities
            else:
                output, guidance_loss, alpha = model(x), torch.zeros((), device=device), 0.0
            task_loss = task.loss(output, y)
            distill_loss = distillation(x, output) if distillation is not None else torch.zeros((), device=device)
        # Checked before any weight changes, so the last checkpoint and the
        # weights in memory are both still good when the run stops.
        _check_finite(step + 1, dist_info, input=raw_x, task_loss=task_loss, guidance_loss=guidance_loss, distill_loss=distill_loss)
        loss = task_loss + guidance_loss + distill_loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if scaler.is_enabled():
            # fp16: GradScaler skips a step whose gradients overflow and lowers
            # the scale; that is recorded below, not hidden.
            scale_before = scaler.get_scale()
            if config.optim.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(target.parameters(), config.optim.grad_clip)
        else:
            grad_norm = _grad_norm(list(target.parameters()))
            _check_finite(step + 1, dist_info, gradient=grad_norm)
            if config.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(target.parameters(), config.optim.grad_clip)
        # Before the update and after clipping (unscaled under fp16 only when clipping unscales).
        layer_norms = _layer_grad_norms(target) if step + 1 in config.train.grad_norm_steps else {}
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used
        lr_schedule.step()
        record = {
            "step": step + 1,
            "epoch": epoch,
            "loss": float(loss.detach()),
            "task_loss": float(task_loss.detach()),
            "guidance_loss": float(guidance_loss.detach()),
            "alpha": alpha,
            "lr": lr,
        }
        if distillation is not None:
            record["distill_loss"] = float(distill_loss.detach())
        record.update(layer_norms)
        if scaler.is_enabled() and scaler.get_scale() < scale_before:
            record["skipped_overflow"] = 1
        return record, similarities

    rng_eval = torch.Generator().manual_seed(config.train.seed)
    train_eval_idx = torch.randperm(len(data.train), generator=rng_eval)[: config.data.train_eval_size].tolist()
    train_eval = Subset(data.train, train_eval_idx)
    started = time.time()
    model.train()
    if guidance is not None:
        guidance.train()
    done = step >= total_steps
    for epoch in range(start_epoch, config.train.epochs):
        if done:
            break
        sampler.set_epoch(epoch)
        batches_done = skip_batches
        batches = itertools.islice(iter(loader), skip_batches, None)
        bar = tqdm(
            batches,
            total=steps_per_epoch - skip_batches,
            desc=f"{config.name} epoch {epoch + 1}/{config.train.epochs}",
            disable=None if (config.train.progress and is_main) else True,
            leave=False,
        )
        for batch in bar:
            record, similarities = train_step(batch, step, epoch)
            step += 1
            batches_done += 1
            if similarities and (step % config.guidance.log_every == 0 or step == 1):
                record.update({f"similarity/{k}": float(v) for k, v in similarities.items()})
            logger.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", guide=f"{record['guidance_loss']:.3f}")
            if step >= total_steps:
                done = True
                break
            if config.train.checkpoint_every and step % config.train.checkpoint_every == 0:
                checkpoint(epoch, batches_done)
        bar.close()
        skip_batches = 0
        distributed.broadcast_buffers(target, dist_info)
        train_metrics = evaluate(target, train_eval, config, device, pad_id, dist_info=dist_info) if len(train_eval) else {}
        val_metrics = evaluate(target, data.val, config, device, pad_id, dist_info=dist_info)
        entry = {"epoch": epoch + 1, "step": step, "seconds": time.time() - started}
        entry.update({f"train_{k}": v for k, v in train_metrics.items()})
        entry.update({f"val_{k}": v for k, v in val_metrics.items()})
        history.append(entry)
        logger.log({"kind": "epoch", **entry}, prefix="epoch")
        if is_main:
            (folder / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        if batches_done >= steps_per_epoch:
            checkpoint(epoch + 1, 0)
        else:  # stopped by max_steps inside the epoch
            checkpoint(epoch, batches_done)

    if guide_cache is not None and is_main:
        logger.log({"kind": "guide_cache", "step": step, "hits": guide_cache.hits, "misses": guide_cache.misses, "bytes": guide_cache.nbytes()}, prefix="guide_cache")
    distributed.broadcast_buffers(target, dist_info)
    final = _finish(target, data, config, device, pad_id, history, folder, is_main, step, time.time() - started, dist_info)
    logger.close()
    if guidance is not None:
        guidance.remove_hooks()
    distributed.barrier(dist_info)
    return RunResult(folder, history, final)


def _finish(target: nn.Module, data: DataSplits, config: RunConfig, device: torch.device, pad_id: int | None, history: list[dict[str, Any]], folder: Path, is_main: bool, step: int, seconds: float, dist_info: distributed.DistInfo | None = None) -> dict[str, Any]:
    """Final evaluation on the test set(s); writes model.pt, predictions and result.json."""
    classification = config.train.task == "classification"
    test = evaluate(target, data.test, config, device, pad_id, keep_predictions=classification, dist_info=dist_info)
    predictions = test.pop("predictions", None)
    final: dict[str, Any] = {"steps": step, "seconds": seconds, "test": test}
    final["extra_test"] = {name: evaluate(target, ds, config, device, pad_id, dist_info=dist_info) for name, ds in data.extra_test.items()}
    if history:
        last = history[-1]
        final["train"] = {k[len("train_"):]: v for k, v in last.items() if k.startswith("train_")}
        final["val"] = {k[len("val_"):]: v for k, v in last.items() if k.startswith("val_")}
        metric = "accuracy" if "accuracy" in test else "loss"
        if metric in final["train"]:
            final["gap"] = final["train"][metric] - test[metric]
    if is_main:
        save_checkpoint({"model": target.state_dict(), "config": config.to_dict()}, folder / "model.pt")
        if predictions is not None:
            np.save(folder / "test_predictions.npy", predictions)
        (folder / "result.json").write_text(json.dumps(final, indent=2) + "\n")
    return final
