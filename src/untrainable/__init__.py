"""untrainable: train hard-to-train networks by guiding their layers toward a frozen guide network.

Library:
    Guidance          the guidance loss around any (target, guide) pair of models, or several guides
    Guide             one guide among several: its model, name, pairs or layers, alpha or schedule
    GuidanceOutput    what a guided forward returns
    AlphaSchedule     constant, first-N-steps, linear or cosine alpha
    AdaptiveAlpha     alpha measured from the task's and the guidance's gradient norms
    LayerCapture      forward-hook capture of layers by path, glob or type
    Pair, spread_pairs  which guide layer pulls on which target layer
    linear_cka, linear_cka_unbiased, rsa, get_similarity   similarity measures
    RunConfig, load_config, train   the training loop used by the command line
    create_model, list_models, load_data, list_datasets     registries
"""

from untrainable.adaptive_alpha import AdaptiveAlpha
from untrainable.capture import LayerCapture
from untrainable.guidance import Guidance, GuidanceOutput, Guide, describe_pairs
from untrainable.pairing import Pair, spread_pairs
from untrainable.schedule import AlphaSchedule
from untrainable.similarity import get_similarity, linear_cka, linear_cka_unbiased, list_similarities, rsa

__version__ = "0.1.0"

__all__ = [
    "AdaptiveAlpha",
    "AlphaSchedule",
    "Guidance",
    "GuidanceOutput",
    "Guide",
    "LayerCapture",
    "Pair",
    "RunConfig",
    "create_model",
    "describe_pairs",
    "get_similarity",
    "linear_cka",
    "linear_cka_unbiased",
    "list_datasets",
    "list_models",
    "list_similarities",
    "load_config",
    "load_data",
    "rsa",
    "spread_pairs",
    "train",
]


def __getattr__(name: str):
    # The trainer, configs and registries pull in data and plotting packages:
    # import them only when asked for.
    if name in ("RunConfig", "load_config"):
        from untrainable import config

        return getattr(config, name)
    if name == "train":
        from untrainable.trainer import train

        return train
    if name in ("create_model", "list_models"):
        from untrainable import models

        return getattr(models, name)
    if name in ("load_data", "list_datasets"):
        from untrainable import data

        return getattr(data, name)
    raise AttributeError(f"module 'untrainable' has no attribute {name!r}")
