"""Input fuzzing: corrupted variants of real and synthetic images, each decoded in a guarded worker.

`make_cases` writes the variants (truncations, byte flips in header and pixel data, lying DICOM
attributes, wrong transfer syntaxes, NaN rescales, pixel bombs, non-image files) into a folder;
`run_cases` feeds them one by one to a worker process that calls `load_image`, with a per-file timeout
and an address-space limit, and sorts each outcome into decoded / clean error / crash / hang. A clean
error is an `InputError` whose message is one line naming the file; anything else that escapes, a
dead worker or an image that is not float32 (H, W) in [0, 1] is a crash. Shared by
`tests/test_fuzz_inputs.py` (a fast subset) and `benchmarks/fuzz_inputs.py` (the full run).
"""

from __future__ import annotations

import json
import os
import random
import select
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"
WORKER_MEMORY = 3 * 2**30  # address-space limit of the worker: a decompression bomb dies, it does not swap

# The worker: read one path per line, answer one JSON line. Runs `load_image` exactly as the CLI does.
_WORKER = r"""
import json, resource, sys, warnings
import numpy as np
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
warnings.simplefilter("ignore")
from isnet_cli.errors import InputError
from isnet_cli.io.images import load_image
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    path = line.rstrip("\n")
    try:
        d = load_image(path)
        img = d.image
        ok = (img.dtype == np.float32 and img.ndim == 2 and bool(np.isfinite(img).all())
              and float(img.min()) >= 0.0 and float(img.max()) <= 1.0)
        out = {"outcome": "decoded" if ok else "crash", "detail": f"{img.dtype} {list(img.shape)}"}
    except InputError as exc:
        msg = str(exc)
        clean = "\n" not in msg and path in msg
        out = {"outcome": "error" if clean else "crash", "detail": msg}
    except BaseException as exc:
        out = {"outcome": "crash", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    # VmHWM: this process's own peak (ru_maxrss would include the RSS of the process that forked it)
    with open("/proc/self/status") as status:
        out["rss_mb"] = next(int(v.split()[1]) for v in status if v.startswith("VmHWM:")) / 1024
    print(json.dumps(out), flush=True)
"""


@dataclass
class Case:
    """One fuzzed file and how it was made."""

    path: Path
    kind: str


@dataclass
class Tally:
    """Outcome counts of a fuzz run, the crashes and hangs by case, and the worker's peak memory."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    log: list[tuple[str, str, str]] = field(default_factory=list)
    peak_rss_mb: float = 0.0

    @property
    def tried(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        c = self.counts
        return (
            f"cases tried {self.tried}, decoded {c['decoded']}, clean errors {c['error']}, "
            f"crashes {c['crash']}, hangs {c['hang']}, worker peak RSS {self.peak_rss_mb:.0f} MB"
        )


# ---------------------------------------------------------------------------------------------- sources


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking 8-bit grey PNG whose IHDR claims width x height but whose IDAT holds one row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x80" * min(width, 1024))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _sources(work: Path) -> list[Path]:
    """Files to corrupt: the shared real DICOMs (when present) and the project's own DICOMs, PNGs, NIfTI."""
    import SimpleITK as sitk
    from PIL import Image

    from isnet_cli.io.dicom import write_dicom

    src = work / "sources"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(0.5, 0.15, (48, 40)), 0, 1)
    files = sorted(SHARED_DICOM.glob("*.dcm")) if SHARED_DICOM.is_dir() else []
    files.append(write_dicom(src / "synth8.dcm", img, bits=8))
    files.append(write_dicom(src / "synth16_mono1.dcm", img, photometric="MONOCHROME1", bits=16))
    files.append(write_dicom(src / "synth12_rle.dcm", img, bits=12, compression="rle"))
    Image.fromarray((img * 255).astype(np.uint8)).save(src / "synth8.png")
    Image.fromarray((img * 65535).astype(np.uint16)).save(src / "synth16.png")
    files += [src / "synth8.png", src / "synth16.png"]
    sitk.WriteImage(sitk.GetImageFromArray(img.astype(np.float32)), str(src / "synth.nii.gz"))
    files.append(src / "synth.nii.gz")
    return files


# ---------------------------------------------------------------------------------------------- mutations


def _dicom_edits() -> list[tuple[str, Callable[[object], None]]]:
    """Header lies, each applied to a parsed DICOM dataset before it is written back."""
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

    def setter(keyword: str, value: object) -> Callable[[object], None]:
        def apply(ds: object) -> None:
            setattr(ds, keyword, value)

        return apply

    def syntax(uid: str) -> Callable[[object], None]:
        def apply(ds: object) -> None:
            ds.file_meta.TransferSyntaxUID = uid  # type: ignore[attr-defined]

        return apply

    def scale(keyword: str, factor: float) -> Callable[[object], None]:
        def apply(ds: object) -> None:
            setattr(ds, keyword, max(0, min(65535, int(getattr(ds, keyword) * factor))))

        return apply

    edits: list[tuple[str, Callable[[object], None]]] = [
        ("syntax-j2k", syntax(JPEG2000Lossless)),
        ("syntax-jpeg", syntax(JPEGBaseline8Bit)),
        ("syntax-rle", syntax(RLELossless)),
        ("syntax-bigendian", syntax("1.2.840.10008.1.2.2")),
        ("syntax-implicit", syntax("1.2.840.10008.1.2")),
        ("syntax-garbage", syntax("1.2.3.4.5.6")),
        ("rows-x2", scale("Rows", 2)),
        ("rows-half", scale("Rows", 0.5)),
        ("cols-x2", scale("Columns", 2)),
        ("rows-0", setter("Rows", 0)),
        ("cols-max", setter("Columns", 65535)),
        ("rows-cols-max", lambda ds: (setter("Rows", 65535)(ds), setter("Columns", 65535)(ds))),
        ("bits-alloc-1", setter("BitsAllocated", 1)),
        ("bits-alloc-7", setter("BitsAllocated", 7)),
        ("bits-alloc-32", setter("BitsAllocated", 32)),
        ("bits-alloc-64", setter("BitsAllocated", 64)),
        ("bits-alloc-0", setter("BitsAllocated", 0)),
        ("bits-stored-40", setter("BitsStored", 40)),
        ("high-bit-0", setter("HighBit", 0)),
        ("signed-flip", lambda ds: setattr(ds, "PixelRepresentation", 1 - int(ds.get("PixelRepresentation", 0)))),
        ("samples-3", setter("SamplesPerPixel", 3)),
        ("frames-0", setter("NumberOfFrames", 0)),
        ("frames-1000", setter("NumberOfFrames", 1000)),
        ("photometric-junk", setter("PhotometricInterpretation", "JUNK")),
        ("rescale-nan", lambda ds: (setter("RescaleSlope", "NaN")(ds), setter("RescaleIntercept", "0")(ds))),
        ("rescale-inf", lambda ds: (setter("RescaleSlope", "1e308")(ds), setter("RescaleIntercept", "1e308")(ds))),
        ("intercept-nan", setter("RescaleIntercept", "NaN")),
        ("window-nan", lambda ds: (setter("WindowCenter", "NaN")(ds), setter("WindowWidth", "NaN")(ds))),
        ("window-0", lambda ds: (setter("WindowCenter", "0")(ds), setter("WindowWidth", "0")(ds))),
        ("window-negative", lambda ds: (setter("WindowCenter", "100")(ds), setter("WindowWidth", "-5")(ds))),
        ("padding-all", setter("PixelPaddingValue", 0)),
        ("pixeldata-empty", setter("PixelData", b"")),
        ("pixeldata-odd", lambda ds: setattr(ds, "PixelData", bytes(ds.PixelData)[:-1])),
        ("no-pixeldata", lambda ds: delattr(ds, "PixelData")),
    ]
    return edits


def _edit_dicom(source: Path, target: Path, edit: Callable[[object], None]) -> bool:
    """Write `source` with `edit` applied to `target`; False when pydicom will not write the lie."""
    import warnings

    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(source, force=True)
            edit(ds)
            ds.save_as(target, enforce_file_format=False)
    except Exception:
        target.unlink(missing_ok=True)
        return False
    return True


def _specials(out: Path) -> list[Case]:
    """The named hostile files of the issue that no mutation of a good file produces."""
    from PIL import Image

    cases = []
    (out / "empty.dcm").write_bytes(b"")
    (out / "empty.png").write_bytes(b"")
    (out / "x.dcm").mkdir(exist_ok=True)
    (out / "text.dcm").write_text("this is not an image\n" * 20)
    (out / "text.png").write_text("not a PNG either")
    (out / "text_nosuffix").write_text("plain text without a suffix")
    (out / "bomb_40000.png").write_bytes(png_claiming(40000, 40000))
    (out / "bomb_9000.png").write_bytes(png_claiming(9000, 9000))  # under Pillow's guard, over ours
    (out / "bomb_65535x1.png").write_bytes(png_claiming(65535, 1))
    Image.fromarray(np.full((32, 32), 1234, np.uint16)).save(out / "flat16.png")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(out / "one_pixel.png")
    import SimpleITK as sitk

    nan = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    nan[3, 3] = np.nan  # MetaImage keeps NaN (the NIfTI writer turns it into 0)
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(out / "nan.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4000, 4000, 4), np.uint8)), str(out / "volume.nii.gz"))
    for name in (
        "empty.dcm",
        "empty.png",
        "x.dcm",
        "text.dcm",
        "text.png",
        "text_nosuffix",
        "bomb_40000.png",
        "bomb_9000.png",
        "bomb_65535x1.png",
        "flat16.png",
        "one_pixel.png",
        "nan.mha",
        "volume.nii.gz",
    ):
        cases.append(Case(out / name, f"special:{name}"))
    return cases


def make_cases(work: Path, seed: int = 0, truncations: int = 14, flips: int = 8) -> list[Case]:
    """Write every fuzz case under `work/cases`; the same seed gives the same files."""
    rng = random.Random(seed)
    out = work / "cases"
    out.mkdir(parents=True, exist_ok=True)
    cases = _specials(out)
    for source in _sources(work):
        data = source.read_bytes()
        stem = source.name.replace(".", "_")
        suffix = ".nii.gz" if source.name.endswith(".nii.gz") else source.suffix
        n = len(data)
        offsets = sorted({0, 1, 8, 131, 132, n - 1, *(rng.randrange(1, n) for _ in range(truncations - 6))})
        for off in offsets:
            path = out / f"{stem}_trunc{off}{suffix}"
            path.write_bytes(data[:off])
            cases.append(Case(path, "truncation"))
        header = min(n, 1024)
        for i in range(flips):
            for region, lo, hi in (("header", 0, header), ("pixels", header, n)):
                if hi <= lo:
                    continue
                buf = bytearray(data)
                for _ in range(rng.choice((1, 4, 32))):
                    buf[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
                path = out / f"{stem}_flip_{region}{i}{suffix}"
                path.write_bytes(bytes(buf))
                cases.append(Case(path, f"flip-{region}"))
        if suffix == ".dcm":
            for name, edit in _dicom_edits():
                path = out / f"{stem}_{name}.dcm"
                if _edit_dicom(source, path, edit):
                    cases.append(Case(path, f"dicom:{name}"))
    return cases


# ---------------------------------------------------------------------------------------------- runner


class _Worker:
    """A decoding subprocess; restarted after a crash or a hang."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(WORKER_MEMORY)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        ready = self._answer(120.0)
        if ready is None or not ready.get("ready"):
            self.kill()
            raise RuntimeError("fuzz worker did not start")

    def _answer(self, timeout: float) -> dict | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"outcome": "crash", "detail": f"worker died ({self.proc.poll()})"}

    def decode(self, path: Path, timeout: float) -> dict:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{path}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"outcome": "crash", "detail": "worker died"}
        answer = self._answer(timeout)
        return {"outcome": "hang", "detail": f"no answer in {timeout:g} s"} if answer is None else answer

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run_cases(cases: list[Case], timeout: float = 20.0) -> Tally:
    """Decode every case in a guarded worker; a crash or hang restarts the worker and is counted."""
    tally = Tally()
    worker = _Worker()
    try:
        for case in cases:
            start = time.monotonic()
            answer = worker.decode(case.path, timeout)
            outcome = answer["outcome"]
            tally.counts[outcome] += 1
            tally.log.append((case.kind, outcome, f"{case.path.name}: {answer['detail']}"[:200]))
            tally.peak_rss_mb = max(tally.peak_rss_mb, float(answer.get("rss_mb", 0.0)))
            if outcome in ("crash", "hang"):
                tally.failures.append(
                    (case.kind, str(case.path), f"{answer['detail']} ({time.monotonic() - start:.1f} s)")
                )
                worker.kill()
                worker = _Worker()
    finally:
        worker.kill()
    return tally
