"""Models by name. Importing this package registers every built-in model."""

from untrainable.models import cnn1d, fcn, resnet, rnn, transformer, vit  # noqa: F401  (registration)
from untrainable.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
