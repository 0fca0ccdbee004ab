"""The benchmarked steps: (a) target, (b) +guide, (c) guided, (e) cached, (d) the authors' step, and the floor.

(a), (b), (c) and (e) run `step.train_step`, the step the trainer takes; (d)
re-implements the authors' step: two target forwards, hooks registered at
every step on every module of a fixed list of types, biased CKA with explicit
n x n centring matrices. The floor's products are what no implementation of
the guided step's CKA can avoid on a case's shapes.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from untrainable import distributed
from untrainable.bench.cases import Case, build_case
from untrainable.capture import as_activation, named_layers
from untrainable.guidance import Guidance
from untrainable.guide_cache import GuideCache
from untrainable.similarity import sample_space_is_cheaper
from untrainable.step import StepParts, autocast, train_step
from untrainable.tasks import get_task

VARIANTS = ("target", "+guide", "guided", "cached", "authors")
PRODUCTS = "products"  # the similarity's unavoidable matrix products, timed beside the variants

# ---------------------------------------------------------------- the authors' step

AUTHORS_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.RNN,
    nn.LSTM,
    nn.MultiheadAttention,
)


def authors_features(
    model: nn.Module, x: Tensor, types: tuple[type[nn.Module], ...] = AUTHORS_TYPES
) -> dict[str, Tensor]:
    """Forward x once more with a hook on every module of `types`, registered now and removed after.

    Layers are named by position (`Linear_3`), as in the authors' extractor.
    """
    features: dict[str, Tensor] = {}
    handles = []
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, types):
            kind = type(module).__name__
            name = f"{kind}_{counts.get(kind, 0)}"
            counts[kind] = counts.get(kind, 0) + 1

            def hook(_m: nn.Module, _i: tuple, output: Any, name: str = name) -> None:
                features[name] = as_activation(output)

            handles.append(module.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return features


def positional_names(model: nn.Module, types: tuple[type[nn.Module], ...] = AUTHORS_TYPES) -> dict[int, str]:
    """id(module) -> its positional name in `authors_features`."""
    names, counts = {}, {}
    for module in model.modules():
        if isinstance(module, types):
            kind = type(module).__name__
            names[id(module)] = f"{kind}_{counts.get(kind, 0)}"
            counts[kind] = counts.get(kind, 0) + 1
    return names


def _authors_centering(k: Tensor) -> Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype, device=k.device) - torch.ones(n, n, dtype=k.dtype, device=k.device) / n
    return h @ k @ h


def _authors_hsic(x: Tensor, y: Tensor) -> Tensor:
    return (_authors_centering(x @ x.T) * _authors_centering(y @ y.T)).sum()


def authors_cka(x: Tensor, y: Tensor) -> Tensor:
    """Biased linear CKA as the authors compute it: explicit centring matrices, no epsilon."""
    x, y = x.flatten(1), y.flatten(1)
    return _authors_hsic(x, y) / (torch.sqrt(_authors_hsic(x, x)) * torch.sqrt(_authors_hsic(y, y)))


# ---------------------------------------------------------------- the steps


def _task_loss(output: Tensor, y: Tensor) -> Tensor:
    if output.dim() == 3:
        return F.cross_entropy(output.flatten(0, 1), y.flatten())
    return F.cross_entropy(output, y)


class _WithGuideForward(nn.Module):
    """Variant (b)'s forward: the target's, then the guide's under no_grad, with no alignment between them."""

    def __init__(self, target: nn.Module, guide: nn.Module) -> None:
        super().__init__()
        self.target = target
        self._guide = [guide]  # not a submodule: the guide stays as Guidance froze it

    def forward(self, x: Tensor) -> Tensor:
        output = self.target(x)
        with torch.no_grad():
            self._guide[0](x)
        return output


def _authors_pairs(guidance: Guidance) -> tuple[tuple[type[nn.Module], ...], list[tuple[str, str, float]]]:
    """The types the authors' extractor hooks and the pairs by positional name.

    The fixed list, plus the classes of the paired layers (a model's own
    attention class, a ResNet block), as the authors list the types their
    models use.
    """
    modules_t, modules_g = named_layers(guidance.target), named_layers(guidance.guide)
    paired = {type(modules_t[p.target]) for p in guidance.pairs} | {type(modules_g[p.guide]) for p in guidance.pairs}
    types = AUTHORS_TYPES + tuple(sorted(paired - set(AUTHORS_TYPES), key=lambda t: t.__name__))
    pos_t, pos_g = positional_names(guidance.target, types), positional_names(guidance.guide, types)
    pairs = [(pos_t[id(modules_t[p.target])], pos_g[id(modules_g[p.guide])], p.weight) for p in guidance.pairs]
    return types, pairs


def case_steps(
    case: Case, device: torch.device, pairs: list[tuple[str, str]] | None = None
) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """One closure per variant, each doing one full optimisation step on the same batch, and the products' closure.

    (a), (b), (c) and (e) run the trainer's step, `step.train_step`; (d) its
    own. Every step's forward runs under the case's precision (autocast).
    `pairs` replaces the case's layers and the default spread.
    """
    target, guide, x, y = build_case(case, device)
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-4, fused=case.fused or None)
    layers = {"target_layers": case.target_layers, "guide_layers": case.guide_layers} if pairs is None else {}
    guidance = Guidance(target, guide, pairs=pairs, **layers).train()
    cache = GuideCache(case.batch, "memory")
    index = torch.arange(case.batch)
    cache.activations(index, x, guidance.run_guide)  # filled once, as after the first epoch
    types, authors_pairs = _authors_pairs(guidance)
    products, counted = unavoidable_products(guidance, x)
    numbers = itertools.count(1)

    def trainer_step(batch: tuple[Tensor, ...], model: nn.Module = target, **terms: Any) -> Callable[[], None]:
        """The trainer's own step (`step.train_step`) on `batch`, with the given loss terms."""
        parts = StepParts(
            model=model,
            target=target,
            optimizer=optimizer,
            task=get_task("tokens" if case.tokens else "classification"),
            device=device,
            dist_info=distributed.DistInfo(0, 1, 0, torch.device("cpu")),  # one process, as the trainer's
            scaler=torch.amp.GradScaler("cuda", enabled=case.precision == "fp16"),
            precision=case.precision,
            **terms,
        )

        def step() -> None:
            train_step(parts, batch, next(numbers))

        return step

    def step_authors() -> None:
        with autocast(device, case.precision):
            loss = _task_loss(target(x), y)
            target_features = authors_features(target, x, types)
            with torch.no_grad():
                guide_features = authors_features(guide, x, types)
            for t_name, g_name, weight in authors_pairs:
                loss = loss + weight * (1.0 - authors_cka(target_features[t_name], guide_features[g_name]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    steps = {
        "target": trainer_step((x, y)),
        "+guide": trainer_step((x, y), model=_WithGuideForward(target, guide)),
        "guided": trainer_step((x, y), guidance=guidance),
        "cached": trainer_step((x, y, index), guidance=guidance, guide_cache=cache),
        "authors": step_authors,
        PRODUCTS: products,
    }
    info = {"pairs": len(guidance.pairs), "cache_mib": cache.nbytes() / 2**20 / case.batch, "products": counted}
    return steps, info


# ---------------------------------------------------------------- the floor


def unavoidable_products(guidance: Guidance, x: Tensor) -> tuple[Callable[[], None], dict[str, float]]:
    """The matrix products no implementation of the guided step's CKA can avoid, on this batch's shapes.

    Per guide layer compared in sample space, its Gram matrix Y Y^T (n^2 d2
    multiply-adds); per target layer with sample-space pairs, its Gram
    matrix X X^T and the gradient's (n, n) @ (n, d1) product (2 n^2 d1);
    per pair in feature space, Y^T X, X^T X, Y^T Y and the gradient's
    Y (Y^T X)^T and X (X^T X). The space is chosen as `Guidance` chooses it.
    Returns a closure running them on random tensors of those shapes, and
    the multiply-add count (`gmacs`) and the MiB those tensors take (`buffers_mib`).
    """
    with torch.no_grad():
        _, target_acts = guidance.target_capture.run(x)
        guide_acts = guidance.run_guide(x)
    n = x.shape[0]
    width = {name: act[0].numel() for name, act in {**target_acts, **guide_acts}.items()}
    sample_guides = {
        g
        for g in {p.guide for p in guidance.pairs}
        if all(sample_space_is_cheaper(n, width[p.target], width[g]) for p in guidance.pairs if p.guide == g)
    }
    sample_targets = {p.target for p in guidance.pairs if p.guide in sample_guides}
    feature_pairs = [(width[p.target], width[p.guide]) for p in guidance.pairs if p.guide not in sample_guides]
    device = x.device
    grams = [torch.randn(n, width[g], device=device) for g in sorted(sample_guides)]
    sides = [
        (torch.randn(n, width[t], device=device), torch.randn(n, n, device=device)) for t in sorted(sample_targets)
    ]
    features = [(torch.randn(n, d1, device=device), torch.randn(n, d2, device=device)) for d1, d2 in feature_pairs]
    macs = sum(n * n * a.shape[1] for a in grams) + sum(2 * n * n * a.shape[1] for a, _ in sides)
    macs += sum(n * (2 * d1 * d2 + 2 * d1 * d1 + d2 * d2) for d1, d2 in feature_pairs)

    def run() -> None:
        with torch.no_grad():
            for y in grams:
                y @ y.T
            for a, m in sides:
                a @ a.T
                m @ a
            for a, y in features:
                cross, own = y.T @ a, a.T @ a
                y.T @ y
                y @ cross
                a @ own

    held = [*grams, *(t for pair in sides for t in pair), *(t for pair in features for t in pair)]
    counted = {"gmacs": macs / 1e9, "sample_guide_layers": len(grams), "feature_pairs": len(features)}
    return run, {**counted, "buffers_mib": sum(t.numel() * t.element_size() for t in held) / 2**20}
