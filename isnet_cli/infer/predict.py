"""Batch inference over files: checkpoint (torch) or exported ONNX (onnxruntime, no torch import).

One home for "run a model on preprocessed inputs": `load_backend` gives an object with `classes`,
`contract`, `model_id`, `logits(x)` and, where possible, `relevance(x)`; predict, evaluate and audit
all use it. Files are preprocessed with `isnet_cli.io.preprocess` and the contract stored with the
model; nothing here re-implements preprocessing. Torch is imported only for checkpoints.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from isnet_cli.errors import InputError, IsnetError
from isnet_cli.infer.onnx_runtime import OnnxModel, model_id, softmax
from isnet_cli.io.contract import InputContract


class Backend(Protocol):
    """What predict/evaluate/audit need from a model, whatever runs it."""

    path: Path
    meta: dict[str, Any]
    classes: list[str]
    contract: InputContract
    model_id: str

    @property
    def description(self) -> str: ...

    @property
    def has_relevance(self) -> bool: ...

    def logits(self, x: np.ndarray) -> np.ndarray: ...

    def relevance(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class TorchModel:
    """A checkpoint on torch; `relevance` runs the LRP engine on the predicted class."""

    def __init__(self, path: Path, device: str = "auto") -> None:
        import torch

        from isnet_cli.device import resolve_device
        from isnet_cli.infer.checkpoint import load_checkpoint

        self.torch = torch
        self.path = path
        self.device = resolve_device(device)
        self.model, self.meta = load_checkpoint(path, device=str(self.device))
        self.classes = list(self.meta["classes"])
        self.contract = InputContract.from_dict(self.meta["contract"])
        self.model_id = model_id(path)
        self._lrp: Any = None

    @property
    def description(self) -> str:
        return f"{self.path.name} ({self.meta.get('arch', '?')}, torch {self.device})"

    @property
    def has_relevance(self) -> bool:
        return True

    def logits(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device))
        return out.float().cpu().numpy()

    def relevance(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """LRP relevance (B, C, S, S) of the predicted class, with the epsilon and input bounds of the model."""
        if self._lrp is None:
            from isnet_cli.lrp import LRP

            eps = float((self.meta.get("isnet") or {}).get("eps", 0.01))
            self._lrp = LRP(self.model, epsilon=eps, low=self.contract.low, high=self.contract.high)
        xt = self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        with self.torch.no_grad():
            r = self._lrp(xt, "predicted")
        return self._lrp.logits.detach().float().cpu().numpy(), r.detach().float().cpu().numpy()


def load_backend(model: str | Path | None, device: str = "auto", runs_dir: str | Path = "runs") -> Backend:
    """Resolve `--model` (checkpoint, run folder, .onnx, or None = newest run) and load it.

    An `.onnx` model runs on onnxruntime and never imports torch.
    """
    from isnet_cli.infer.checkpoint import resolve_model

    path = Path(resolve_model(None if model is None else str(model), runs_dir=runs_dir))
    if path.suffix.lower() == ".onnx":
        return OnnxModel(path, device=device)
    return TorchModel(path, device=device)


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


def decide(probs: np.ndarray, classes: list[str], threshold: float | None) -> list[str]:
    """Predicted class per row: argmax, or for two classes `classes[1]` iff p_1 >= threshold."""
    if threshold is None:
        return [classes[i] for i in probs.argmax(axis=1)]
    return [classes[1] if p >= threshold else classes[0] for p in probs[:, 1]]


def check_threshold(threshold: float | None, classes: list[str]) -> None:
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
        good = []
        for sample, prepared in batch:
            if isinstance(prepared, Exception):
                if fail_fast:
                    raise prepared
                yield Failure(str(sample.image), str(prepared))
            else:
                good.append((sample, prepared))
        if good:
            x = np.stack([p.x for _, p in good])
            probs = softmax(np.asarray(backend.logits(x), dtype=np.float64))
            for (sample, prepared), row, pred in zip(
                good, probs, decide(probs, backend.classes, threshold), strict=True
            ):
                yield Prediction(
                    file=str(sample.image),
                    probabilities={c: round(float(p), 6) for c, p in zip(backend.classes, row, strict=True)},
                    predicted=pred,
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
