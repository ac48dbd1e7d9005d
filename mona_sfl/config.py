"""Typed run configuration: frozen dataclasses, loaded from TOML/YAML plus ``key=value`` overrides.

One config object describes a run completely. It is validated once, never rewritten after
loading (derived values are properties), and saved next to the results as ``config.toml``.
All leaves are scalars (bool, int, float, str) so that the same keys travel through Flower's
``run_config`` unchanged (see :func:`to_flat` / :func:`from_flat`).

This module imports neither torch nor any runtime.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

NUM_CUTS = 9  # every backbone in mona_sfl.models is split into 9 units
ARCHS = ("resnet18", "mobilenetv2")
NORMS = ("group", "batch")
SYMMETRIC = ("client", "original", "none")
DATASETS = ("synthetic", "cifar10", "cifar100", "svhn", "stl10", "imagefolder")
PARTITIONS = ("iid", "noniid", "dirichlet")
RUNTIMES = ("local", "ray", "flower")
CLIENT_SCHEDULES = ("epoch", "reference")
KNN_FEATURES = ("projector", "backbone")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration problem the user can fix; the CLI prints it and exits with code 2."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet18"
    cut: int = 2  # 1..9: how many backbone units run on the client
    width: float = 1.0  # channel multiplier (0.25 for fast CPU runs)
    norm: str = "group"  # group (reference) | batch
    weight_std: bool = True  # weight-standardised convolutions (reference)


@dataclass(frozen=True)
class AlgoConfig:
    align_momentum: bool = True  # True: MonAcoSFL (average momentum fronts at sync); False: MocoSFL
    K: int = 6000  # key queue length
    dim: int = 1024  # projector output dimension
    hidden_dim: int = 1024  # projector hidden width
    T: float = 0.1  # InfoNCE temperature
    m: float = 0.99  # client momentum (EMA) coefficient
    server_m: float = 0.99  # server momentum (EMA) coefficient
    symmetric: str = "client"  # client: [x1;x2]/[x2;x1] doubling (reference default) | original | none


@dataclass(frozen=True)
class DataConfig:
    name: str = "synthetic"
    dir: str = ""  # data directory (torchvision root or ImageFolder root)
    download: bool = False
    partition: str = "iid"  # iid | noniid (label shards) | dirichlet
    noniid_ratio: float = 0.2  # label-shard ratio: classes per client = ratio * num_classes
    alpha: float = 0.5  # Dirichlet concentration
    proportion: float = 1.0  # use this fraction of the training set (seeded subset)
    synthetic_size: int = 5000  # synthetic training images (test: size // 5)
    num_classes: int = 10  # synthetic only
    image_size: int = 32
    blur: bool = True  # Gaussian blur in the MoCo v2 augmentation
    crop_min: float = 0.08  # RandomResizedCrop scale lower bound (reference: torchvision's 0.08)
    test_size: int = 0  # evaluate on N test images, a fixed class-stratified draw (0 = all)
    bank_size: int = 0  # kNN bank / probe train set: N seeded training images (0 = all)


@dataclass(frozen=True)
class FedConfig:
    num_clients: int = 5
    sample_ratio: float = 1.0  # clients drawn per epoch = max(1, int(ratio * num_clients))
    sync_every: int = 0  # FedAvg every N steps (0 = only at epoch end); always at epoch end


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    max_steps: int = 0  # stop after this many steps in total (0 = no limit)
    steps_per_epoch: int = 0  # 0 = ceil(mean client size / batch_size)
    batch_size: int = 32  # per client, before symmetric doubling
    lr: float = 0.06
    client_lr: float = 0.0  # 0 = same as lr
    momentum: float = 0.9
    weight_decay: float = 5e-4
    client_schedule: str = "epoch"  # epoch: cosine over epochs | reference: per-step periodic cosine
    checkpoint_every: int = 0  # steps between checkpoints (0 = off); always at every epoch end
    checkpoint_minutes: float = 0.0  # also checkpoint when this many minutes passed since the last one (0 = off)


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1  # kNN monitor every N epochs (0 = only at the end)
    every_steps: int = 0  # also every N training steps (0 = off), for learning curves
    knn_k: int = 200
    knn_t: float = 0.1
    knn_features: str = "projector"  # projector (reference) | backbone
    linear: bool = True  # linear probe at the end of training
    linear_epochs: int = 100
    linear_lr: float = 1e-3
    batch_size: int = 256


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # empty: RAY_ADDRESS if set, else start a local instance
    num_actors: int = 0  # 0 = one per CPU (at most one per client)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    step_timeout_s: float = 300.0


@dataclass(frozen=True)
class FlowerConfig:
    num_supernodes: int = 0  # 0 = fed.num_clients
    step_timeout_s: float = 300.0
    cpus_per_client: float = 1.0  # simulation: CPUs Ray reserves per ClientApp (actors = CPUs / this)


@dataclass(frozen=True)
class Config:
    seed: int = 0
    runtime: str = "local"
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)

    # Derived values are properties, never stored overwrites.
    @property
    def clients_per_epoch(self) -> int:
        return max(1, int(self.fed.sample_ratio * self.fed.num_clients))

    @property
    def client_lr(self) -> float:
        return self.train.client_lr if self.train.client_lr > 0 else self.train.lr


# --------------------------------------------------------------------------- loading


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _suggest(key: Any, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(key), options, n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, tp: type) -> Any:
    """Check a value from a file against the field type; ints are accepted for floats."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}' must be of type {tp.__name__}, got {value!r} ({type(value).__name__})")


def _parse_scalar(key: str, text: str, tp: type) -> Any:
    """Parse an override value given on the command line."""
    raw = text.strip()
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
    elif tp is int:
        try:
            return int(raw)
        except ValueError:
            pass
    elif tp is float:
        try:
            return float(raw)
        except ValueError:
            pass
    elif tp is str:
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            raw = raw[1:-1]
        return raw
    raise ConfigError(f"--set {key}={text}: value must be of type {tp.__name__}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a table, got {type(data).__name__}")
    types = _section_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if not isinstance(key, str):
            raise ConfigError(f"config key {full!r} is a {type(key).__name__}: keys must be names such as 'model' or 'cut' (quote it in YAML)")
        if key not in types:
            raise ConfigError(f"unknown config key '{full}'{_suggest(key, list(types), prefix)}")
        tp = types[key]
        if _is_section(tp):
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def _read_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config path {p} is a directory: pass a .toml or .yaml file (e.g. configs/default.toml)")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {p}: unknown format '{suffix}' (use .toml, .yaml or .yml)")
    except ConfigError:
        raise
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise ConfigError(f"config file {p} is not valid {suffix.lstrip('.').upper()}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table of keys at the top level")
    return data


def _field_type(key: str) -> type:
    """The type of a dotted leaf key, or a ConfigError naming the unknown part."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        types = _section_types(cls)
        if part not in types:
            where = ".".join(parts[:i])
            hint = _suggest(part, list(types), f"{where}." if where else "")
            raise ConfigError(f"unknown config key '{key}'{hint}: no '{part}' in {where or 'the top level'}")
        tp = types[part]
        if _is_section(tp):
            if i == len(parts) - 1:
                raise ConfigError(f"config key '{key}' is a section; set one of its keys, e.g. {key}.{next(iter(_section_types(tp)))}")
            cls = tp
        elif i != len(parts) - 1:
            raise ConfigError(f"unknown config key '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
        else:
            return tp
    raise ConfigError(f"unknown config key '{key}'")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (dotted keys) to a nested dict; types follow the schema."""
    out = _deepcopy_dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        tp = _field_type(key)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"config section '{part}' must be a table")
            node = nxt
        node[parts[-1]] = _parse_scalar(key, text, tp)
    return out


def _deepcopy_dict(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_dict(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config file (TOML or YAML, optional) plus overrides, then validate."""
    data = _read_file(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_flat(cfg: Config) -> dict[str, bool | int | float | str]:
    """Dotted scalar keys, e.g. {'model.cut': 2, ...} (Flower run_config friendly)."""
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(to_dict(cfg), "")
    return flat


def from_flat(flat: dict[str, Any]) -> Config:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} must be a dotted name such as 'model.cut'")
        node = nested
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"config key '{key}' is a section; set one of its keys")
        node[parts[-1]] = value
    return from_dict(nested)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    return '"' + "".join(_toml_char(c) for c in str(v)) + '"'


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: quotes, backslashes and control characters escaped."""
    if c in _TOML_ESCAPES:
        return _TOML_ESCAPES[c]
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04X}"
    return c


def dumps_toml(cfg: Config) -> str:
    d = to_dict(cfg)
    top = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    parts = ["\n".join(top)]
    for k, v in d.items():
        if isinstance(v, dict):
            parts.append(f"[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()))
    return "\n\n".join(parts) + "\n"


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    return from_dict(apply_overrides(to_dict(cfg), overrides))


# --------------------------------------------------------------------------- validation


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}='{value}' is not supported: choose one of {', '.join(options)}{_suggest(value, list(options))}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _finite(key: str, v: float) -> None:
    _check(math.isfinite(v), f"{key} must be a finite number, got {v}")


def _check_leaf(key: str, v: Any, tp: Any) -> None:
    """Type, int64 range, finiteness and text checks of one leaf (also for configs built in code)."""
    ok = isinstance(v, bool) if tp is bool else (
        isinstance(v, int) and not isinstance(v, bool) if tp is int else (
            isinstance(v, (int, float)) and not isinstance(v, bool) if tp is float else isinstance(v, str)))
    _check(ok, f"config key '{key}' must be of type {getattr(tp, '__name__', tp)}, got {v!r} ({type(v).__name__})")
    if tp is int:  # TOML, torch and Flower's run_config hold 64-bit integers
        _check(-(2**63) <= v < 2**63, f"{key}={v} does not fit in a 64-bit integer")
    elif tp is float:
        _finite(key, float(v))
    elif tp is str:
        _check("\x00" not in v, f"{key} contains a NUL character: remove it")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{key}={v!r} is not valid UTF-8 text (undecodable bytes on the command line?)") from None


def validate(cfg: Config) -> None:
    """Range and consistency checks that need no data; raises ConfigError."""
    _check(isinstance(cfg, Config), f"expected a Config, got {type(cfg).__name__}")
    for name, tp in _section_types(Config).items():
        val = getattr(cfg, name)
        if _is_section(tp):
            _check(isinstance(val, tp), f"config section '{name}' must be a {tp.__name__}, got {type(val).__name__}")
            for sub, stp in _section_types(tp).items():
                _check_leaf(f"{name}.{sub}", getattr(val, sub), stp)
        else:
            _check_leaf(name, val, tp)
    _choice("runtime", cfg.runtime, RUNTIMES)
    _choice("device", cfg.device, DEVICES)
    _check(0 <= cfg.seed < 2**63, f"seed must be in [0, 2^63), got {cfg.seed}")

    m = cfg.model
    _choice("model.arch", m.arch, ARCHS)
    _check(1 <= m.cut <= NUM_CUTS, f"model.cut={m.cut} is out of range for {m.arch}: legal cut layers are 1..{NUM_CUTS} (1 = stem only, {NUM_CUTS} = whole backbone on the client)")
    _check(0 < m.width <= 4, f"model.width must be in (0, 4], got {m.width}")
    _choice("model.norm", m.norm, NORMS)

    a = cfg.algo
    _check(a.K >= 1, f"algo.K (queue length) must be positive, got {a.K}")
    _check(a.dim >= 1, f"algo.dim must be positive, got {a.dim}")
    _check(a.hidden_dim >= 1, f"algo.hidden_dim must be positive, got {a.hidden_dim}")
    _check(a.T > 0, f"algo.T (temperature) must be > 0, got {a.T}")
    _check(0 <= a.m <= 1, f"algo.m (client momentum) must be in [0, 1], got {a.m}")
    _check(0 <= a.server_m <= 1, f"algo.server_m must be in [0, 1], got {a.server_m}")
    _choice("algo.symmetric", a.symmetric, SYMMETRIC)

    d = cfg.data
    _choice("data.name", d.name, DATASETS)
    _choice("data.partition", d.partition, PARTITIONS)
    _check(0 < d.noniid_ratio <= 1, f"data.noniid_ratio must be in (0, 1], got {d.noniid_ratio}")
    _check(d.alpha > 0, f"data.alpha (Dirichlet concentration) must be > 0, got {d.alpha}")
    _check(0 < d.proportion <= 1, f"data.proportion must be in (0, 1], got {d.proportion}")
    _check(d.synthetic_size >= 10, f"data.synthetic_size must be at least 10, got {d.synthetic_size}")
    _check(2 <= d.num_classes <= 1000, f"data.num_classes must be in 2..1000, got {d.num_classes}")
    _check(8 <= d.image_size <= 512, f"data.image_size must be in 8..512, got {d.image_size}")
    _check(0 < d.crop_min <= 1, f"data.crop_min must be in (0, 1] (the smallest crop's share of the image area), got {d.crop_min}")
    _check(d.test_size >= 0, f"data.test_size must be >= 0, got {d.test_size}")
    _check(d.bank_size >= 0, f"data.bank_size must be >= 0, got {d.bank_size}")
    # contradictory settings
    _check(
        not (d.name == "synthetic" and d.dir),
        f"data.dir='{d.dir}' is set but data.name='synthetic' reads no files: set data.name to the dataset in that "
        f"folder ({', '.join(n for n in DATASETS if n != 'synthetic')}) or drop data.dir",
    )
    _check(
        not (d.name == "imagefolder" and d.download),
        "data.download=true cannot fetch an imagefolder dataset: put the images in data.dir yourself and set data.download=false",
    )

    f = cfg.fed
    _check(f.num_clients >= 1, f"fed.num_clients must be >= 1, got {f.num_clients}")
    _check(0 < f.sample_ratio <= 1, f"fed.sample_ratio must be in (0, 1], got {f.sample_ratio}")
    _check(int(f.sample_ratio * f.num_clients) >= 1, f"fed.sample_ratio={f.sample_ratio} with fed.num_clients={f.num_clients} samples zero clients per epoch: use a ratio of at least {1 / f.num_clients:.4g}")
    _check(f.sync_every >= 0, f"fed.sync_every must be >= 0 (0 = only at epoch end), got {f.sync_every}")

    t = cfg.train
    _check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _check(t.max_steps >= 0, f"train.max_steps must be >= 0 (0 = no limit), got {t.max_steps}")
    _check(t.steps_per_epoch >= 0, f"train.steps_per_epoch must be >= 0 (0 = from the data), got {t.steps_per_epoch}")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _check(t.client_lr >= 0, f"train.client_lr must be >= 0 (0 = same as train.lr), got {t.client_lr}")
    _check(0 <= t.momentum < 1, f"train.momentum must be in [0, 1), got {t.momentum}")
    _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _choice("train.client_schedule", t.client_schedule, CLIENT_SCHEDULES)
    _check(t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {t.checkpoint_every}")
    _check(t.checkpoint_minutes >= 0, f"train.checkpoint_minutes must be >= 0 (0 = off), got {t.checkpoint_minutes}")

    e = cfg.eval
    _check(e.every >= 0, f"eval.every must be >= 0 (0 = only at the end), got {e.every}")
    _check(e.every_steps >= 0, f"eval.every_steps must be >= 0 (0 = off), got {e.every_steps}")
    _check(e.knn_k >= 1, f"eval.knn_k must be >= 1, got {e.knn_k}")
    _check(e.knn_t > 0, f"eval.knn_t must be > 0, got {e.knn_t}")
    _choice("eval.knn_features", e.knn_features, KNN_FEATURES)
    _check(e.linear_epochs >= 1, f"eval.linear_epochs must be >= 1, got {e.linear_epochs}")
    _check(e.linear_lr > 0, f"eval.linear_lr must be > 0, got {e.linear_lr}")
    _check(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")

    r = cfg.ray
    _check(r.num_actors >= 0, f"ray.num_actors must be >= 0, got {r.num_actors}")
    _check(r.cpus_per_actor >= 0, f"ray.cpus_per_actor must be >= 0, got {r.cpus_per_actor}")
    _check(r.gpus_per_actor >= 0, f"ray.gpus_per_actor must be >= 0, got {r.gpus_per_actor}")
    _check(r.step_timeout_s > 0, f"ray.step_timeout_s must be > 0, got {r.step_timeout_s}")
    fl = cfg.flower
    _check(fl.num_supernodes >= 0, f"flower.num_supernodes must be >= 0, got {fl.num_supernodes}")
    _check(fl.step_timeout_s > 0, f"flower.step_timeout_s must be > 0, got {fl.step_timeout_s}")
    _check(fl.cpus_per_client > 0, f"flower.cpus_per_client must be > 0, got {fl.cpus_per_client}")


__all__ = [
    "Config",
    "ConfigError",
    "ModelConfig",
    "AlgoConfig",
    "DataConfig",
    "FedConfig",
    "TrainConfig",
    "EvalConfig",
    "RayConfig",
    "FlowerConfig",
    "load_config",
    "from_dict",
    "to_dict",
    "to_flat",
    "from_flat",
    "dumps_toml",
    "with_overrides",
    "apply_overrides",
    "validate",
    "replace",
]
