"""Batch inference over files: probabilities and the predicted class, for a checkpoint (torch) or an
exported ONNX model (onnxruntime, no torch import), loaded by `isnet_cli.infer.loading`.

One home for "run a model on preprocessed inputs" (`iter_prepared`, used by predict, evaluate and
audit), for logits -> probabilities (`softmax`) and for the class decision with or without
`--threshold` (`predicted_classes`). Files are preprocessed with `isnet_cli.io.preprocess` and the
contract stored with the model; nothing here re-implements preprocessing.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.errors import InputError, IsnetError
from isnet_cli.infer.loading import Backend
from isnet_cli.io.contract import InputContract


@dataclass
class Prediction:
    """One input's result: `probabilities` per class name, the `predicted` class, the preprocessing record."""

    file: str
    probabilities: dict[str, float]
    predicted: str
    record: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    def to_json(self, model: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.file,
            "probabilities": self.probabilities,
            "predicted": self.predicted,
        }
        if self.label is not None:
            out["label"] = self.label
        out["preprocessing"] = self.record
        out["model_id"] = model
        return out


@dataclass
class Failure:
    """An input that could not be used; `message` is the one-line reason."""

    file: str
    message: str


def softmax(logits: np.ndarray) -> np.ndarray:
    """p_c = exp(z_c - max z) / sum_k exp(z_k - max z), row-wise."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predicted_classes(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Predicted class index per row: argmax, or for two classes 1 iff p_1 >= threshold."""
    if threshold is None:
        return probs.argmax(axis=1)
    return (probs[:, 1] >= threshold).astype(np.int64)


def check_threshold(threshold: float | None, classes: list[str]) -> None:
    """`--threshold` is for two-class models and must be a probability."""
    if threshold is None:
        return
    if len(classes) != 2:
        raise InputError(None, f"--threshold needs a two-class model; this one has {len(classes)} classes")
    if not 0.0 <= threshold <= 1.0:
        raise InputError(None, f"--threshold {threshold} is outside [0, 1]")


def _prepare(sample: Any, contract: InputContract, with_mask: bool) -> Any:
    """Preprocess one sample; returns the `Prepared` or the exception (the caller decides to skip or stop)."""
    from isnet_cli.io.preprocess import preprocess_file

    try:
        mask = sample.mask if with_mask else None
        return preprocess_file(sample.image, contract, mask_path=mask, mask_required=False)
    except IsnetError as exc:
        return exc
    except Exception as exc:  # any decoder failure is a bad file, reported with its path
        return InputError(sample.image, f"cannot read ({type(exc).__name__}: {exc})")


def iter_prepared(
    samples: list[Any], contract: InputContract, batch_size: int, with_mask: bool = False, workers: int = 0
) -> Iterator[list[tuple[Any, Any]]]:
    """Yield batches of `(sample, Prepared | Exception)` in input order.

    Decoding runs on `workers` threads, one batch ahead: the next batch decodes while the caller
    runs the model on the current one.
    """
    workers = workers or min(4, os.cpu_count() or 1)
    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def submit(chunk: list[Any]) -> list[Any]:
            return [pool.submit(_prepare, s, contract, with_mask) for s in chunk]

        ahead = submit(chunks[0]) if chunks else []
        for i, chunk in enumerate(chunks):
            current, ahead = ahead, submit(chunks[i + 1]) if i + 1 < len(chunks) else []
            yield [(s, f.result()) for s, f in zip(chunk, current, strict=True)]


def usable(batch: list[tuple[Any, Any]], fail_fast: bool) -> tuple[list[tuple[Any, Any]], list[Failure]]:
    """Split a batch of `iter_prepared` into the decoded `(sample, Prepared)` pairs and the failures;
    with `fail_fast` the first failure is raised instead."""
    good, failed = [], []
    for sample, prepared in batch:
        if isinstance(prepared, Exception):
            if fail_fast:
                raise prepared
            failed.append(Failure(str(sample.image), str(prepared)))
        else:
            good.append((sample, prepared))
    return good, failed


def predict_samples(
    backend: Backend,
    samples: list[Any],
    batch_size: int = 16,
    threshold: float | None = None,
    fail_fast: bool = False,
    workers: int = 0,
    on_batch: Any = None,
) -> Iterator[Prediction | Failure]:
    """Predictions and failures, in input order. `on_batch(n)` is called after every batch (progress)."""
    check_threshold(threshold, backend.classes)
    for batch in iter_prepared(samples, backend.contract, batch_size, workers=workers):
        good, failed = usable(batch, fail_fast)
        yield from failed
        if good:
            x = np.stack([p.x for _, p in good])
            probs = softmax(np.asarray(backend.logits(x), dtype=np.float64))
            for (sample, prepared), row, pred in zip(good, probs, predicted_classes(probs, threshold), strict=True):
                yield Prediction(
                    file=str(sample.image),
                    probabilities={c: round(float(p), 6) for c, p in zip(backend.classes, row, strict=True)},
                    predicted=backend.classes[int(pred)],
                    record=prepared.record,
                    label=getattr(sample, "label", None),
                )
        if on_batch is not None:
            on_batch(len(batch))


def _key(file: str) -> str:
    """Identity of an input across runs: its resolved absolute path."""
    return str(Path(file).expanduser().resolve())


class ResultsFile:
    """Append-only results file (CSV, or JSON lines when the name ends in .jsonl/.json) that `--resume` continues.

    Rows are flushed after each batch, so a killed run keeps everything written before; a partial
    last line (killed mid-write) is dropped on resume and that input is predicted again.
    """

    def __init__(self, path: Path, classes: list[str], resume: bool, overwrite: bool) -> None:
        self.path = path
        self.classes = classes
        self.jsonl = path.suffix.lower() in (".jsonl", ".json")
        self.columns = ["file", "predicted", *[f"p_{c}" for c in classes], "model_id"]
        self.done: set[str] = set()
        exists = path.exists() and path.stat().st_size > 0
        if exists and not (resume or overwrite):
            raise InputError(path, "results file exists", "pass --resume to continue it or --overwrite to replace it")
        if exists and resume:
            self._read_existing()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "a" if exists and resume else "w", newline="")  # noqa: SIM115 (closed in close())
        self.writer = None if self.jsonl else csv.DictWriter(self.fh, fieldnames=self.columns)
        if self.writer is not None and not (exists and resume):
            self.writer.writeheader()

    def _read_existing(self) -> None:
        raw = self.path.read_bytes()
        if not raw.endswith(b"\n"):
            # A run killed mid-line: keep every complete row, redo the cut one.
            cut = raw.rfind(b"\n") + 1
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)
            raw = raw[:cut]
        text = raw.decode("utf-8")
        if self.jsonl:
            for line in text.splitlines():
                if line.strip():
                    self.done.add(_key(json.loads(line)["file"]))
            return
        rows = list(csv.reader(text.splitlines()))
        if rows and rows[0] != self.columns:
            raise InputError(
                self.path,
                f"columns {rows[0]} do not match this model's {self.columns}",
                "resume with the model that wrote it, or write to a new file",
            )
        self.done = {_key(r[0]) for r in rows[1:] if r}

    def is_done(self, file: str) -> bool:
        return _key(file) in self.done

    def write(self, prediction: Prediction, model: str) -> None:
        if self.jsonl:
            self.fh.write(json.dumps(prediction.to_json(model)) + "\n")
        else:
            assert self.writer is not None
            row = {"file": prediction.file, "predicted": prediction.predicted, "model_id": model}
            row.update({f"p_{c}": prediction.probabilities[c] for c in self.classes})
            self.writer.writerow(row)
        self.done.add(_key(prediction.file))

    def flush(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


def pending(samples: Iterable[Any], results: ResultsFile | None) -> list[Any]:
    """Samples not yet in `results` (all of them without a results file)."""
    return [s for s in samples if results is None or not results.is_done(str(s.image))]
