"""Guidance: the target's task forward plus the alignment loss toward a frozen guide."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from untrainable.capture import LayerCapture
from untrainable.distributed import gather_for_similarity, is_distributed
from untrainable.pairing import Pair, PairSpec, check_pairs, make_pair, spread_pairs
from untrainable.schedule import AlphaSchedule
from untrainable.sequence import SEQUENCE_MODES, sequence_similarity
from untrainable.similarity import (
    Similarity,
    centred_gram,
    get_similarity,
    linear_cka,
    linear_cka_to_grams,
    sample_space_is_cheaper,
)

GUIDE_INPUTS = ("same", "noise")


# Fewest examples on which each measure says something: on 2 examples the
# centred activations are rank 1, so biased CKA is identically 1; the unbiased
# estimator (Song et al. 2012) divides by n - 3.
MIN_EXAMPLES = {"cka": 3, "rsa": 3, "cka_unbiased": 4}


def _check_not_shared(target: nn.Module, guide: nn.Module) -> None:
    """Refuse a guide that shares parameters with the target: freezing it would freeze the target."""
    target_params = {id(p) for p in target.parameters()}
    shared = [name for name, p in guide.named_parameters() if id(p) in target_params]
    if shared:
        raise ValueError(
            f"the guide shares {len(shared)} parameters with the target (e.g. {shared[0]!r}); "
            "freezing the guide would freeze the target: give the guide its own copy (copy.deepcopy)"
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
class GuidanceOutput:
    """What one guided forward returns.

    `output` is the target's own output, `guidance_loss` is alpha times the
    weighted sum over pairs of (1 - similarity), a scalar to add to the task
    loss. `similarities` holds each pair's similarity as a detached scalar
    tensor keyed `target<-guide` (tensors, so a GPU step does not wait on a
    host copy per pair).
    """

    output: Any
    guidance_loss: Tensor
    alpha: float
    similarities: dict[str, Tensor] = field(default_factory=dict)


class Guidance(nn.Module):
    """Adds representational guidance toward a frozen guide to any target model.

        guidance = Guidance(target, guide, alpha=1.0)
        out = guidance(x)                  # the target runs once, the guide without grad
        loss = F.cross_entropy(out.output, y) + out.guidance_loss

    Neither model is modified: layers are captured with forward hooks,
    registered once. The guide is frozen (eval mode, no gradients, run under
    no_grad) and stays in eval mode whatever `.train()` is called on.

    Args:
        target: the network being trained (may be wrapped in DDP or compiled).
        guide: the frozen network whose representations pull on the target's.
        alpha: weight of the alignment term (ignored when `schedule` is given).
        pairs: explicit (target_layer, guide_layer[, weight]) pairs. Default:
            the guide's layers spread evenly over the target's.
        target_layers, guide_layers: module paths or globs to capture; default
            `capture.default_layers` of each model.
        similarity: `cka` (biased linear CKA, the paper's), `cka_unbiased`,
            `rsa`, or any callable (n, d1), (n, d2) -> scalar.
        schedule: an AlphaSchedule; the step counts training-mode forwards.
        guide_input: `same` (the guide sees the batch) or `noise` (Gaussian
            noise of the batch's shape, the authors' option).
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
        guide: nn.Module,
        alpha: float = 1.0,
        pairs: Sequence[PairSpec] | None = None,
        target_layers: Sequence[str] | None = None,
        guide_layers: Sequence[str] | None = None,
        similarity: str | Similarity = "cka",
        schedule: AlphaSchedule | None = None,
        guide_input: str = "same",
        sequence_mode: str = "flatten",
        gather: Callable[[Tensor], Tensor] | None = None,
        gram_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if guide_input not in GUIDE_INPUTS:
            raise ValueError(f"guide_input {guide_input!r} is not one of {', '.join(GUIDE_INPUTS)}")
        if sequence_mode not in SEQUENCE_MODES:
            raise ValueError(f"sequence_mode {sequence_mode!r} is not one of {', '.join(SEQUENCE_MODES)}")
        _check_not_shared(target, guide)
        self.target = target
        self.guide = freeze(guide)
        self.schedule = schedule if schedule is not None else AlphaSchedule(alpha=alpha)
        self.similarity = get_similarity(similarity)
        self.min_examples = MIN_EXAMPLES.get(similarity) if isinstance(similarity, str) else None
        self.guide_input = guide_input
        self.sequence_mode = sequence_mode
        self.gather = gather
        self.gram_dtype = gram_dtype
        if pairs is not None:
            pair_list = [make_pair(spec) for spec in pairs]
            target_layers = target_layers or list(dict.fromkeys(p.target for p in pair_list))
            guide_layers = guide_layers or list(dict.fromkeys(p.guide for p in pair_list))
        self.target_capture = LayerCapture(target, target_layers)
        self.guide_capture = LayerCapture(guide, guide_layers)
        if pairs is None:
            pair_list = spread_pairs(self.target_capture.names, self.guide_capture.names)
        self.pairs: list[Pair] = check_pairs(pair_list, self.target_capture.names, self.guide_capture.names)
        self.step = 0  # training-mode forwards so far; drives the schedule

    def get_extra_state(self) -> dict[str, int]:
        # Saved with the state dict so a resumed run continues the alpha schedule.
        return {"step": self.step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])

    def train(self, mode: bool = True) -> "Guidance":
        self.training = mode
        self.target.train(mode)
        freeze(self.guide)
        return self

    @property
    def alpha(self) -> float:
        """alpha at the current step."""
        return self.schedule(self.step)

    def _guide_input(self, x: Tensor, guide_x: Tensor | None) -> Tensor:
        if guide_x is not None:
            return guide_x
        if self.guide_input == "noise":
            if not torch.is_floating_point(x):
                raise ValueError("guide_input='noise' needs floating-point inputs, got token ids")
            return torch.randn_like(x)
        return x

    def run_guide(self, x: Tensor, reduce: Callable[[str, Tensor], Any] | None = None) -> dict[str, Any]:
        """The guide's activations on x (batch, ...) by layer, frozen and without gradients.

        `reduce(layer, activation)`, when given, runs as each guide layer
        finishes and its result is kept instead of the activation.
        """
        freeze(self.guide)
        with torch.no_grad():
            return self.guide_capture.run(x, transform=reduce)[1]

    def guide_grams(self, target_acts: dict[str, Tensor], mask: Tensor | None) -> Callable[[str, Tensor], Any] | None:
        """How each guide layer is reduced as it finishes, or None where the activations themselves are needed.

        With biased CKA on each process's own batch, a guide layer whose pairs
        all compare in sample space becomes a `GuideGram`; other layers stay
        activations. None for other measures, a batch gathered over
        processes, or masks and sequence modes on (batch, time, features) pairs.
        """
        if self.similarity is not linear_cka or not self._local_batch():
            return None
        sequences = any(act.dim() == 3 for act in target_acts.values())
        if sequences and (mask is not None or self.sequence_mode != "flatten"):
            return None
        widths: dict[str, list[int]] = {}
        for pair in self.pairs:
            act = target_acts[pair.target]
            widths.setdefault(pair.guide, []).append(act.numel() // act.shape[0])

        def reduce(layer: str, act: Tensor) -> Any:
            n = act.shape[0]
            d = act.numel() // n
            if layer in widths and all(sample_space_is_cheaper(n, width, d) for width in widths[layer]):
                return GuideGram(centred_gram(act, self.gram_dtype))
            return act

        return reduce

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
        guide_activations: dict[str, Tensor] | None = None,
    ) -> GuidanceOutput:
        """Run the target once on x and compute the guidance loss.

        Args:
            x: the batch, (batch, ...), as the target takes it.
            mask: (batch, time) bool, True on real tokens, for sequence activations.
            guide_x: a different input for the guide (default: x, or noise).
            guide_activations: precomputed guide activations by layer (a cache);
                the guide is then not run.
        Returns:
            GuidanceOutput. In training mode the schedule's step advances by one.
        """
        alpha = self.alpha
        # Off schedule (after "guidance as initialisation"), skip the guide
        # entirely: the step is as cheap as unguided training.
        if alpha == 0.0 and self.training:
            output = self.target(x)
            self._advance()
            return GuidanceOutput(output, torch.zeros((), device=_device_of(output, x)), 0.0)
        output, target_acts = self.target_capture.run(x)
        reduce = self.guide_grams(target_acts, mask)
        if reduce is not None:
            self._check_batch(next(iter(target_acts.values())).shape[0] if target_acts else None)
        if guide_activations is None:
            guide_side = self.run_guide(self._guide_input(x, guide_x), reduce)
        elif reduce is not None:
            with torch.no_grad():
                guide_side = {name: reduce(name, act) for name, act in guide_activations.items()}
        else:
            guide_side = guide_activations
        if reduce is None and self.gather is not None:
            target_acts = {name: self.gather(act) for name, act in target_acts.items()}
            guide_side = {name: self.gather(act) for name, act in guide_side.items()}
            mask = self.gather(mask) if mask is not None else None
        self._check_batch(next(iter(target_acts.values())).shape[0] if target_acts else None)
        sims = self._similarities(target_acts, guide_side, mask)
        terms = [pair.weight * (1.0 - sims[pair.key]) for pair in self.pairs]
        similarities = {pair.key: sims[pair.key].detach() for pair in self.pairs}
        guidance_loss = alpha * torch.stack(terms).sum()
        self._advance()
        return GuidanceOutput(output, guidance_loss, alpha, similarities)

    def _similarities(
        self, target_acts: dict[str, Tensor], guide_side: dict[str, Any], mask: Tensor | None
    ) -> dict[str, Tensor]:
        """Each pair's similarity by key; the pairs of a target layer with guide Gram matrices share one kernel."""
        sims: dict[str, Tensor] = {}
        by_target: dict[str, list[Pair]] = {}
        for pair in self.pairs:
            if isinstance(guide_side[pair.guide], GuideGram):
                by_target.setdefault(pair.target, []).append(pair)
            else:
                sims[pair.key] = self.pair_similarity(target_acts[pair.target], guide_side[pair.guide], mask)
        for target, pairs in by_target.items():
            grams = torch.stack([guide_side[pair.guide].matrix for pair in pairs])
            values = linear_cka_to_grams(target_acts[target].flatten(1), grams, self.gram_dtype)
            sims.update(zip([pair.key for pair in pairs], values.unbind()))
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
        """Take the forward hooks off both models."""
        self.target_capture.remove()
        self.guide_capture.remove()


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
        rows = [("target layer", "shape", "guide layer", "shape", "weight", "similarity")]
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
