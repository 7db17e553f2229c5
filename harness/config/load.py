"""Reading a config: YAML file, then CLI `key.sub=value` overrides, then defaults.

Precedence is CLI > file > the defaults in schema.py, applied in `load_config` and nowhere else;
foreign configs (a DeepSpeed JSON, an accelerate YAML) are merged in after, refusing contradictions.
Everything is validated once, here, before any rank starts work; a mistake is a `ConfigError`
naming the key and what it accepts. No torch is imported.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import os
import textwrap
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from harness.config import accelerate, deepspeed_json
from harness.config.schema import Config
from harness.config.validate import validate
from harness.errors import ConfigError


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Read `path`, apply `key.sub=value` overrides, build and validate the Config."""
    raw = _read_yaml(Path(path))
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(raw, key, value)
    if isinstance(raw.get("resume"), str):
        raw["resume"] = {"path": raw["resume"]}  # resume=auto is short for resume.path=auto
    slurm = raw.get("slurm")
    if isinstance(slurm, dict) and isinstance(slurm.get("container_mounts"), str):
        # pyxis's own form: --container-mounts=/lustre:/lustre,/scratch:/scratch
        slurm["container_mounts"] = [m for m in slurm["container_mounts"].split(",") if m]
    cfg = _build(Config, raw, prefix="")
    _fill_defaults(cfg, Path(path))
    explicit = set(_leaf_keys(raw))
    if cfg.parallel.accelerate_config:
        accelerate.merge_into_config(cfg, explicit)
    if cfg.parallel.deepspeed_config:
        deepspeed_json.merge_into_config(cfg, explicit)
    validate(cfg)
    return cfg


def load_config_for_world(path: str | os.PathLike, overrides: list[str], world_size: int) -> Config:
    """load_config, then the checks that need the number of ranks (harness estimate, check, submit)."""
    from harness.config.validate import validate_for_world

    if world_size < 1:
        raise ConfigError(f"--world-size must be >= 1 (got {world_size})")
    cfg = load_config(path, overrides)
    validate_for_world(cfg, world_size)
    return cfg


def _leaf_keys(raw: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys a file or the CLI set explicitly (what a DeepSpeed JSON may not contradict)."""
    keys = []
    for key, value in raw.items():
        if isinstance(value, dict) and key != "config":
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass a YAML file such as configs/tiny.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: fix the syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of sections (run:, train:, ...)")
    return raw


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key or key.startswith("-"):
        raise ConfigError(f"override {text!r} is not of the form key.sub=value (e.g. train.steps=20)")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[0] == "resume":  # resume=X is short for resume.path=X; both forms mix freely
        if isinstance(raw.get("resume"), str):
            raw["resume"] = {"path": raw["resume"]}
        if len(parts) == 1 and isinstance(value, str):
            parts = ["resume", "path"]
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}=... goes inside {'.'.join(parts[: i + 1])}, which is not a section")
        node = child
    node[parts[-1]] = value


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        raise ConfigError(f"unknown config key {prefix}{key}: {hint}valid keys here: {', '.join(names)}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        for alternative in alternatives[1:]:
            try:
                return _coerce(alternative, value, key)
            except ConfigError:
                pass
        return _coerce(alternatives[0], value, key)
    if origin is Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads a bare off/on/no/yes as a boolean.
            value = {False: "off", True: "on"}[value] if ({"off", "on"} & set(args)) else value
        if value not in args:
            allowed = ", ".join(str(a) for a in args)
            raise ConfigError(f"{key} must be one of {allowed} (got {_show(value)})")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list such as [1, 2] (got {_show(value)})")
        return [_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (got {_show(value)})")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (got {_show(value)})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer (got {_show(value)})")
        return value
    if tp is float:
        # YAML 1.1 reads 3e-4 (no dot) as a string; users write it anyway.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number (got {_show(value)})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (got {_show(value)})")
        return value
    raise TypeError(f"config field {key} has unsupported type {tp}")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _fill_defaults(cfg: Config, path: Path) -> None:
    if not cfg.run.name:
        cfg.run.name = path.stem
    if not cfg.run.dir:
        cfg.run.dir = str(Path("runs") / cfg.run.name)
    if not cfg.checkpoint.dir:
        cfg.checkpoint.dir = str(Path(cfg.run.dir) / "checkpoints")
    cfg.data.tokenizer = cfg.tokenizer_ref()


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def help_text(cls: type = Config, prefix: str = "") -> str:
    """Every key with its type, default and docstring; `harness train --help` prints this."""
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n{key}: {docs.get(f.name, '')}")
            lines.append(help_text(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {key} = {json.dumps(default)}  [{_type_name(tp)}]")
        lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        if type(None) in args:
            names.append("null")
        return " or ".join(names)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))
