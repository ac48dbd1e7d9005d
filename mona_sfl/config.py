"""Typed run configuration: frozen dataclasses, loaded from TOML/YAML plus ``key=value`` overrides.

One config object describes a run completely. It is validated once, never rewritten after
loading (derived values are properties), and saved next to the results as ``config.toml``.
All leaves are scalars (bool, int, float, str) so that the same keys travel through Flower's
``run_config`` unchanged (see :func:`to_flat` / :func:`from_flat`).

This module imports neither torch nor any runtime.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mona_sfl.core import AGGREGATIONS, PRECISIONS, SYMMETRIC
from mona_sfl.core.schedule import CLIENT_BATCHING, CLIENT_SCHEDULES
from mona_sfl.data import DATASETS, MIN_SYNTHETIC_SIZE, PARTITIONS
from mona_sfl.errors import ConfigError
from mona_sfl.eval import KNN_FEATURES
from mona_sfl.models import BACKBONES, NORMS, NUM_CUTS
from mona_sfl.registry import Choices, suggest
from mona_sfl.runtime import RUNTIMES

#: ``device``: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
DEVICES = Choices("device", ("auto", "cpu", "cuda"))

#: ``log.backends``: where the metrics records go (``jsonl``, the run folder's metrics.jsonl, always).
LOG_BACKENDS = Choices("log.backends", ("jsonl", "csv", "tensorboard", "wandb"))

#: ``log.wandb_mode``: W&B offline (files in the run folder, ``wandb sync`` later) or online.
WANDB_MODES = Choices("log.wandb_mode", ("offline", "online"))

#: Every key with a fixed set of values, and where that set is defined.
VOCABULARY: dict[str, Choices] = {
    c.key: c
    for c in (WANDB_MODES, RUNTIMES, DEVICES, BACKBONES, NORMS, SYMMETRIC, DATASETS, PARTITIONS, AGGREGATIONS, CLIENT_SCHEDULES, CLIENT_BATCHING, PRECISIONS, KNN_FEATURES)
}


def key(default: Any, help: str, *, names: bool = False) -> Any:  # noqa: A002 - the help text of a key
    """A config field with its help text (the key reference is generated from it).

    ``names``: a str key holding comma-separated names; a file may give it as a list of
    strings (``backends = ["jsonl", "csv"]``), stored joined so that every leaf stays a scalar
    (Flower's run_config carries only scalars).
    """
    return field(default=default, metadata={"help": help, "names": names})


@dataclass(frozen=True)
class ModelConfig:
    arch: str = key("resnet18", "backbone (CIFAR variants)")
    cut: int = key(2, "1..9 backbone units on the client (ResNet-18: paper layers L = 2*cut-1)")
    width: float = key(1.0, "channel multiplier (e.g. 0.25 for CPU runs)")
    norm: str = key("group", "normalisation: GroupNorm with 4 channels per group (reference) or BatchNorm")
    weight_std: bool = key(True, "weight-standardised convolutions (reference)")


@dataclass(frozen=True)
class AlgoConfig:
    align_momentum: bool = key(True, "MonAcoSFL (true: momentum fronts merged at every sync) or MocoSFL (false)")
    K: int = key(6000, "key queue length")
    dim: int = key(1024, "projector output dimension")
    hidden_dim: int = key(1024, "projector hidden width")
    T: float = key(0.1, "InfoNCE temperature")
    m: float = key(0.99, "client momentum (EMA) coefficient")
    server_m: float = key(0.99, "server momentum (EMA) coefficient")
    symmetric: str = key("client", "symmetric loss: client-side [x1;x2]/[x2;x1] doubling (reference), the original two-term loss, or none")


@dataclass(frozen=True)
class DataConfig:
    name: str = key("synthetic", "dataset (synthetic: the built-in shapes, no files)")
    dir: str = key("", "data directory (torchvision root or image-folder root)")
    download: bool = key(False, "let torchvision download the data (machines with internet)")
    partition: str = key("iid", "client split: IID, label shards (`data.noniid_ratio`), Dirichlet (`data.alpha`)")
    noniid_ratio: float = key(0.2, "label shards: classes per client = ratio x classes")
    alpha: float = key(0.5, "Dirichlet concentration")
    proportion: float = key(1.0, "use this seeded fraction of the training set")
    seed: int = key(-1, "the data's own seed: synthetic images, data.proportion and data.bank_size subsets (-1 = the run's seed)")
    synthetic_size: int = key(5000, "synthetic training images (test: size // 5, unless data.synthetic_test_size)")
    synthetic_test_size: int = key(0, "synthetic test images (0 = data.synthetic_size // 5)")
    num_classes: int = key(10, "synthetic classes")
    image_size: int = key(32, "image side in pixels")
    max_image_pixels: int = key(89_478_485, "imagefolder: most pixels (width x height) one image file may hold (decompression-bomb limit)")
    blur: bool = key(True, "Gaussian blur in the MoCo v2 augmentation")
    crop_min: float = key(0.08, "smallest RandomResizedCrop area share (0.08 = torchvision / reference)")
    test_size: int = key(0, "evaluate on N test images, a fixed class-stratified draw (0 = all)")
    bank_size: int = key(0, "kNN bank / probe training set: N seeded training images (0 = all)")


@dataclass(frozen=True)
class FedConfig:
    num_clients: int = key(5, "clients")
    sample_ratio: float = key(1.0, "share of clients sampled per epoch (seeded): max(1, int(ratio x clients))")
    sync_every: int = key(0, "sync every N steps of an epoch (0 = only at epoch end); always at epoch end")
    aggregation: str = key("fedavg", "how a sync merges the sampled clients' fronts (docs/merging.md)")
    axis_keep: float = key(0.1, "axis: kept share of each layer's rank (>= clients per sync keeps all = fedavg)")
    interventions: bool = key(False, "after training, a mini-intervention per client of the last sync (docs/merging.md)")
    intervention_rank: int = key(1, "interventions: rank r of W1, W2")
    intervention_channels: int = key(64, "interventions: channels of the slice they edit, the first N (0 = all)")
    intervention_steps: int = key(100, "interventions: Adam steps per client (lr 1e-3, batch 16)")
    intervention_every_sync: bool = key(False, "interventions: also fit them after every sync, warm-started (docs/merging.md)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = key(200, "epochs")
    max_steps: int = key(0, "stop after N steps in total (0 = no limit)")
    steps_per_epoch: int = key(0, "0 = ceil(mean client data / batch)")
    batch_size: int = key(32, "per-client batch, before the symmetric doubling")
    lr: float = key(0.06, "server learning rate (and the clients', unless train.client_lr)")
    client_lr: float = key(0.0, "client learning rate (0 = train.lr)")
    momentum: float = key(0.9, "SGD momentum")
    weight_decay: float = key(5e-4, "SGD weight decay")
    client_schedule: str = key("epoch", "client LR: cosine over epochs, or the reference's per-step periodic cosine")
    client_batching: str = key("off", "a host's clients one after another, or as one batched pass (docs/performance.md)")
    precision: str = key("fp32", "the training forwards in float32, or under bfloat16 autocast with float32 weights and cut tensors (docs/performance.md)")
    checkpoint_every: int = key(0, "extra checkpoint every N steps (0 = off; always at step 0 and every epoch end)")
    checkpoint_minutes: float = key(0.0, "extra checkpoint when N minutes passed since the last (0 = off)")
    client_threads: int = key(1, "torch threads of client compute, in every runtime (0 = all CPUs)")
    server_threads: int = key(0, "torch threads of server compute and evaluation (0 = all CPUs)")


@dataclass(frozen=True)
class EvalConfig:
    every: int = key(1, "kNN monitor every N epochs (0 = only at the end, no initial evaluation)")
    every_steps: int = key(0, "also every N training steps (0 = off), for learning curves")
    knn_k: int = key(200, "kNN neighbours")
    knn_t: float = key(0.1, "kNN temperature")
    knn_features: str = key("projector", "features of the kNN monitor: projector output (reference) or pooled backbone")
    linear: bool = key(True, "linear probe on frozen backbone features at the end")
    linear_epochs: int = key(100, "linear probe epochs")
    linear_lr: float = key(1e-3, "linear probe learning rate (Adam)")
    batch_size: int = key(256, "evaluation batch size")


@dataclass(frozen=True)
class LogConfig:
    backends: str = key(
        "jsonl",
        "where the metrics records go, comma-separated or a list, of " + ", ".join(f"`{n}`" for n in LOG_BACKENDS)
        + " (`jsonl`, the run folder's metrics.jsonl, always)",
        names=True,
    )
    wandb_project: str = key("mona-sfl", "W&B project (log.backends with wandb)")
    wandb_mode: str = key("offline", "W&B mode (offline: files under the run folder's wandb/, upload later with `wandb sync`)")

    @property
    def backend_names(self) -> list[str]:
        """The backends, ``jsonl`` first and once."""
        names = [n.strip() for n in self.backends.split(",") if n.strip()]
        return ["jsonl", *dict.fromkeys(n for n in names if n != "jsonl")]


@dataclass(frozen=True)
class RayConfig:
    address: str = key("", "Ray cluster address (empty: RAY_ADDRESS, else a private local instance)")
    num_actors: int = key(0, "client actors (0 = one per CPU, at most one per client)")
    cpus_per_actor: float = key(1.0, "CPUs Ray reserves per actor")
    gpus_per_actor: float = key(0.0, "GPUs per actor (> 0: clients compute on CUDA)")
    step_timeout_s: float = key(300.0, "seconds an actor may take for one call before its clients are dropped")


@dataclass(frozen=True)
class FlowerConfig:
    num_supernodes: int = key(0, "SuperNodes (0 = fed.num_clients)")
    step_timeout_s: float = key(300.0, "seconds a node may take to reply before its clients are dropped")
    cpus_per_client: float = key(1.0, "simulation: CPUs Ray reserves per ClientApp")


@dataclass(frozen=True)
class Config:
    seed: int = key(0, "everything (init, partition, sampling, augmentation, and the data unless data.seed) derives from it")
    runtime: str = key("local", "where the clients run: in-process, Ray actors, Flower SuperNodes")
    device: str = key("auto", "compute device (auto: CUDA when present)")
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)

    # Derived values are properties, never stored overwrites.
    @property
    def data_seed(self) -> int:
        """Seed of the dataset itself: ``data.seed``, or the run's ``seed`` when that is -1."""
        return self.seed if self.data.seed < 0 else self.data.seed

    @property
    def clients_per_epoch(self) -> int:
        return max(1, int(self.fed.sample_ratio * self.fed.num_clients))

    @property
    def client_lr(self) -> float:
        return self.train.client_lr if self.train.client_lr > 0 else self.train.lr

    @property
    def method(self) -> str:
        """``MonAcoSFL`` (momentum alignment on) or ``MocoSFL``."""
        return "MonAcoSFL" if self.algo.align_momentum else "MocoSFL"

    @property
    def method_tag(self) -> str:
        """Short name of the method for folder names: ``mona`` or ``moco``."""
        return "mona" if self.algo.align_momentum else "moco"

    @property
    def rows_per_client(self) -> int:
        """Rows of one client's activations per step: the batch, doubled under client-side symmetry."""
        return self.train.batch_size * (2 if self.algo.symmetric == "client" else 1)

    @property
    def images_per_row(self) -> float:
        """Training images behind one activation row (1/2 under client-side doubling)."""
        return self.train.batch_size / self.rows_per_client

    @property
    def num_nodes(self) -> int:
        """Flower SuperNodes: ``flower.num_supernodes``, or one per client."""
        return self.flower.num_supernodes or self.fed.num_clients


def key_reference(cls: type | None = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) of every leaf of the schema, in schema order."""
    cls = cls or Config
    rows: list[tuple[str, Any, str]] = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += key_reference(tp, f"{prefix}{f.name}.")
        else:
            name = f"{prefix}{f.name}"
            help_text = f.metadata.get("help", "")
            if name in VOCABULARY:
                help_text += ": " + ", ".join(f"`{v}`" for v in VOCABULARY[name])
            rows.append((name, f.default, help_text))
    return rows


def key_table() -> str:
    """The key reference as a Markdown table (the README's is this, checked by a test)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, default, help_text in key_reference():
        shown = toml_value(default) if not isinstance(default, str) else f'"{default}"'
        lines.append(f"| `{name}` | `{shown}` | {help_text} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- loading


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


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
            raise ConfigError(f"unknown config key '{full}'{suggest(key, list(types), prefix)}")
        tp = types[key]
        if _is_section(tp):
            kwargs[key] = _build(tp, value, f"{full}.")
        elif isinstance(value, list) and _names_key(cls, key):
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"config key '{full}' must be a list of names (strings), got {value!r}")
            kwargs[key] = ",".join(value)
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


#: Largest config file read (bytes).
MAX_CONFIG_BYTES = 1_000_000


def _yaml_load(text: str) -> Any:
    """``yaml.safe_load`` without aliases: a config never needs them, and an alias bomb (aliases of
    aliases) of a few hundred bytes would expand to gigabytes when the config is copied."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ConfigError(
                    f"YAML aliases (*{event.anchor}) are not accepted in a config (line {event.start_mark.line + 1}): "
                    f"write the values out"
                )
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliasLoader) or {}  # noqa: S506 - a SafeLoader subclass


def _names_key(cls: type, name: str) -> bool:
    """Whether field ``name`` of section ``cls`` holds comma-separated names (see :func:`key`)."""
    return any(f.name == name and f.metadata.get("names") for f in dataclasses.fields(cls))


def _read_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config path {p} is a directory: pass a .toml or .yaml file (e.g. configs/default.toml)")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {p} is larger than {MAX_CONFIG_BYTES} bytes: a config is a short table of keys")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = _yaml_load(text)
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
            hint = suggest(part, list(types), f"{where}." if where else "")
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


def bundled_config(name: str) -> Path | None:
    """A config shipped with the package (``mona_sfl/configs/NAME.toml`` / ``.yaml``), or None."""
    from importlib import resources

    base = resources.files("mona_sfl") / "configs"
    for suffix in ("", ".toml", ".yaml", ".yml"):
        p = base / f"{name}{suffix}"
        if p.is_file():
            return Path(str(p))
    return None


def bundled_names() -> list[str]:
    """Names of the bundled configs (``--config NAME``)."""
    from importlib import resources

    base = resources.files("mona_sfl") / "configs"
    return sorted(Path(str(p.name)).stem for p in base.iterdir() if p.name.endswith((".toml", ".yaml", ".yml")))


def resolve_config_path(arg: str | Path | None) -> Path:
    """``--config``: a file, or the name of a bundled config; None means the bundled ``default``."""
    if arg is None:
        p = bundled_config("default")
        if p is None:
            raise ConfigError("the bundled default config is missing: reinstall mona-sfl or pass --config FILE")
        return p
    p = Path(arg)
    if p.exists():
        return p
    found = bundled_config(str(arg))
    if found is not None:
        return found
    raise ConfigError(
        f"config file not found: {arg} (neither a file nor a bundled config name; bundled: {', '.join(bundled_names())})"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config file (TOML or YAML) plus overrides, then validate.

    ``path`` None is the bundled ``default`` config, the one ``mona-sfl train`` uses without
    ``--config``; :func:`schema_config` is the schema's (reference) defaults without a file.
    """
    return _validated(_read_file(resolve_config_path(path) if path is None else path), overrides)


def schema_config(overrides: list[str] | None = None) -> Config:
    """The schema's defaults (the reference values, ``Config()``) plus overrides, validated; no config file."""
    return _validated({}, overrides)


def _validated(data: dict[str, Any], overrides: list[str] | None) -> Config:
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


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    return '"' + "".join(toml_char(c) for c in str(v)) + '"'


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_char(c: str) -> str:
    """One character of a TOML basic string: quotes, backslashes and control characters escaped."""
    if c in _TOML_ESCAPES:
        return _TOML_ESCAPES[c]
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04X}"
    return c


def dumps_toml(cfg: Config) -> str:
    d = to_dict(cfg)
    top = [f"{k} = {toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    parts = ["\n".join(top)]
    for k, v in d.items():
        if isinstance(v, dict):
            parts.append(f"[{k}]\n" + "\n".join(f"{kk} = {toml_value(vv)}" for kk, vv in v.items()))
    return "\n\n".join(parts) + "\n"


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    return from_dict(apply_overrides(to_dict(cfg), overrides))


# --------------------------------------------------------------------------- validation


#: Resource bounds (validate): what a run may ask for before anything is allocated.
MAX_K = 2**24
MAX_DIM = 65536
MAX_QUEUE_ENTRIES = 2**28
MAX_SYNTHETIC_SIZE = 10_000_000
MAX_SYNTHETIC_BYTES = 2**33
MAX_CLIENTS = 100_000
MAX_EPOCHS = 10_000
MAX_CLIENT_EPOCHS = 10**7
MAX_STEPS_PER_EPOCH = 10_000_000
MAX_BATCH = 65536
MAX_WEIGHT_DECAY = 1.0


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
    flat = to_flat(cfg)
    for name, choices in VOCABULARY.items():
        choices.check(flat[name])
    _check(0 <= cfg.seed < 2**63, f"seed must be in [0, 2^63), got {cfg.seed}")
    _check(-1 <= cfg.data.seed < 2**63, f"data.seed must be -1 (the run's seed) or in [0, 2^63), got {cfg.data.seed}")

    m = cfg.model
    _check(1 <= m.cut <= NUM_CUTS, f"model.cut={m.cut} is out of range for {m.arch}: legal cut layers are 1..{NUM_CUTS} (1 = stem only, {NUM_CUTS} = whole backbone on the client)")
    _check(0 < m.width <= 4, f"model.width must be in (0, 4], got {m.width}")

    a = cfg.algo
    _check(a.K >= 1, f"algo.K (queue length) must be positive, got {a.K}")
    _check(a.dim >= 1, f"algo.dim must be positive, got {a.dim}")
    _check(a.hidden_dim >= 1, f"algo.hidden_dim must be positive, got {a.hidden_dim}")
    # resource bounds, checked before anything is allocated (each message names the key and the limit)
    _check(a.K <= MAX_K, f"algo.K={a.K} exceeds the limit {MAX_K} (queue length)")
    _check(a.dim <= MAX_DIM, f"algo.dim={a.dim} exceeds the limit {MAX_DIM}")
    _check(a.hidden_dim <= MAX_DIM, f"algo.hidden_dim={a.hidden_dim} exceeds the limit {MAX_DIM}")
    _check(
        a.K * a.dim <= MAX_QUEUE_ENTRIES,
        f"algo.K x algo.dim = {a.K * a.dim} queue entries exceeds the limit {MAX_QUEUE_ENTRIES} (1 GiB of float32): lower algo.K or algo.dim",
    )
    _check(a.T > 0, f"algo.T (temperature) must be > 0, got {a.T}")
    _check(0 <= a.m <= 1, f"algo.m (client momentum) must be in [0, 1], got {a.m}")
    _check(0 <= a.server_m <= 1, f"algo.server_m must be in [0, 1], got {a.server_m}")

    d = cfg.data
    _check(0 < d.noniid_ratio <= 1, f"data.noniid_ratio must be in (0, 1], got {d.noniid_ratio}")
    _check(d.alpha > 0, f"data.alpha (Dirichlet concentration) must be > 0, got {d.alpha}")
    _check(0 < d.proportion <= 1, f"data.proportion must be in (0, 1], got {d.proportion}")
    _check(d.synthetic_size >= MIN_SYNTHETIC_SIZE, f"data.synthetic_size must be at least {MIN_SYNTHETIC_SIZE}, got {d.synthetic_size}")
    _check(2 <= d.num_classes <= 1000, f"data.num_classes must be in 2..1000, got {d.num_classes}")
    _check(
        d.synthetic_size <= MAX_SYNTHETIC_SIZE,
        f"data.synthetic_size={d.synthetic_size} exceeds the limit {MAX_SYNTHETIC_SIZE}",
    )
    _check(
        d.name != "synthetic" or d.synthetic_size * 3 * d.image_size**2 <= MAX_SYNTHETIC_BYTES,
        f"data.synthetic_size x 3 x data.image_size^2 = {d.synthetic_size * 3 * d.image_size**2} bytes exceeds the limit "
        f"{MAX_SYNTHETIC_BYTES} (8 GiB of uint8 images): lower data.synthetic_size or data.image_size",
    )
    _check(
        0 <= d.synthetic_test_size <= MAX_SYNTHETIC_SIZE,
        f"data.synthetic_test_size must be in 0..{MAX_SYNTHETIC_SIZE} (0 = data.synthetic_size // 5), got {d.synthetic_test_size}",
    )
    _check(
        d.name != "synthetic" or d.synthetic_test_size * 3 * d.image_size**2 <= MAX_SYNTHETIC_BYTES,
        f"data.synthetic_test_size x 3 x data.image_size^2 = {d.synthetic_test_size * 3 * d.image_size**2} bytes exceeds the limit "
        f"{MAX_SYNTHETIC_BYTES} (8 GiB of uint8 images): lower data.synthetic_test_size or data.image_size",
    )
    _check(d.max_image_pixels >= 1, f"data.max_image_pixels must be >= 1, got {d.max_image_pixels}")
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
    _check(f.num_clients <= MAX_CLIENTS, f"fed.num_clients={f.num_clients} exceeds the limit {MAX_CLIENTS}")
    _check(0 < f.sample_ratio <= 1, f"fed.sample_ratio must be in (0, 1], got {f.sample_ratio}")
    _check(int(f.sample_ratio * f.num_clients) >= 1, f"fed.sample_ratio={f.sample_ratio} with fed.num_clients={f.num_clients} samples zero clients per epoch: use a ratio of at least {1 / f.num_clients:.4g}")
    _check(f.sync_every >= 0, f"fed.sync_every must be >= 0 (0 = only at epoch end), got {f.sync_every}")
    _check(f.intervention_rank >= 1, f"fed.intervention_rank must be >= 1, got {f.intervention_rank}")
    _check(f.intervention_channels >= 0, f"fed.intervention_channels must be >= 0 (0 = all), got {f.intervention_channels}")
    _check(f.intervention_steps >= 1, f"fed.intervention_steps must be >= 1, got {f.intervention_steps}")
    _check(
        f.interventions or not f.intervention_every_sync,
        "fed.intervention_every_sync=true needs fed.interventions=true (it fits the interventions after every sync too)",
    )
    _check(f.axis_keep > 0, f"fed.axis_keep must be > 0 (the kept share of each layer's rank, e.g. 0.1), got {f.axis_keep}")

    t = cfg.train
    _check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _check(t.epochs <= MAX_EPOCHS, f"train.epochs={t.epochs} exceeds the limit {MAX_EPOCHS}")
    _check(
        t.epochs * f.num_clients <= MAX_CLIENT_EPOCHS,
        f"train.epochs x fed.num_clients = {t.epochs * f.num_clients} exceeds the limit {MAX_CLIENT_EPOCHS} (every epoch's client "
        f"draw is computed, also by `mona-sfl comm`)",
    )
    _check(t.steps_per_epoch <= MAX_STEPS_PER_EPOCH, f"train.steps_per_epoch={t.steps_per_epoch} exceeds the limit {MAX_STEPS_PER_EPOCH}")
    _check(t.batch_size <= MAX_BATCH, f"train.batch_size={t.batch_size} exceeds the limit {MAX_BATCH}")
    _check(t.max_steps >= 0, f"train.max_steps must be >= 0 (0 = no limit), got {t.max_steps}")
    _check(t.steps_per_epoch >= 0, f"train.steps_per_epoch must be >= 0 (0 = from the data), got {t.steps_per_epoch}")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _check(t.client_lr >= 0, f"train.client_lr must be >= 0 (0 = same as train.lr), got {t.client_lr}")
    _check(0 <= t.momentum < 1, f"train.momentum must be in [0, 1), got {t.momentum}")
    _check(0 <= t.weight_decay <= MAX_WEIGHT_DECAY, f"train.weight_decay must be in [0, {MAX_WEIGHT_DECAY}], got {t.weight_decay}")
    _check(t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {t.checkpoint_every}")
    _check(t.checkpoint_minutes >= 0, f"train.checkpoint_minutes must be >= 0 (0 = off), got {t.checkpoint_minutes}")
    _check(0 <= t.client_threads <= 1024, f"train.client_threads must be in 0..1024 (0 = all CPUs), got {t.client_threads}")
    _check(0 <= t.server_threads <= 1024, f"train.server_threads must be in 0..1024 (0 = all CPUs), got {t.server_threads}")

    e = cfg.eval
    _check(e.every >= 0, f"eval.every must be >= 0 (0 = only at the end), got {e.every}")
    _check(e.every_steps >= 0, f"eval.every_steps must be >= 0 (0 = off), got {e.every_steps}")
    _check(e.knn_k >= 1, f"eval.knn_k must be >= 1, got {e.knn_k}")
    _check(e.knn_t > 0, f"eval.knn_t must be > 0, got {e.knn_t}")
    _check(e.linear_epochs >= 1, f"eval.linear_epochs must be >= 1, got {e.linear_epochs}")
    _check(e.linear_lr > 0, f"eval.linear_lr must be > 0, got {e.linear_lr}")
    _check(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")
    _check(e.batch_size <= MAX_BATCH, f"eval.batch_size={e.batch_size} exceeds the limit {MAX_BATCH}")

    lg = cfg.log
    given = [n.strip() for n in lg.backends.split(",")]
    _check(all(given), f"log.backends={lg.backends!r} has an empty name: give names separated by commas, e.g. \"jsonl,csv\"")
    for name in given:
        LOG_BACKENDS.check(name)
    _check(len(set(given)) == len(given), f"log.backends={lg.backends!r} names a backend twice")
    _check(bool(lg.wandb_project.strip()), "log.wandb_project must not be empty")

    r = cfg.ray
    _check(r.num_actors >= 0, f"ray.num_actors must be >= 0, got {r.num_actors}")
    _check(r.cpus_per_actor >= 0, f"ray.cpus_per_actor must be >= 0, got {r.cpus_per_actor}")
    _check(r.gpus_per_actor >= 0, f"ray.gpus_per_actor must be >= 0, got {r.gpus_per_actor}")
    _check(r.step_timeout_s > 0, f"ray.step_timeout_s must be > 0, got {r.step_timeout_s}")
    fl = cfg.flower
    _check(fl.num_supernodes >= 0, f"flower.num_supernodes must be >= 0, got {fl.num_supernodes}")
    _check(
        fl.num_supernodes <= f.num_clients,
        f"flower.num_supernodes={fl.num_supernodes} exceeds the limit fed.num_clients={f.num_clients} (a node without a "
        f"client would never answer): use at most one node per client, or 0 for one each",
    )
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
    "LogConfig",
    "RayConfig",
    "FlowerConfig",
    "load_config",
    "bundled_config",
    "bundled_names",
    "resolve_config_path",
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
