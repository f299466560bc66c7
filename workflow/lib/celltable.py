"""The one place that turns the config and its preset into experiment cells.

Everything a cell could get wrong is checked here, before any cell runs: unknown preset,
framework, model or key, wrong types, impossible cells (prompt longer than the model's
context, budget outside (0, 1], prefill mode a framework lacks, duplicate cells).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import jsonschema
import yaml

from frameworks import models, registry
from frameworks.harness.spec import CellSpec, SpecError

REPO = Path(__file__).resolve().parents[2]
PRESETS = REPO / "config" / "presets"
SCHEMAS = REPO / "workflow" / "schemas"


class ConfigError(ValueError):
    """The configuration or preset cannot be run; the message says what and where."""


def _schema_check(doc: dict, schema_file: str, what: str) -> None:
    schema = yaml.safe_load((SCHEMAS / schema_file).read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors[:10]:
            where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
            msg = e.message
            if e.validator == "additionalProperties":
                msg = f"unknown key: {e.message}"
            elif "propertyNames" in e.schema_path:
                msg = f"unknown key {e.instance!r}; allowed: {_allowed(e.validator, e.validator_value)}"
            elif e.validator in ("oneOf", "anyOf"):  # jsonschema's "is not valid under any of the given schemas"
                msg = f"{e.instance!r} is not allowed; allowed: " + ", or ".join(map(_describe, e.validator_value))
            lines.append(f"  {where}: {msg}")
        raise ConfigError(f"invalid {what}:\n" + "\n".join(lines))


def _allowed(validator: str, value) -> str:
    """What a propertyNames rule accepts, for the error message."""
    if validator == "enum":
        return ", ".join(map(str, value))
    if validator == "anyOf":
        return "; ".join(_allowed(k, v) for alt in value for k, v in alt.items())
    if validator == "pattern":
        return f"keys matching {value}"
    return str(value)


def _describe(schema: dict) -> str:
    """One alternative of a oneOf/anyOf, in words: 'an integer >= 1', "'all'"."""
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(map(repr, schema["enum"]))
    kind = {"integer": "an integer", "number": "a number", "string": "a string", "array": "a list",
            "object": "a mapping", "boolean": "true or false"}.get(schema.get("type"), str(schema.get("type", "a value")))
    bounds = [f"{op} {schema[k]}" for k, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                                                  ("exclusiveMaximum", "<")) if k in schema]
    return " ".join([kind, " and ".join(bounds)]).strip()


def validate_config(config: dict) -> None:
    _schema_check(config, "config.schema.yaml", "config (config/config.yaml or --config)")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}: no file {path.relative_to(REPO)}; known presets: {', '.join(preset_names())}")
    try:
        preset = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path.relative_to(REPO)} is not valid YAML: {e}") from None
    _schema_check(preset, "preset.schema.yaml", f"preset {path.relative_to(REPO)}")
    return preset


def _merge(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in (d or {}).items():
            out[k] = ({**out.get(k, {}), **v} if k == "policy" else v)
    return out


def build_cells(config: dict, preset: dict) -> dict[str, CellSpec]:
    """All cells selected by the config, keyed by their result path."""
    validate_config(config)
    fw_filter, model_filter, exp_filter = (set(config.get(k) or []) for k in ("frameworks", "models", "experiments"))
    for f in fw_filter - set(preset["frameworks"]):
        raise ConfigError(f"config frameworks: {f!r} is not in preset {config['preset']!r} (it has {sorted(preset['frameworks'])})")
    for e in exp_filter - set(preset["experiments"]):
        raise ConfigError(f"config experiments: {e!r} is not in preset {config['preset']!r} (it has {sorted(preset['experiments'])})")
    for m in model_filter:
        _known_model(m, "config models")

    cap_gb = gpu_memory_cap(config, preset)
    cells: dict[str, CellSpec] = {}
    for exp_name, exp in preset["experiments"].items():
        if exp_filter and exp_name not in exp_filter:
            continue
        exp_fws = exp.get("frameworks") or list(preset["frameworks"])
        for fw in exp_fws:
            if fw not in preset["frameworks"]:
                raise ConfigError(f"experiment {exp_name}: framework {fw!r} is not declared under the preset's frameworks")
        for fw in set(exp.get("per_framework") or {}) - set(exp_fws):
            raise ConfigError(f"experiment {exp_name}: per_framework names {fw!r}, which the experiment does not run")
        all_models = set(exp["models"]).union(*((o.get("models") or []) for o in (exp.get("per_framework") or {}).values()))
        for m in set(exp.get("per_model") or {}) - all_models:
            raise ConfigError(f"experiment {exp_name}: per_model names {m!r}, which the experiment does not run")
        for fw in exp_fws:
            if fw_filter and fw not in fw_filter:
                continue
            over = (exp.get("per_framework") or {}).get(fw, {})
            for model in over.get("models") or exp["models"]:
                if model_filter and model not in model_filter:
                    continue
                _known_model(model, f"experiment {exp_name}")
                # per_model (e.g. a real model's task and weights beside a trained one's), then per_framework
                per_model = (exp.get("per_model") or {}).get(model, {})
                params = _merge(preset["defaults"], preset["frameworks"][fw].get("params"), exp.get("params"),
                                per_model.get("params"), over.get("params"))
                sweep = {**(exp.get("sweep") or {}), **(per_model.get("sweep") or {}), **(over.get("sweep") or {})}
                if not models.supports(model, fw):
                    raise ConfigError(f"experiment {exp_name}: framework {fw} does not support model {model} "
                                      f"(registry: {models.entry(model)['frameworks']})")
                for point in itertools.product(*sweep.values()):
                    d = {**params, "experiment": exp_name, "framework": fw, "model": model,
                         "device": preset["device"], "dtype": preset["dtype"]}
                    d["gpu_memory_gb"] = cap_gb
                    for axis, value in zip(sweep, point):
                        if axis.startswith("policy."):  # one key of the framework's policy
                            d["policy"] = {**(d.get("policy") or {}), axis.removeprefix("policy."): value}
                        else:
                            d[axis] = value
                    spec = _spec(d, exp_name)
                    if spec.rel_path in cells:
                        raise ConfigError(f"experiment {exp_name}: two cells share the id {spec.cell_id} ({fw}, {model}); "
                                          "make the sweep values distinct")
                    cells[spec.rel_path] = spec
    if not cells:
        raise ConfigError("the config selects no cell: check the frameworks / models / experiments filters")
    return cells


def gpu_memory_cap(config: dict, preset: dict) -> float | None:
    """The GPU-memory cap of every cell, GB: the config's override (`off`: none), else the preset's."""
    override = config.get("gpu_memory_gb")
    cap = preset.get("gpu_memory_gb") if override is None else (None if override == "off" else override)
    if cap is not None and preset["device"] != "cuda":
        raise ConfigError(f"gpu_memory_gb {cap}: preset {config['preset']!r} runs on {preset['device']}; "
                          "a GPU-memory cap applies to cuda presets only")
    return None if cap is None else float(cap)


def _known_model(name: str, where: str) -> None:
    try:
        models.entry(name)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _spec(d: dict, exp_name: str) -> CellSpec:
    try:
        if isinstance(d.get("kv_budget"), int):
            d["kv_budget"] = float(d["kv_budget"])
        if isinstance(d.get("request_rate"), int):
            d["request_rate"] = float(d["request_rate"])
        spec = CellSpec.from_dict(d)
        spec.validate(max_context=models.max_context(spec.model))
        registry.get(spec.framework)
        return spec
    except (SpecError, TypeError, ValueError) as e:
        raise ConfigError(f"experiment {exp_name}: {e}") from None


def cells_from_config(config: dict) -> dict[str, CellSpec]:
    validate_config(config)
    return build_cells(config, load_preset(config["preset"]))


def explain_unknown_cell(path: str, config: dict) -> str:
    """Why `path` is not a cell of this run, and how to include it (instead of Snakemake's
    "No rule to produce …")."""
    filters = {k: config.get(k) for k in ("experiments", "frameworks", "models") if config.get(k)}
    chosen = f"preset {config.get('preset')!r}" + "".join(f", {k}={v}" for k, v in filters.items())
    how = ("no preset has it: add its point to an experiment's sweep in config/presets/<preset>.yaml, or pick one "
           "of the cells that `snakemake -n` lists")
    for name in [config.get("preset"), *(n for n in preset_names() if n != config.get("preset"))]:
        try:
            cells = build_cells({**config, "preset": name, "experiments": [], "frameworks": [], "models": []},
                                load_preset(name))
        except ConfigError:
            continue
        if path in cells:
            how = (f"it is a cell of preset {name!r} without the filters {filters}: drop them or add its "
                   f"{', '.join(filters)} to them" if name == config.get("preset")
                   else f"it is a cell of preset {name!r}: choose it with --config preset={name}")
            break
    return f"{path} is not a cell of {chosen}; {how}"
