"""Synthetic phantoms with exact region masks and an optional background shortcut: chest X-rays
(`kind="chest"`, grey; `chest`) and faces (`kind="faces"`, colour; `faces`), drawn from the shapes and the
side-marker glyph of `shapes`, written as a data set by `dataset.synthesize`.

Deterministic for a seed: image i depends only on (seed, i) and its label.
"""

from isnet_cli.synth.chest import implant_lesion, make_phantom
from isnet_cli.synth.dataset import DEFAULT_CLASSES, marker_probability, parse_bias, synthesize
from isnet_cli.synth.faces import make_face
from isnet_cli.synth.shapes import draw_marker

__all__ = [
    "DEFAULT_CLASSES",
    "draw_marker",
    "implant_lesion",
    "make_face",
    "make_phantom",
    "marker_probability",
    "parse_bias",
    "synthesize",
]
