"""Data sets by name. Importing this package registers every built-in data set."""

from untrainable.data import copy_paste, fashion_mnist, image_folder, image_store, mnist1d, parity, text  # noqa: F401
from untrainable.data.registry import DataSplits, list_datasets, load_data, register_dataset

__all__ = ["DataSplits", "list_datasets", "load_data", "register_dataset"]
