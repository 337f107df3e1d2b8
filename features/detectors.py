"""The detector registry: name -> builder. Adding a detector is one module plus one line here."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import yaml

from features.errors import FeaturesError

if TYPE_CHECKING:  # the registry itself stays light: the command line reads it to parse --detector
    from features.detector import RegionDetector

# name -> "module:builder"; builders take (weights: str | None = None, **options) and return a RegionDetector.
DETECTORS: dict[str, str] = {
    "mobilenet-v2": "features.mobilenet:build_mobilenet_v2",
    "butd-r101-c4": "features.butd_builder:build_butd_r101_c4",
    "vmb-x152-fpn": "features.vmb:build_vmb_x152_fpn",
    "shapes": "features.mobilenet_rcnn:build_shapes_detector",
}


# given-box detector -> "module:function" finding a detector that proposes boxes for its features (or None)
BOX_FINDERS: dict[str, str] = {
    "mobilenet-v2": "features.mobilenet_rcnn:detector_for_features",
}


def box_detector_for(extractor: dict, directory: str | None = None, **options) -> RegionDetector | None:
    """A trained detector that finds the boxes of features made on given boxes (the store's `extractor`), so new
    images need no boxes file; None when the features' detector has no such finder or none is trained. `options`
    go to the found detector's builder."""
    target = BOX_FINDERS.get(str(extractor.get("detector")))
    if target is None:
        return None
    module_name, finder = target.split(":")
    return getattr(importlib.import_module(module_name), finder)(extractor, directory, **options)


def build_detector(name: str, weights: str | None = None, **options) -> RegionDetector:
    """Build a registered detector by name; modules are imported only when asked for."""
    if name not in DETECTORS:
        raise FeaturesError(f"unknown detector {name!r}; choose one of {', '.join(sorted(DETECTORS))}")
    module_name, builder = DETECTORS[name].split(":")
    return getattr(importlib.import_module(module_name), builder)(weights=weights, **options)


def detector_options(pairs: list[str]) -> dict:
    """`KEY=VALUE` detector options (`--option`) as builder keyword arguments, each value read as YAML."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FeaturesError(f"--option expects KEY=VALUE, got {pair!r}")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options
