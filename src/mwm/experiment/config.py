"""The experiment file: which data, how regions are made, and the grid of masking strategies.

A YAML file with these sections (``configs/phantom-brain-mri.yaml`` is a complete example;
``docs/experiment.md`` documents every key)::

    name: phantom-brain-mri
    data: {phantoms: {modality: brain-mri, n: 600, size: 128, seed: 0}}   # or {images: DIR}
    localize: {prompt: brain tumor, clip: {seconds: 240}, m2ib: {layer: 1},
               postprocess: {method: kmeans, top_k: 1}}                      # or model: NAME
               # also: objective, temperature, contrast, abstain (docs/presence.md)
    pretrain: {model: resnet18, input_size: 128, epochs: 6, batch_size: 32}
    evaluate: [{name: linear, mode: linear, epochs: 30}]
    seeds: [0, 1, 2]
    reference: random-60          # or a list: [random-60, random-70, random-matched]
    strategies:
      - {name: scratch, masking: none}
      - {name: random-60, masking: random, ratio: 0.6}
      - {name: region-80-40, masking: region, ratio_salient: 0.8, ratio_background: 0.4}
      - {name: random-matched, masking: random, ratio: {match: region-80-40}}
      - {name: region-80-40-gt, masking: region, ratio_salient: 0.8, ratio_background: 0.4,
         regions: ground_truth}

Every key is checked when the file is read: a typo is an error naming the file, the
section and the keys that section accepts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import load_yaml
from ..errors import DataError
from ..masking import MASKINGS, MaskingParams
from .hypotheses import parse_hypotheses

#: A strategy without pretraining (the encoder's random initialization), beside the
#: registered masking strategies (:data:`mwm.masking.MASKINGS`).
NO_PRETRAINING = "none"
# Where a strategy's regions come from: the prompt's localized masks, the dataset's own
# masks (an upper bound on what localization can give), or the continuous saliency maps.
REGION_SOURCES = ("localized", "ground_truth", "saliency")
MASKING_PARAMS = {f.name for f in dataclasses.fields(MaskingParams)}
STRATEGY_KEYS = {"name", "masking", "regions"} | MASKING_PARAMS
# Pretraining / evaluation keys a strategy or cell sets itself, so the file may not.
CELL_OWNED = {"images", "regions", "out", "masking", "seed", "resume", "quiet", "data", "weights",
              "device"} | MASKING_PARAMS


@dataclass
class Strategy:
    name: str
    masking: str
    regions: str = "localized"
    params: dict = field(default_factory=dict)  # ratio, ratio_salient, ... as PretrainConfig takes
    # ``ratio: {match: NAME}``: the ratio is the mean overall mask ratio strategy NAME gives
    # the train images, filled into ``params`` once the regions exist
    # (:func:`mwm.experiment.matched.resolve_matched`), with what it was computed from.
    match: str | None = None
    match_views: int = 0  # augmented views per image to average over (0: the images as they are)
    matched: dict | None = None

    @property
    def resolved(self) -> bool:
        return self.match is None or "ratio" in self.params

    @property
    def pretrains(self) -> bool:
        return self.masking != NO_PRETRAINING

    @property
    def reads_regions(self) -> bool:
        return self.pretrains and MASKINGS.get(self.masking).needs_regions


@dataclass
class ExperimentConfig:
    name: str
    data: dict
    localize: dict
    pretrain: dict
    evaluate: list[dict]
    seeds: list[int]
    strategies: list[Strategy]
    reference: str | None = None          # the first of ``references`` (the Δ of old files)
    source: str = "<code>"
    references: list[str] = field(default_factory=list)  # every strategy others are compared to
    hypotheses: Any = None  # mwm.experiment.hypotheses.Hypotheses: the pre-registered tests

    def __post_init__(self) -> None:
        if not self.references and self.reference is not None:
            self.references = [self.reference]
        self.reference = self.references[0] if self.references else None

    @property
    def train_data(self) -> dict:
        """The data the encoders and regions depend on: ``data`` without the separate
        evaluation phantoms, so enlarging the evaluation set reuses every pretraining."""
        return {k: v for k, v in self.data.items() if k != "eval_phantoms"}

    @property
    def held_out_phantoms(self) -> dict | None:
        """``data.eval_phantoms`` with its default seed filled in (None without it)."""
        held_out = self.data.get("eval_phantoms")
        return {"seed": EVAL_SEED_DEFAULT, **held_out} if held_out else None

    def needs_localization(self) -> bool:
        return any(s.reads_regions and s.regions != "ground_truth" for s in self.strategies)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, *parts: Any) -> str:
        """A short hash of settings, so results made with other settings are never reused."""
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_experiment(path: str | Path) -> ExperimentConfig:
    return parse_experiment(load_yaml(path), source=str(path))


def parse_experiment(raw: dict, source: str = "<code>") -> ExperimentConfig:
    _check_keys(raw, {"name", "data", "localize", "pretrain", "evaluate", "seeds", "strategies",
                      "reference", "hypotheses"}, source, "top level")
    for key in ("data", "pretrain", "evaluate", "strategies"):
        if key not in raw:
            raise DataError(f"{source}: the experiment needs a '{key}' section.")
    if not isinstance(raw["strategies"], list) or not raw["strategies"]:
        raise DataError(f"{source}: strategies must be a non-empty list.")
    strategies = [_strategy(item, source) for item in raw["strategies"]]
    names = [s.name for s in strategies]
    if len(set(names)) != len(names):
        raise DataError(f"{source}: strategy names must be unique, got {names}.")
    evaluate = raw["evaluate"] if isinstance(raw["evaluate"], list) else [raw["evaluate"]]
    config = ExperimentConfig(
        name=str(raw.get("name", Path(source).stem)), data=_data(raw["data"], source),
        localize=dict(raw.get("localize") or {}), pretrain=_owned_free(raw["pretrain"], source, "pretrain"),
        evaluate=[_evaluation(item, source) for item in evaluate],
        seeds=[int(s) for s in raw.get("seeds", [0])], strategies=strategies,
        references=_references(raw.get("reference"), source), source=source)
    _check_sections(config)
    _check_matches(config)
    _check_held_out_tasks(config)
    config.hypotheses = parse_hypotheses(
        raw.get("hypotheses"),
        {item["name"]: (task_of(item).primary, tuple(task_of(item).metrics))
         for item in config.evaluate}, names, source)
    return config


def _references(value: Any, source: str) -> list[str]:
    """``reference``: one strategy name, or a list of them (each gets its own Δ)."""
    if value is None:
        return []
    names = value if isinstance(value, list) else [value]
    if not all(isinstance(n, str) for n in names):
        raise DataError(f"{source}: reference must be a strategy name or a list of names, "
                        f"got {value!r}.")
    if len(set(names)) != len(names):
        raise DataError(f"{source}: reference lists a strategy twice: {names}.")
    return list(names)


def _require_mapping(section: Any, source: str, where: str) -> None:
    if not isinstance(section, dict):
        raise DataError(f"{source}: '{where}' must be a mapping, got {type(section).__name__}.")


def _check_keys(section: Any, allowed: set, source: str, where: str) -> None:
    _require_mapping(section, source, where)
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise DataError(f"{source}: unknown key(s) {unknown} in {where}; accepted: {sorted(allowed)}.")


def _owned_free(section: dict, source: str, where: str) -> dict:
    _require_mapping(section, source, where)
    clash = sorted(set(section) & CELL_OWNED)
    if clash:
        raise DataError(f"{source}: {where} may not set {clash}: each cell sets them "
                        "(masking settings belong to 'strategies', seeds to 'seeds').")
    return dict(section)


def _strategy(item: dict, source: str) -> Strategy:
    _require_mapping(item, source, "strategies[]")
    _check_keys(item, STRATEGY_KEYS, source, f"strategy {item.get('name', '?')}")
    maskings = (NO_PRETRAINING, *MASKINGS.names())
    if "name" not in item or "masking" not in item:
        raise DataError(f"{source}: every strategy needs a name and a masking {maskings}.")
    if item["masking"] not in maskings:
        raise DataError(f"{source}: strategy {item['name']}: masking must be one of {maskings}.")
    continuous = item["masking"] in MASKINGS and MASKINGS.get(item["masking"]).continuous
    regions = item.get("regions", "saliency" if continuous else "localized")
    if regions not in REGION_SOURCES:
        raise DataError(f"{source}: strategy {item['name']}: regions must be one of {REGION_SOURCES}.")
    name = str(item["name"])
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise DataError(f"{source}: strategy name {name!r}: use letters, digits, '-', '_' or '.' "
                        "(it names a folder).")
    params = {k: v for k, v in item.items() if k not in ("name", "masking", "regions")}
    match, views = _match_of(params, item["masking"], name, source)
    return Strategy(name, item["masking"], regions, params, match, views)


#: The keys of ``ratio: {match: NAME, views: N}``.
MATCH, VIEWS = "match", "views"


def _match_of(params: dict, masking: str, name: str, source: str) -> tuple[str | None, int]:
    """The strategy named by ``ratio: {match: NAME[, views: N]}`` and N (the ratio is
    removed from ``params`` until it is resolved), or (None, 0) for a plain ratio."""
    ratio = params.get("ratio")
    if not isinstance(ratio, dict):
        return None, 0
    views = ratio.get(VIEWS, 0)
    if (MATCH not in ratio or not set(ratio) <= {MATCH, VIEWS} or not isinstance(ratio[MATCH], str)
            or not isinstance(views, int) or isinstance(views, bool) or views < 0):
        raise DataError(f"{source}: strategy {name}: ratio must be a number or "
                        f"{{{MATCH}: STRATEGY}} (optionally with {VIEWS}: N, N >= 0 augmented "
                        f"views per image), got {ratio!r}.")
    if masking == NO_PRETRAINING or "ratio" not in MASKINGS.get(masking).params:
        takes = [m for m in MASKINGS.names() if "ratio" in MASKINGS.get(m).params]
        raise DataError(f"{source}: strategy {name}: ratio.{MATCH} sets the ratio of a masking "
                        f"that takes one ({', '.join(takes)}); masking {masking} has none.")
    del params["ratio"]
    return ratio[MATCH], views


def _check_matches(config: ExperimentConfig) -> None:
    """``ratio.match`` names another strategy that reads regions and has a ratio of its own."""
    by_name = {s.name: s for s in config.strategies}
    for strategy in config.strategies:
        if strategy.match is None:
            continue
        where = f"{config.source}: strategy {strategy.name}: ratio.{MATCH} {strategy.match!r}"
        target = by_name.get(strategy.match)
        if target is None:
            raise DataError(f"{where} is not a strategy ({sorted(by_name)}).")
        if not target.reads_regions:
            readers = [m for m in MASKINGS.names() if MASKINGS.get(m).needs_regions]
            raise DataError(f"{where} masks without regions (masking {target.masking}); name a "
                            f"strategy whose masking reads them ({', '.join(readers)}).")
        if target.match is not None:
            raise DataError(f"{where} has a matched ratio itself; match the strategy it "
                            f"matches ({target.match!r}).")


def _evaluation(item: dict, source: str) -> dict:
    item = _owned_free(item, source, "evaluate")
    if "name" not in item:
        raise DataError(f"{source}: every evaluation needs a name (it names the column).")
    task_of(item, source)
    return item


def task_of(item: dict, source: str = "<code>"):
    """The registered task of an ``evaluate`` entry. Files written before tasks existed name
    none: they were classifications, linear probes where ``mode: linear``."""
    from ..downstream.tasks import TASKS

    name = item.get("task") or ("linear-probe" if item.get("mode") == "linear" else "finetune")
    if name not in TASKS:
        raise DataError(f"{source}: evaluation {item.get('name')!r}: unknown task {name!r}; "
                        f"choose one of {', '.join(TASKS.names())}.")
    task = TASKS.get(name)
    for key, value in task.fixed.items():
        if key in item and item[key] != value:
            raise DataError(f"{source}: evaluation {item.get('name')!r}: task {name} fixes "
                            f"{key}: {value!r}; drop {key}: {item[key]!r}.")
    return task


#: ``data.eval_phantoms.seed`` when left out (the training phantoms' default seed is 0).
EVAL_SEED_DEFAULT = 1
#: How the shipped paper-scale configs mark the path a user must fill in.
PLACEHOLDER = "/path/to/"


def _data(section: dict, source: str) -> dict:
    _check_keys(section, {"phantoms", "images", "eval_phantoms"}, source, "data")
    if ("phantoms" in section) == ("images" in section):
        raise DataError(f"{source}: data needs exactly one of 'phantoms' (generated) or "
                        "'images' (a folder or manifest with labels and splits).")
    if "phantoms" in section:
        _check_keys(section["phantoms"], {"modality", "n", "size", "seed", "findings"}, source,
                    "data.phantoms")
    elif str(section["images"]).startswith(PLACEHOLDER):
        raise DataError(f"{source}: data.images is still the placeholder {section['images']!r}; "
                        "edit the file to point at your dataset (a folder or a CSV manifest "
                        "with labels and splits, see docs/data.md).")
    if "eval_phantoms" in section:
        _check_eval_phantoms(section, source)
    return dict(section)


def _check_held_out_tasks(config: ExperimentConfig) -> None:
    """The held-out manifest has labels and masks but no COCO files: detection reads its
    own instances_<split>.json."""
    if not config.held_out_phantoms:
        return
    for item in config.evaluate:
        if task_of(item).name == "detect":
            raise DataError(f"{config.source}: evaluation {item['name']!r} (task detect) cannot "
                            "use data.eval_phantoms (detection reads the phantoms' own COCO "
                            "splits); drop eval_phantoms or the detect evaluation.")


def _check_eval_phantoms(section: dict, source: str) -> None:
    """``data.eval_phantoms: {n, seed}``: evaluation images generated apart from the
    training phantoms (same modality, size and findings; another seed, so no image is
    shared)."""
    where = f"{source}: data.eval_phantoms"
    if "phantoms" not in section:
        raise DataError(f"{where} needs data.phantoms (a dataset of your own has its own "
                        "val/test splits).")
    held_out = section["eval_phantoms"]
    _check_keys(held_out, {"n", "seed"}, source, "data.eval_phantoms")
    n, seed = held_out.get("n"), held_out.get("seed", EVAL_SEED_DEFAULT)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"{where}.n must be a whole number of images >= 1, got {n!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"{where}.seed must be a whole number >= 0, got {seed!r}.")
    if seed == section["phantoms"].get("seed", 0):  # 0: mwm phantoms' default seed
        given = "" if "seed" in held_out else " (its default)"
        raise DataError(f"{where}.seed {seed}{given} is the training phantoms' seed: the two "
                        "sets would share their first images. Choose another seed.")


def _check_sections(config: ExperimentConfig) -> None:
    source = config.source
    _check_keys(config.localize, {"prompt", "model", "clip", "m2ib", "postprocess", "batch_size",
                                  *PRESENCE_KEYS}, source, "localize")
    _check_presence_keys(config.localize, source)
    if config.needs_localization():
        if "prompt" not in config.localize:
            raise DataError(f"{source}: localize.prompt is needed (the text that decides where "
                            "the masks go).")
        if ("clip" in config.localize) == ("model" in config.localize):
            raise DataError(f"{source}: localize needs exactly one of 'model' (a vision-language "
                            "model) or 'clip' (train a small CLIP on the data's captions).")
    _check_fields(config, source)
    names = {s.name for s in config.strategies}
    for reference in config.references:
        if reference not in names:
            raise DataError(f"{source}: reference {reference!r} is not a strategy ({sorted(names)}).")
    if not config.seeds:
        raise DataError(f"{source}: seeds must list at least one seed.")


#: The localize keys of contrast prompts and abstention (``mwm localize``'s flags of the
#: same names; ``objective`` and ``temperature`` are M2IB settings, given here or in m2ib).
PRESENCE_KEYS = ("objective", "temperature", "contrast", "abstain")


def _check_presence_keys(localize: dict, source: str) -> None:
    m2ib = localize.get("m2ib") or {}
    for key in ("objective", "temperature"):
        if key in localize and key in m2ib:
            raise DataError(f"{source}: localize.{key} and localize.m2ib.{key} are both given; "
                            "give it once.")
    settings = {key: localize[key] for key in ("objective", "temperature") if key in localize}
    if settings:
        from ..localize.m2ib import M2IBConfig

        try:
            M2IBConfig(**settings).validate()
        except DataError as err:
            raise DataError(f"{source}: localize: {err}") from err
    if "abstain" in localize and not isinstance(localize["abstain"], bool):
        raise DataError(f"{source}: localize.abstain must be true or false, got "
                        f"{localize['abstain']!r}.")
    if "contrast" in localize:
        contrast = localize["contrast"]
        lists = isinstance(contrast, list) and contrast and all(isinstance(c, str)
                                                                for c in contrast)
        if not (isinstance(contrast, (str, dict)) or lists):
            raise DataError(f"{source}: localize.contrast must be 'a|b', a list of prompts, or "
                            f"a mapping {{prompt: [contrast, ...]}}, got {contrast!r}.")
        objective = localize.get("objective", m2ib.get("objective"))
        if objective != "contrastive" and not localize.get("abstain"):
            raise DataError(f"{source}: localize.contrast is read by objective: contrastive and "
                            "abstain: true; with neither it would change nothing.")


def _check_fields(config: ExperimentConfig, source: str) -> None:
    """Section keys must be fields of the settings object they configure."""
    from ..clip.train import config_fields as clip_fields
    from ..localize.m2ib import M2IBConfig
    from ..localize.postprocess import PostprocessConfig
    from ..pretrain.train import PretrainConfig

    def fields(cls) -> set:
        return {f.name for f in dataclasses.fields(cls)}

    _check_keys(config.pretrain, fields(PretrainConfig) - CELL_OWNED, source, "pretrain")
    for item in config.evaluate:
        task = task_of(item, source)
        allowed = (task.settings() - CELL_OWNED) | set(task.fixed) | {"name", "task"}
        _check_keys(item, allowed, source, f"evaluate ({item['name']}, task {task.name})")
    _check_keys(config.localize.get("m2ib") or {}, fields(M2IBConfig), source, "localize.m2ib")
    clip = config.localize.get("clip")
    if clip is not None:
        _check_keys(clip, clip_fields() | {"seconds"}, source, "localize.clip")
    _check_keys(config.localize.get("postprocess") or {}, fields(PostprocessConfig), source,
                "localize.postprocess")
