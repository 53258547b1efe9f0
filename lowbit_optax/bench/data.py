"""Built-in data for the benchmark: nothing is downloaded.

* ``lm``: the English text of CPython's own ``pydoc_data.topics`` (present in every
  Python install) as a byte stream; the last 10% is held out for evaluation.
* ``digits``: scikit-learn's bundled 8x8 digits; 20% held out (stratified, seeded).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TextData:
    train: np.ndarray  # uint8 byte stream
    eval: np.ndarray
    vocab_size: int = 256


def pydoc_text(eval_fraction: float = 0.1) -> TextData:
    """Bytes of ``pydoc_data.topics`` in sorted-key order, split train/eval."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    split = int(len(data) * (1.0 - eval_fraction))
    return TextData(train=data[:split].copy(), eval=data[split:].copy())


def lm_batches(data: np.ndarray, batch_size: int, seq_len: int, seed: int):
    """Endless iterator of (inputs, targets) int32 arrays, random windows."""
    rng = np.random.default_rng(seed)
    hi = len(data) - seq_len - 1
    while True:
        starts = rng.integers(0, hi, size=batch_size)
        idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
        window = data[idx].astype(np.int32)
        yield window[:, :-1], window[:, 1:]


def lm_eval_batches(data: np.ndarray, batch_size: int, seq_len: int, max_batches: int):
    """Deterministic non-overlapping windows from the held-out text."""
    n = (len(data) - 1) // seq_len
    n = min(n, batch_size * max_batches)
    starts = np.arange(n) * seq_len
    out = []
    for i in range(0, n - batch_size + 1, batch_size):
        idx = starts[i : i + batch_size, None] + np.arange(seq_len + 1)[None, :]
        window = data[idx].astype(np.int32)
        out.append((window[:, :-1], window[:, 1:]))
    return out


@dataclasses.dataclass(frozen=True)
class DigitsData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    num_classes: int = 10


def digits(eval_fraction: float = 0.2, seed: int = 0) -> DigitsData:
    """scikit-learn's bundled digits, pixels scaled to [0, 1], stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    x_tr, x_ev, y_tr, y_ev = train_test_split(
        x, y, test_size=eval_fraction, random_state=seed, stratify=y
    )
    return DigitsData(x_tr, y_tr, x_ev, y_ev)
