"""Manifests, folder trees, the real data's labels.csv, splits, the cache and augmentation."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from isnet_cli.errors import InputError
from isnet_cli.io.contract import InputContract
from isnet_cli.io.dataset import XrayDataset, augment_pair, read_dataset, split_samples
from isnet_cli.io.inputs import expand_inputs
from isnet_cli.synth import synthesize


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("small"), n=24, size=48, bias=1.0, seed=1)


def test_manifest_reading(small_set):
    spec = read_dataset(small_set)
    assert spec.classes == ["normal", "opacity"]
    assert len(spec.samples) == 24 and all(s.image.is_file() and s.mask.is_file() for s in spec.samples)
    assert read_dataset(small_set.parent).samples == spec.samples  # a folder with manifest.csv


def test_folder_tree(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        (tmp_path / "masks" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 100, np.uint8)).save(tmp_path / "images" / cls / f"{cls}{i}.png")
            Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "masks" / cls / f"{cls}{i}.png")
    spec = read_dataset(tmp_path)
    assert spec.classes == ["a", "b"] and len(spec.samples) == 6
    assert all(s.mask.stem == s.image.stem and s.label == s.image.parent.name for s in spec.samples)


@pytest.mark.parametrize(
    "folder, n, counts, names",
    [
        ("ieee8023_gb100", 98, {"0": 34, "1": 64}, ["covid19", "non_covid"]),
        ("tb_shenzhen_montgomery72", 72, {"1": 72}, ["tb"]),
    ],
)
def test_real_labels_csv(shared_data, folder, n, counts, names):
    """Extra columns are ignored; `label` (numeric codes here) is the class column unless another is chosen."""
    spec = read_dataset(shared_data / folder / "labels.csv")
    assert len(spec.samples) == n and spec.classes == sorted(counts)
    assert {c: sum(s.label == c for s in spec.samples) for c in spec.classes} == counts
    named = read_dataset(shared_data / folder, label_column="label_name")
    assert named.classes == names


def test_manifest_errors(tmp_path, small_set):
    with open(small_set, newline="") as f:
        rows = list(csv.DictReader(f))
    bad = tmp_path / "m.csv"
    with open(bad, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "mask", "diagnosis"])
        w.writeheader()
        for r in rows[:3]:
            w.writerow({"image": str(small_set.parent / r["image"]), "mask": "", "diagnosis": r["label"]})
    with pytest.raises(InputError, match=r"m.csv: no label column 'label' \(columns: image, mask, diagnosis\)"):
        read_dataset(bad)
    assert read_dataset(bad, label_column="diagnosis").classes
    with pytest.raises(InputError, match="no label column 'grade'"):
        read_dataset(bad, label_column="grade")
    missing = tmp_path / "missing.csv"
    missing.write_text("image,mask,label\ngone.png,gone_mask.png,normal\n")
    with pytest.raises(InputError, match=r"gone.png: listed in the dataset but not found \(1 more missing\)"):
        read_dataset(missing)


def test_split_is_stratified_and_deterministic(small_set):
    samples = read_dataset(small_set).samples
    train, val = split_samples(samples, val_fraction=0.25, seed=0)
    assert len(val) == 6 and sum(s.label == "opacity" for s in val) == 3
    assert split_samples(samples, 0.25, 0) == (train, val)
    assert split_samples(samples, 0.25, 1)[1] != val
    assert not {s.image for s in train} & {s.image for s in val}


def test_split_column_is_used(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("image,mask,label,split\na.png,,x,train\nb.png,,x,val\nc.png,,y,test\nd.png,,y,train\n")
    train, val = split_samples(read_dataset(m, check_files=False).samples)
    assert [s.image.name for s in train] == ["a.png", "d.png"] and [s.image.name for s in val] == ["b.png"]


def test_dataset_items_and_cache(tmp_path, small_set):
    spec = read_dataset(small_set)
    contract = InputContract(size=32, channels=3)
    ds = XrayDataset(spec.samples, spec.classes, contract, cache_dir=tmp_path / "cache")
    x, m, y = ds[0]
    assert x.shape == (3, 32, 32) and m.shape == (1, 32, 32) and y.dtype == torch.long
    assert x.min() >= 0.0 and x.max() <= 1.0 and set(m.unique().tolist()) <= {0.0, 1.0} and m.sum() > 50
    for i in range(len(ds)):
        ds[i]
    assert ds.decode_count == len(ds)
    epoch1 = [ds[i][0] for i in range(len(ds))]  # second epoch: everything from the cache
    assert ds.decode_count == len(ds)
    fresh = XrayDataset(spec.samples, spec.classes, contract, cache_dir=tmp_path / "cache")
    assert all(torch.equal(fresh[i][0], epoch1[i]) for i in range(len(ds))) and fresh.decode_count == 0
    other = XrayDataset(spec.samples, spec.classes, InputContract(size=24), cache_dir=tmp_path / "cache")
    other[0]
    assert other.decode_count == 1  # other settings miss the cache


def test_dataset_requires_masks(tmp_path, small_set):
    spec = read_dataset(small_set)
    no_mask = [type(s)(s.image, None, s.label) for s in spec.samples[:2]]
    with pytest.raises(InputError, match="no mask for this image"):
        XrayDataset(no_mask, spec.classes, InputContract(size=32))[0]
    _x, m, _ = XrayDataset(no_mask, spec.classes, InputContract(size=32), require_masks=False)[0]
    assert m.min() == 1.0


def test_prefetch_reports_every_bad_file(tmp_path, small_set):
    spec = read_dataset(small_set)
    broken = [type(s)(tmp_path / f"gone{i}.png", s.mask, s.label) for i, s in enumerate(spec.samples[:2])]
    ds = XrayDataset(broken + spec.samples[2:6], spec.classes, InputContract(size=32), cache_dir=tmp_path / "c")
    errors = ds.prefetch()
    assert [e.path for e in errors] == [str(tmp_path / "gone0.png"), str(tmp_path / "gone1.png")]
    assert ds.decode_count == 4
    ds[2], ds[5]
    assert ds.decode_count == 4  # the rest is cached


def test_augmentation_moves_image_and_mask_together_without_flips():
    torch.manual_seed(0)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:40, 8:24] = 1.0  # left half only
    x = mask.repeat(3, 1, 1) * 0.8
    for _ in range(10):
        xa, ma = augment_pair(x, mask)
        assert set(ma.unique().tolist()) <= {0.0, 1.0}
        agree = ((xa[0] > 0.4) == (ma[0] > 0.5)).float().mean()
        assert agree > 0.97
        cols = torch.nonzero(ma[0])[:, 1].float()
        assert cols.mean() < 28  # still on the left: no flip


def test_expand_inputs(tmp_path, small_set):
    folder = small_set.parent
    assert len(expand_inputs([str(small_set)])) == 24
    assert len(expand_inputs([str(folder)])) == 24  # a dataset folder: its manifest, not its masks
    plain = tmp_path / "plain"
    (plain / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(plain / "sub" / "x.png")
    (plain / "notes.txt").write_text("not an image")
    assert [s.image.name for s in expand_inputs([str(plain)])] == ["x.png"]
    with pytest.raises(InputError, match="file not found"):
        expand_inputs([str(tmp_path / "nope.dcm")])
