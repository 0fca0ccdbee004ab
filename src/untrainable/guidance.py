"""Guidance: the target's task forward plus the alignment loss toward one or several frozen guides."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from untrainable.adaptive_alpha import AdaptiveAlpha
from untrainable.capture import LayerCapture, resolve_layers
from untrainable.distributed import gather_for_similarity, is_distributed
from untrainable.pairing import Pair, PairSpec, check_pairs, make_pair, spread_pairs
from untrainable.schedule import AlphaSchedule
from untrainable.sequence import SEQUENCE_MODES, sequence_similarity
from untrainable.similarity import (
    SIMILARITY_INFO,
    Similarity,
    centred_gram,
    get_similarity,
    linear_cka,
    linear_cka_to_grams,
    sample_space_is_cheaper,
)

GUIDE_INPUTS = ("same", "noise")
# A guide's name prefixes its similarity keys (`name:target<-guide`) and names
# its entries in logs: kept to characters that read unambiguously there.
GUIDE_NAME = re.compile(r"[A-Za-z0-9_-]+")


# Fewest examples on which each measure says something (`MeasureInfo.min_n`): on 2
# examples the centred activations are rank 1, so biased CKA is identically 1.
MIN_EXAMPLES = {name: info.min_n for name, info in SIMILARITY_INFO.items()}


class NonFiniteError(FloatingPointError):
    """A NaN or inf in the inputs, the activations or a loss term; the message names where."""


def _check_not_shared(target: nn.Module, guide: nn.Module) -> None:
    """Refuse a guide that shares parameters or modules with the target: freezing it would freeze the target.

    A shared module without parameters (a BatchNorm with affine=False) would be put in eval mode with the
    guide, and the target's statistics frozen.
    """
    target_params = {id(p) for p in target.parameters()}
    shared = [name for name, p in guide.named_parameters() if id(p) in target_params]
    if shared:
        raise ValueError(
            f"the guide shares {len(shared)} parameters with the target (e.g. {shared[0]!r}); "
            "freezing the guide would freeze the target: give the guide its own copy (copy.deepcopy)"
        )
    target_modules = {id(m) for m in target.modules()}
    modules = [name or type(guide).__name__ for name, m in guide.named_modules() if id(m) in target_modules]
    if modules:
        raise ValueError(
            f"the guide shares {len(modules)} module(s) with the target (e.g. {modules[0]!r}); "
            "freezing the guide would put them in eval mode for the target too: give the guide its own copy (copy.deepcopy)"
        )


def freeze(guide: nn.Module) -> nn.Module:
    """Put the guide in eval mode with no gradients: the one place the guide is frozen."""
    guide.eval()
    guide.requires_grad_(False)
    return guide


@dataclass(frozen=True)
class GuideGram:
    """A guide layer reduced to what sample-space CKA needs: its `similarity.centred_gram`, (n, n)."""

    matrix: Tensor


@dataclass
class Guide:
    """One frozen guide and how it pulls on the target: where (pairs or layers), how hard (alpha), on what input.

        Guide(resnet, name="resnet18", alpha=1.0, guide_layers=["layer*.*"])

    Args:
        model: the frozen network whose representations pull on the target's.
        name: prefixes the guide's similarity keys (`name:target<-guide`);
            letters, digits, `_` and `-`. Needed, and distinct, when several
            guides pull; a single unnamed guide keeps the plain keys.
        alpha: weight of its alignment term (ignored when `schedule` is given).
        pairs: explicit (target_layer, guide_layer[, weight]) pairs. Default:
            the guide's layers spread evenly over the target's.
        target_layers: the target's module paths or globs to capture; default `capture.default_layers`.
        guide_layers: the guide's module paths or globs to capture; default `capture.default_layers`.
        schedule: an AlphaSchedule, or an AdaptiveAlpha (measured by
            `step.adapt_alpha` from this guide's own loss); the step counts
            the Guidance's training-mode forwards.
        guide_input: `same` (the guide sees the batch) or `noise` (Gaussian
            noise of the batch's shape, the authors' option).
    """

    model: nn.Module
    name: str = ""
    alpha: float = 1.0
    pairs: Sequence[PairSpec] | None = None
    target_layers: Sequence[str] | None = None
    guide_layers: Sequence[str] | None = None
    schedule: AlphaSchedule | AdaptiveAlpha | None = None
    guide_input: str = "same"

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"Guide.model must be an nn.Module, got {type(self.model).__name__}")
        if self.guide_input not in GUIDE_INPUTS:
            raise ValueError(f"guide_input {self.guide_input!r} is not one of {', '.join(GUIDE_INPUTS)}")
        if self.name and not GUIDE_NAME.fullmatch(self.name):
            raise ValueError(f"guide name {self.name!r}: use letters, digits, _ and - only")
        if self.schedule is None:
            self.schedule = AlphaSchedule(alpha=self.alpha)

    def key(self, pair: Pair) -> str:
        """The name under which one of its pairs' similarity is logged."""
        return f"{self.name}:{pair.key}" if self.name else pair.key


@dataclass
class AttachedGuide:
    """A Guide as Guidance runs it: the guide, the forward hooks on its model, its pairs checked against both models."""

    spec: Guide
    capture: LayerCapture
    pairs: list[Pair]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def schedule(self) -> AlphaSchedule | AdaptiveAlpha:
        """Its alpha schedule (a Guide given none has a constant one at its alpha)."""
        schedule = self.spec.schedule
        assert schedule is not None, "Guide.__post_init__ sets the schedule"
        return schedule

    @property
    def adaptive(self) -> AdaptiveAlpha | None:
        """Its AdaptiveAlpha where its alpha is measured (by `step.adapt_alpha`), else None."""
        schedule = self.spec.schedule
        return schedule if isinstance(schedule, AdaptiveAlpha) else None


def _guides_given(guide: nn.Module | Guide | Sequence[Guide], per_guide: dict[str, Any]) -> list[Guide]:
    """The guides Guidance was given: a module with the per-guide keyword arguments, a Guide, or a list of Guides."""
    if isinstance(guide, nn.Module):
        return [Guide(guide, **per_guide)]
    guides = [guide] if isinstance(guide, Guide) else list(guide)
    if not guides or not all(isinstance(g, Guide) for g in guides):
        raise TypeError("guide must be an nn.Module, a Guide or a non-empty list of Guides")
    defaults = {"alpha": 1.0, "guide_input": "same"}
    given = sorted(k for k, v in per_guide.items() if v != defaults.get(k))
    if given:
        raise ValueError(f"{', '.join(given)}: with Guide objects, set these on each Guide, not on Guidance")
    adaptive = [id(g.schedule) for g in guides if isinstance(g.schedule, AdaptiveAlpha)]
    if len(adaptive) != len(set(adaptive)):
        raise ValueError("each guide needs its own AdaptiveAlpha: one object measures one guide's alpha")
    names = [g.name for g in guides]
    for i, name in enumerate(names):
        if len(guides) > 1 and (not name or name in names[:i]):
            raise ValueError(
                f"guides[{i}]: several guides need distinct names (they prefix the similarity keys), got {names}"
            )
    return guides


@dataclass
class GuidanceOutput:
    """What one guided forward returns.

    `output` is the target's own output. `guidance_loss`, a scalar to add to
    the task loss, is the sum over guides of alpha times `guide_losses`: each
    guide's weighted sum over its pairs of (1 - similarity), by guide name
    (`""` for a single unnamed guide; 0 for a guide off its schedule).
    `alphas` holds each guide's alpha by name, `alpha` the first guide's.
    `similarities` holds each pair's similarity as a detached scalar tensor
    keyed `target<-guide`, prefixed `name:` for a named guide (tensors, so a
    GPU step does not wait on a host copy per pair). `unit_loss`, with a
    single guide, is its guide loss (the guidance loss at alpha 1), None when
    the guide was skipped or when several guides pull (see `guide_losses`).
    """

    output: Any
    guidance_loss: Tensor
    alpha: float
    similarities: dict[str, Tensor] = field(default_factory=dict)
    guide_losses: dict[str, Tensor] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    unit_loss: Tensor | None = None


class Guidance(nn.Module):
    """Adds representational guidance toward one or several frozen guides to any target model.

        guidance = Guidance(target, guide, alpha=1.0)
        out = guidance(x)                  # the target runs once, the guide without grad
        loss = F.cross_entropy(out.output, y) + out.guidance_loss

        guidance = Guidance(target, [Guide(resnet, name="resnet18"), Guide(vit, name="vit", alpha=0.5)])

    Neither model is modified: layers are captured with forward hooks,
    registered once. Guides are frozen (eval mode, no gradients, run under
    no_grad) and stay in eval mode whatever `.train()` is called on. Each
    guide runs once per forward; a target layer may be pulled by several
    guides, and the same module may serve as two guides (it then runs twice).

    Args:
        target: the network being trained (may be wrapped in DDP or compiled).
        guide: the frozen network whose representations pull on the target's,
            or a Guide, or a list of Guides (each with its own layers, pairs,
            alpha or schedule and input; the arguments below marked "one
            guide" are then set on each Guide instead).
        alpha: one guide's alpha, as `Guide.alpha`.
        pairs: one guide's pairs, as `Guide.pairs`.
        target_layers: one guide's target layers, as `Guide.target_layers`.
        guide_layers: one guide's layers, as `Guide.guide_layers`.
        schedule: one guide's schedule, as `Guide.schedule`.
        guide_input: one guide's input, as `Guide.guide_input`.
        similarity: `cka` (biased linear CKA, the paper's), any other name of
            `untrainable list`, or a callable (n, d1), (n, d2) -> scalar; for every guide.
        sequence_mode: how (batch, time, features) activations are compared
            (`flatten`, `tokenwise`, `tokens`); see `sequence.sequence_similarity`.
        gather: applied to every activation (and mask) before the similarity;
            `distributed.gather_for_similarity` computes it on the global
            batch under DDP. Default: each process's own batch.
        gram_dtype: dtype of CKA's sample-space Gram products; `torch.bfloat16`
            forms them from centred activations in bfloat16 (see
            `similarity.linear_cka` for its measured error). Default: float32.

    With `cka`, a guide layer whose pairs compare in sample space is kept only
    as its centred (n, n) Gram matrix, formed as the layer finishes under
    no_grad so that its activation is freed before the next layer runs.
    Sequence modes or masks on (batch, time, features) pairs, other measures
    and a batch gathered over processes keep the guide's activations instead.
    """

    def __init__(
        self,
        target: nn.Module,
        guide: nn.Module | Guide | Sequence[Guide],
        alpha: float = 1.0,
        pairs: Sequence[PairSpec] | None = None,
        target_layers: Sequence[str] | None = None,
        guide_layers: Sequence[str] | None = None,
        similarity: str | Similarity = "cka",
        schedule: AlphaSchedule | AdaptiveAlpha | None = None,
        guide_input: str = "same",
        sequence_mode: str = "flatten",
        gather: Callable[[Tensor], Tensor] | None = None,
        gram_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if sequence_mode not in SEQUENCE_MODES:
            raise ValueError(f"sequence_mode {sequence_mode!r} is not one of {', '.join(SEQUENCE_MODES)}")
        per_guide = {"alpha": alpha, "pairs": pairs, "target_layers": target_layers, "guide_layers": guide_layers}
        specs = _guides_given(guide, {**per_guide, "schedule": schedule, "guide_input": guide_input})
        for spec in specs:
            _check_not_shared(target, spec.model)
        self.target = target
        self.guide_models = nn.ModuleList([freeze(spec.model) for spec in specs])  # moved by .to() with the target
        self.similarity = get_similarity(similarity)
        self.min_examples = MIN_EXAMPLES.get(similarity) if isinstance(similarity, str) else None
        self.sequence_mode = sequence_mode
        self.gather = gather
        self.gram_dtype = gram_dtype
        attached = [self._attach(spec) for spec in specs]
        self.guides: list[AttachedGuide] = [guide for guide, _ in attached]
        # One capture of the target for every guide: the target runs once per forward.
        self.target_capture = LayerCapture(target, list(dict.fromkeys(n for _, names in attached for n in names)))
        self.step = 0  # training-mode forwards so far; drives the schedules

    def _attach(self, spec: Guide) -> tuple[AttachedGuide, list[str]]:
        """A guide's hooks and checked pairs, and the target layers it pulls on."""
        pair_list = [make_pair(p) for p in spec.pairs] if spec.pairs is not None else None
        target_layers, guide_layers = spec.target_layers, spec.guide_layers
        if pair_list is not None:
            target_layers = target_layers or list(dict.fromkeys(p.target for p in pair_list))
            guide_layers = guide_layers or list(dict.fromkeys(p.guide for p in pair_list))
        target_names = resolve_layers(self.target, target_layers)
        capture = LayerCapture(spec.model, guide_layers)
        if pair_list is None:
            pair_list = spread_pairs(target_names, capture.names)
        return AttachedGuide(spec, capture, check_pairs(pair_list, target_names, capture.names)), target_names

    def _only(self, name: str | None = None) -> AttachedGuide:
        """The guide called `name`, or the only guide when `name` is None."""
        if name is None:
            if len(self.guides) > 1:
                raise ValueError(
                    f"this Guidance has {len(self.guides)} guides ({', '.join(g.name for g in self.guides)}): "
                    "name one, or use guidance.guides"
                )
            return self.guides[0]
        for guide in self.guides:
            if guide.name == name:
                return guide
        raise KeyError(f"no guide named {name!r}; guides: {', '.join(repr(g.name) for g in self.guides)}")

    @property
    def guide(self) -> nn.Module:
        """The only guide's model."""
        return self._only().spec.model

    @property
    def guide_capture(self) -> LayerCapture:
        """The only guide's layer capture."""
        return self._only().capture

    @property
    def pairs(self) -> list[Pair]:
        """The only guide's pairs (with several, each `guidance.guides[i].pairs`)."""
        return self._only().pairs

    @property
    def schedule(self) -> AlphaSchedule | AdaptiveAlpha:
        """The only guide's alpha schedule."""
        return self._only().schedule

    def get_extra_state(self) -> dict[str, Any]:
        # Saved with the state dict so a resumed run continues the alpha schedules: the step, and each
        # adaptive alpha's state (the only guide's as it is; with several guides, by guide name).
        adaptive = {g.name: a.state_dict() for g in self.guides if (a := g.adaptive) is not None}
        if not adaptive:
            return {"step": self.step}
        if len(self.guides) == 1:
            return {"step": self.step, "adaptive": adaptive[self.guides[0].name]}
        return {"step": self.step, "adaptive": adaptive}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        saved = state.get("adaptive")
        if saved is None:
            return
        for guide in self.guides:
            adaptive = guide.adaptive
            if adaptive is None:
                continue
            own = saved if len(self.guides) == 1 else saved.get(guide.name)
            if own is not None:
                adaptive.load_state_dict(own)

    def measuring(self, guide: AttachedGuide) -> bool:
        """Whether `guide` has an adaptive alpha measured at the next training forward."""
        adaptive = guide.adaptive
        return self.training and adaptive is not None and adaptive.due(self.step)

    def train(self, mode: bool = True) -> "Guidance":
        self.training = mode
        self.target.train(mode)
        for model in self.guide_models:
            freeze(model)
        return self

    @property
    def alphas(self) -> dict[str, float]:
        """Each guide's alpha at the current step, by name."""
        return {guide.name: guide.schedule(self.step) for guide in self.guides}

    @property
    def alpha(self) -> float:
        """The first (or only) guide's alpha at the current step."""
        return self.guides[0].schedule(self.step)

    def _guide_input(self, guide: Guide, x: Tensor, guide_x: Tensor | None) -> Tensor:
        if guide_x is not None:
            return guide_x
        if guide.guide_input == "noise":
            if not torch.is_floating_point(x):
                raise ValueError("guide_input='noise' needs floating-point inputs, got token ids")
            return torch.randn_like(x)
        return x

    def run_guide(
        self, x: Tensor, reduce: Callable[[str, Tensor], Any] | None = None, name: str | None = None
    ) -> dict[str, Any]:
        """The activations of the guide called `name` (default: the only one) on x (batch, ...) by layer.

        The guide runs frozen and without gradients. `reduce(layer,
        activation)`, when given, runs as each guide layer finishes and its
        result is kept instead of the activation.
        """
        guide = self._only(name)
        freeze(guide.spec.model)
        with torch.no_grad():
            return guide.capture.run(x, transform=reduce)[1]

    def guide_grams(
        self, target_acts: dict[str, Tensor], mask: Tensor | None, pairs: Sequence[Pair] | None = None
    ) -> Callable[[str, Tensor], Any] | None:
        """How each layer of a guide (of `pairs`; default: the only guide's) is reduced as it finishes, or None.

        With biased CKA on each process's own batch, a guide layer whose pairs
        all compare in sample space becomes a `GuideGram`; other layers stay
        activations. None, where the activations themselves are needed, for
        other measures, a batch gathered over processes, or masks and
        sequence modes on (batch, time, features) pairs.
        """
        if not self._uses_grams(target_acts, mask):
            return None
        widths: dict[str, list[int]] = {}
        for pair in self._only().pairs if pairs is None else pairs:
            act = target_acts[pair.target]
            widths.setdefault(pair.guide, []).append(act.numel() // act.shape[0])

        def reduce(layer: str, act: Tensor) -> Any:
            n = act.shape[0]
            d = act.numel() // n
            if layer in widths and all(sample_space_is_cheaper(n, width, d) for width in widths[layer]):
                return GuideGram(centred_gram(act, self.gram_dtype))
            return act

        return reduce

    def _uses_grams(self, target_acts: dict[str, Tensor], mask: Tensor | None) -> bool:
        """Whether guide layers may be reduced to Gram matrices (the same answer for every guide)."""
        if self.similarity is not linear_cka or not self._local_batch():
            return False
        sequences = any(act.dim() == 3 for act in target_acts.values())
        return not (sequences and (mask is not None or self.sequence_mode != "flatten"))

    def _local_batch(self) -> bool:
        """True when the similarity sees this process's batch as it is (no gather, or one process)."""
        return self.gather is None or (self.gather is gather_for_similarity and not is_distributed())

    def pair_similarity(self, target_act: Tensor, guide_act: Tensor, mask: Tensor | None) -> Tensor:
        """Similarity of one pair's activations, (batch, ...) each."""
        if target_act.dim() == 3 and guide_act.dim() == 3 and (mask is not None or self.sequence_mode != "flatten"):
            return sequence_similarity(self.similarity, target_act, guide_act, self.sequence_mode, mask)
        if self.similarity is linear_cka:
            return linear_cka(target_act.flatten(1), guide_act.flatten(1), self.gram_dtype)
        return self.similarity(target_act.flatten(1), guide_act.flatten(1))

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        guide_x: Tensor | None = None,
        guide_activations: dict[str, Any] | None = None,
    ) -> GuidanceOutput:
        """Run the target once on x, each guide once, and compute the guidance loss.

        Args:
            x: the batch, (batch, ...), as the target takes it.
            mask: (batch, time) bool, True on real tokens, for sequence activations.
            guide_x: a different input for the guides (default: x, or noise).
            guide_activations: precomputed guide activations by layer (a
                cache), the guide then not run; with several guides, such
                dicts by guide name (guides left out run).
        Returns:
            GuidanceOutput. In training mode the schedules' step advances by one.
        """
        alphas = self.alphas
        # A guide off its schedule (after "guidance as initialisation") is skipped entirely: with none
        # left, the step is as cheap as unguided training. An adaptive alpha at 0 still runs its guide
        # on its measurement steps, or it could not rise.
        pulling = [
            guide
            for guide in self.guides
            if not (self.training and alphas[guide.name] == 0.0 and not self.measuring(guide))
        ]
        if not pulling:
            output = self.target(x)
            self._advance()
            zero = torch.zeros((), device=_device_of(output, x))
            first = alphas[self.guides[0].name]  # this step's, read before _advance moved the step on
            return GuidanceOutput(output, zero, first, {}, {g.name: zero for g in self.guides}, alphas)
        output, target_acts = self.target_capture.run(x)
        sides = {
            guide.name: self._guide_side(guide, x, guide_x, guide_activations, target_acts, mask) for guide in pulling
        }
        if self.gather is not None and not self._uses_grams(target_acts, mask):
            target_acts = {name: self.gather(act) for name, act in target_acts.items()}
            sides = {name: {layer: self.gather(act) for layer, act in side.items()} for name, side in sides.items()}
            mask = self.gather(mask) if mask is not None else None
        self._check_batch(next(iter(target_acts.values())).shape[0] if target_acts else None)
        items = [
            (guide.spec.key(pair), pair.target, sides[guide.name][pair.guide])
            for guide in pulling
            for pair in guide.pairs
        ]
        sims = self._similarities(items, target_acts, mask)
        if sims and not bool(torch.isfinite(torch.stack([v.detach().float() for v in sims.values()])).all()):
            bad = [key for key, value in sims.items() if not bool(torch.isfinite(value))]
            raise NonFiniteError(
                f"guidance_loss: the similarity of {', '.join(bad[:4])} is not finite: the target's or the guide's "
                "activations hold NaN or inf (check the inputs and the weights)"
            )
        zero = torch.zeros((), device=_device_of(output, x))
        guide_losses = {guide.name: zero for guide in self.guides}
        for guide in pulling:
            terms = [pair.weight * (1.0 - sims[guide.spec.key(pair)]) for pair in guide.pairs]
            guide_losses[guide.name] = torch.stack(terms).sum()
        guidance_loss = torch.stack([alphas[guide.name] * guide_losses[guide.name] for guide in pulling]).sum()
        similarities = {key: sims[key].detach() for key, _, _ in items}
        unit_loss = guide_losses[self.guides[0].name] if len(self.guides) == 1 else None
        self._advance()
        first = alphas[self.guides[0].name]
        return GuidanceOutput(output, guidance_loss, first, similarities, guide_losses, alphas, unit_loss)

    def _guide_side(
        self,
        guide: AttachedGuide,
        x: Tensor,
        guide_x: Tensor | None,
        guide_activations: dict[str, Any] | None,
        target_acts: dict[str, Tensor],
        mask: Tensor | None,
    ) -> dict[str, Any]:
        """One guide's layers by name: run on its input, or taken from the given activations; Gram matrices where they do."""
        given = guide_activations
        if given is not None and len(self.guides) > 1:
            given = given.get(guide.name)
        reduce = self.guide_grams(target_acts, mask, guide.pairs)
        if given is None:
            return self.run_guide(self._guide_input(guide.spec, x, guide_x), reduce, guide.name)
        if reduce is None:
            return given
        with torch.no_grad():
            return {name: reduce(name, act) for name, act in given.items()}

    def _similarities(
        self, items: list[tuple[str, str, Any]], target_acts: dict[str, Tensor], mask: Tensor | None
    ) -> dict[str, Tensor]:
        """Each (key, target layer, guide side) item's similarity by key.

        The items of one target layer with guide Gram matrices share one
        kernel, whichever guides they come from.
        """
        sims: dict[str, Tensor] = {}
        by_target: dict[str, list[tuple[str, Tensor]]] = {}
        for key, target, side in items:
            if isinstance(side, GuideGram):
                by_target.setdefault(target, []).append((key, side.matrix))
            else:
                sims[key] = self.pair_similarity(target_acts[target], side, mask)
        for target, grams in by_target.items():
            values = linear_cka_to_grams(
                target_acts[target].flatten(1), torch.stack([gram for _, gram in grams]), self.gram_dtype
            )
            sims.update(zip([key for key, _ in grams], values.unbind()))
        return sims

    def _check_batch(self, n: int | None) -> None:
        if n is not None and self.min_examples is not None and n < self.min_examples:
            raise ValueError(
                f"a batch of {n} is too small for similarity {self.similarity.__name__}: it needs at least "
                f"{self.min_examples} examples (biased CKA is identically 1 on 2); use a larger batch"
            )

    def _advance(self) -> None:
        if self.training:
            self.step += 1

    def remove_hooks(self) -> None:
        """Take the forward hooks off the target and every guide."""
        self.target_capture.remove()
        for guide in self.guides:
            guide.capture.remove()


def _device_of(output: Any, x: Tensor) -> torch.device:
    return output.device if isinstance(output, Tensor) else x.device


def describe_pairs(
    target: nn.Module, guide: nn.Module, dataset: Any, batch_size: int = 256, **kwargs: Any
) -> list[tuple[str, ...]]:
    """Rows (target layer, its shape, guide layer, its shape, weight, similarity) at the models' current weights.

    The first `batch_size` examples of `dataset` (items `(x, ...)`) are used;
    `kwargs` go to Guidance (pairs, layers, similarity). The first row is a header.
    """
    n = min(batch_size, len(dataset))
    x = torch.stack([dataset[i][0] for i in range(n)])
    was_training = target.training
    guidance = Guidance(target, guide, **kwargs).eval()
    try:
        guidance._check_batch(n)
        with torch.no_grad():
            _, target_acts = guidance.target_capture.run(x)
        guide_acts = guidance.run_guide(x)
        rows: list[tuple[str, ...]] = [("target layer", "shape", "guide layer", "shape", "weight", "similarity")]
        for pair in guidance.pairs:
            t, g = target_acts[pair.target], guide_acts[pair.guide]
            sim = float(guidance.pair_similarity(t, g, None))
            rows.append(
                (pair.target, str(tuple(t.shape)), pair.guide, str(tuple(g.shape)), f"{pair.weight:g}", f"{sim:.4f}")
            )
        return rows
    finally:
        guidance.remove_hooks()
        target.train(was_training)
