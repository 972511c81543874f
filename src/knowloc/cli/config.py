"""``--config FILE``: a run's ``config.yaml`` (or a file in its schema) as the defaults of a
command's options."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .logs import one_line
from .parsers import csv_list

log = logging.getLogger(__name__)


#: The sections (or ``section.key``) of a run's ``config.yaml`` each command reads.
CONFIG_SECTIONS: dict[str, tuple[str, ...]] = {
    "localize": ("model", "dataset", "localize", "seed"),
    "reproduce": ("model", "preset", "seed", "modify.ppl_text", "consistency.n_boot",
                  "consistency.boot_seed"),
    "modify": ("model", "modify"),
    "intervene": ("model", "intervene"),
    "attention": ("model", "attention"),
}


#: ``section.key`` -> option dest where the names differ; ``!dest``: a flag that negates it.
_CONFIG_DESTS = {
    "model.name": "model", "dataset.source": "dataset", "preset.name": "preset",
    "localize.methods": "method", "preset.methods": "method", "modify.methods": "method",
    "intervene.methods": "method", "attention.methods": "method",
    "modify.ops": "op", "modify.sets": "edit_set",
    "intervene.only_known": "!all_queries", "attention.only_known": "!all_queries",
    "preset.modify": "!no_modify", "preset.attention": "!no_attention",
}


#: What a run records for the reader (sizes, results, the fingerprint): read by no command.
_CONFIG_RECORDED = {"fingerprint", "dataset.n_facts", "dataset.n_queries",
                    "dataset.n_facts_loaded", "dataset.n_queries_loaded", "dataset.skipped",
                    "preset.description", "modify.ppl"}


def _config_schema() -> dict[str, dict[str, Any] | None]:
    """Section -> its keys with their defaults (None for a top-level value): the one schema
    every run's ``config.yaml`` is written in (:func:`knowloc.study.spec.config_schema`),
    plus the dataset sizes older versions wrote under other names."""
    from ..study.spec import config_schema

    schema = config_schema()
    dataset = schema["dataset"]
    assert dataset is not None
    dataset.update(dict.fromkeys(("n_facts_loaded", "n_queries_loaded")))
    return schema


def _read_config_file(path: Path) -> dict:
    import yaml

    path = path.expanduser()
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path} is not valid YAML ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} does not hold a mapping of sections")
    return data


def config_defaults(command: str, path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The option defaults the config file ``path`` sets for ``command`` (dest -> value).

    The file has the schema of a run's ``config.yaml``; a key outside it is a
    :class:`ConfigError` naming it, as is a value of the wrong type, and a value that only
    Python can set (no option has it) unless it is that setting's default. Sections the
    command does not use are ignored.
    """
    if command not in CONFIG_SECTIONS:
        raise ConfigError(f"knowloc {command} takes no --config")
    data = _read_config_file(path)
    schema = _config_schema()
    values: dict[str, tuple[str, Any]] = {}  # section.key -> (section, value)
    for section, content in data.items():
        if section not in schema:
            raise ConfigError(f"--config {path}: unknown key {section!r} (known: "
                              f"{', '.join(schema)})")
        keys = schema[section]
        if keys is None:
            values[section] = (section, content)
            continue
        if not isinstance(content, dict):
            raise ConfigError(f"--config {path}: {section} must be a mapping of keys")
        for key, value in content.items():
            if key not in keys:
                raise ConfigError(f"--config {path}: unknown key '{section}.{key}' (known in "
                                  f"{section}: {', '.join(keys)})")
            values[f"{section}.{key}"] = (section, value)
    actions = {a.dest: a for a in parser._actions}
    wanted = CONFIG_SECTIONS[command]
    out: dict[str, Any] = {}
    for name, (section, value) in values.items():
        if name in _CONFIG_RECORDED or (section not in wanted and name not in wanted):
            continue
        key = name.split(".", 1)[-1]
        if name in ("localize.selection", "preset.selection"):
            if not (isinstance(value, dict) and set(value) == {"mode", "value"}):
                raise ConfigError(f"--config {path}: {name} must hold mode and value")
            if section == "preset":
                out.setdefault("preset_fields", {})[key] = value
            else:
                out.update(_config_option(actions["selection"], name, value["mode"], path),
                           threshold=_config_option(actions["threshold"], name,
                                                    value["value"], path)["threshold"])
            continue
        if key == "ppl_text":
            from ..evaluation import BUILTIN_CORPUS

            out["ppl_text"] = None if value in (None, BUILTIN_CORPUS) else Path(str(value))
            continue
        dest = _CONFIG_DESTS.get(name, key)
        if dest.startswith("!"):
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}: {name} must be true or false")
            out[dest[1:]] = not value
        elif dest in actions:
            out.update(_config_option(actions[dest], name, value, path))
        elif section == "preset":
            out.setdefault("preset_fields", {})[key] = value
        else:
            default = (schema[section] or {}).get(key)
            if value != default:
                raise ConfigError(f"--config {path}: {name} = {value!r} has no command-line "
                                  f"option; knowloc {command} uses {default!r} (set it from "
                                  "Python)")
    return out


def _config_option(action: argparse.Action, name: str, value: Any, path: Path) -> dict[str, Any]:
    """``{dest: value}`` for one config value, checked like the option's own value."""
    if value is None:
        return {action.dest: None}
    bad = ConfigError(f"--config {path}: {name} = {value!r} is not a valid "
                      f"{'/'.join(action.option_strings)} value")
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise bad
    elif action.type is csv_list:
        if isinstance(value, str):
            value = csv_list(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = list(value)
        else:
            raise bad
    elif action.type in (int, float):
        kinds = (int,) if action.type is int else (int, float)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise bad
        value = action.type(value)
    elif action.type is Path:
        value = Path(str(value))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # --split-threshold: a number or 'otsu'
    elif not isinstance(value, str):
        raise bad
    if action.choices is not None and value not in action.choices:
        raise bad
    return {action.dest: value}
