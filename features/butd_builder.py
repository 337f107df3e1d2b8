"""Building a BUTD detector from command-line options: the selection rule, the network config, the weight file and
the backend (native or detectron2). Kept apart from the network (`features.butd`) so that the weight loaders and the
detectron2 backend, which both need the network, are not needed by it.
"""

from __future__ import annotations

from dataclasses import fields, replace

from features.butd import BUTDConfig, BUTDDetector
from features.detector_checkpoints import load_butd_weights
from features.detectron2_backend import Detectron2BUTDDetector
from features.errors import FeaturesError
from features.selection import SelectionRule, rule_from_name


def build_butd_r101_c4(weights: str | None = None, *, config: BUTDConfig | None = None, preset: str = "r101",
                       selection: SelectionRule | str | None = None, box_mode: str | None = None,
                       weights_format: str = "auto", backend: str = "native", **options) -> BUTDDetector:
    """The registry's builder: a BUTD detector, optionally loading a published checkpoint (any supported format).

    `selection` is a rule or a rule name (`butd`, `vmb`, `fixed-36`, `maxnms-36`, `two-stage-100`; see
    `features.selection`); `box_mode` defaults to the boxes the rule's NMS sees. Other keyword options (strings from the
    command line's `--option KEY=VALUE` included) override one `SelectionRule` field (`min_boxes=36`) or one
    `BUTDConfig` field (`min_size=800`); `preset="tiny"` starts from the test-sized network. Unless `config` is
    given, the config follows the weight file where the file decides (attribute head present, Caffe anchors).
    `backend="detectron2"` builds the same network through detectron2 (see `features.detectron2_backend`).
    """
    if backend not in ("native", "detectron2"):
        raise FeaturesError(f"butd-r101-c4: backend must be 'native' or 'detectron2', got {backend!r}")
    rule_fields = {f.name for f in fields(SelectionRule)} - {"name"}
    config_fields = {f.name for f in fields(BUTDConfig) if f.init}
    unknown = sorted(set(options) - rule_fields - config_fields)
    if unknown:
        raise FeaturesError(f"butd-r101-c4: unknown option(s) {', '.join(unknown)}; options are preset, selection, "
                            f"box_mode, weights_format, backend, {', '.join(sorted(rule_fields | config_fields))}")
    rule_options = {k: v for k, v in options.items() if k in rule_fields}
    config_options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if k in config_fields}
    try:
        if isinstance(selection, SelectionRule):
            rule = SelectionRule(**{**selection.as_dict(), **rule_options})
        else:
            rule = rule_from_name(selection or "butd", **rule_options)
    except (TypeError, ValueError) as e:
        raise FeaturesError(f"butd-r101-c4: bad selection options: {e}") from e
    if preset not in ("r101", "tiny"):
        raise FeaturesError(f"butd-r101-c4: preset must be 'r101' or 'tiny', got {preset!r}")
    explicit_config = config is not None
    if config is None:
        config = BUTDConfig.tiny(**config_options) if preset == "tiny" else BUTDConfig(**config_options)
    elif config_options:
        config = replace(config, **config_options)
    state, info = None, None
    if weights is not None:
        state, info, adapted = load_butd_weights(weights, config, weights_format, adapt_config=not explicit_config)
        config = replace(adapted, **config_options)  # options the user set win over the file's suggestions
    if backend == "detectron2":
        detector = Detectron2BUTDDetector(config, selection=rule, box_mode=box_mode, weights_info=info)
        if state is not None:
            detector.load_native_state_dict(state)
    else:
        detector = BUTDDetector(config, selection=rule, box_mode=box_mode, weights_info=info)
        if state is not None:
            detector.model.load_state_dict(state, strict=True)
    return detector.eval()

