"""Run configuration: frozen dataclass schemas per topic and a strict YAML loader.

Design (MaxText + levanter): ``configs/base.yaml`` lists every default; other yaml files hold only
overrides and name their parent with ``base:`` (or ``defaults:``). Dotted command-line overrides
(``train.steps=200``) are parsed as YAML scalars and applied last. Unknown keys are rejected with a
did-you-mean suggestion naming the full dotted key; values are validated in ``__post_init__`` with
errors that name the field and the fix. ``prune.method`` selects a registered ``PruneCfg`` subclass
(levanter ``ChoiceRegistry``), so pruning methods add their own fields by registering a subclass::

    @config.register_prune('ast')
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class AstCfg(config.PruneCfg):
        n: int = 2
        m: int = 4

Configs ``.build()`` runtime objects (an optax optimizer, a ``LoraSpec``, a mesh); library code
takes plain arguments only and never sees these objects inside ``jit``.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import optax
import yaml

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'
_BASE_KEYS = ('base', 'defaults')
_TASKS = ('classification', 'causal_lm')
_DTYPES = ('float32', 'bfloat16', 'float16')
_POOLINGS = ('cls', 'mean')


def _positive(name: str, value: float, fix: str) -> None:
    if not value > 0:
        raise ValueError(f'{name}={value!r} must be > 0; {fix}')


def _non_negative(name: str, value: float, fix: str) -> None:
    if not value >= 0:
        raise ValueError(f'{name}={value!r} must be >= 0; {fix}')


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelCfg:
    """Which model to fine-tune.

    ``name_or_path`` is an asset name (``minilm-l6``, ``smollm2-135m``), a tiny random preset
    (``tiny-bert``, ``tiny-llama``), a local HF folder or a ``.gguf`` file.
    """

    name_or_path: str = 'minilm-l6'
    task: str = 'classification'
    num_labels: int = 2
    dtype: str = 'float32'  # frozen weights and computation
    param_dtype: str = 'float32'  # trained parameters and optimizer state
    # Classification head input: 'cls' (first token, as HF) or 'mean' (mean over real tokens, as
    # sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained).
    pooling: str = 'cls'

    def __post_init__(self):
        if not self.name_or_path:
            raise ValueError("model.name_or_path='' is empty; pass e.g. 'minilm-l6' or a folder")
        if self.task not in _TASKS:
            raise ValueError(f'model.task={self.task!r} must be one of {_TASKS}')
        if self.task == 'classification' and self.num_labels < 2:
            raise ValueError(f'model.num_labels={self.num_labels} must be >= 2 for classification')
        if self.pooling not in _POOLINGS:
            raise ValueError(f'model.pooling={self.pooling!r} must be one of {_POOLINGS}')
        if self.pooling != 'cls' and self.task != 'classification':
            raise ValueError(f'model.pooling={self.pooling!r} applies to classification only; '
                             f'drop it for model.task={self.task!r}')
        for name in ('dtype', 'param_dtype'):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f'model.{name}={getattr(self, name)!r} must be one of {_DTYPES}')


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataCfg:
    """Dataset and batching. ``dataset`` is an asset name or a local json/jsonl/csv/txt file."""

    dataset: str = 'rotten-tomatoes'
    max_len: int = 128  # classification: tokens per example (truncate + pad)
    seq_len: int = 128  # causal LM: tokens per packed row
    batch_size: int = 8
    eval_batch_size: int = 32
    eval_max_examples: int | None = None  # None = the full validation split
    seed: int = 0

    def __post_init__(self):
        for name in ('max_len', 'seq_len', 'batch_size', 'eval_batch_size'):
            _positive(f'data.{name}', getattr(self, name), 'pass a positive integer')
        if self.eval_max_examples is not None:
            _positive('data.eval_max_examples', self.eval_max_examples, 'or null for all')


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraCfg:
    """LoRA adapters: rank ``r``, scale ``alpha / r``, placed on modules whose path matches."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    targets: str = r'.*\.(q_proj|v_proj|query|value)'  # == jaxprune.lora.DEFAULT_TARGETS
    # Classification only: modules trained in full next to the adapters (the task head). A BERT
    # encoder's head is tanh(pooler(h[CLS])) -> classifier, as RoBERTa's dense -> out_proj head;
    # sentence-transformers checkpoints ship an untrained pooler (bias 0), so it trains too.
    head_modules: tuple[str, ...] = ('classifier', 'pooler')

    def __post_init__(self):
        object.__setattr__(self, 'head_modules', tuple(self.head_modules))
        if self.enabled:
            _positive('lora.rank', self.rank, 'pass e.g. 8, or lora.enabled=false')
            _positive('lora.alpha', self.alpha, 'pass e.g. 16')
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f'lora.targets={self.targets!r} is not a valid regex: {e}') from e

    def build(self):
        """Returns a ``jaxprune.lora.LoraSpec``, or None when LoRA is disabled."""
        if not self.enabled:
            return None
        from jaxprune import lora

        return lora.LoraSpec(rank=self.rank, alpha=self.alpha, targets=self.targets)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainCfg:
    """Optimisation and loop cadence.

    With ``lora.enabled`` only the LoRA factors and the task head train unless ``full_finetune``
    is set; without LoRA every parameter trains.
    """

    steps: int = 100
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0  # cosine decays to learning_rate * final_lr_ratio
    weight_decay: float = 0.0
    optimizer: str = 'adamw'
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    eval_every: int = 0  # 0 = only at the end
    log_every: int = 10
    seed: int = 0
    full_finetune: bool = False
    # Decay of an exponential moving average of the trained parameters (0 = off). When on, evals
    # use the average and the final state holds it in place of the last iterate.
    param_ema: float = 0.0

    def __post_init__(self):
        _positive('train.steps', self.steps, 'pass e.g. train.steps=100')
        _positive('train.learning_rate', self.learning_rate, 'pass e.g. train.learning_rate=1e-4')
        _positive('train.log_every', self.log_every, 'pass e.g. train.log_every=10')
        for name in ('warmup_steps', 'weight_decay', 'grad_clip', 'eval_every'):
            _non_negative(f'train.{name}', getattr(self, name), 'pass 0 to disable')
        if self.warmup_steps > self.steps:
            raise ValueError(
                f'train.warmup_steps={self.warmup_steps} exceeds train.steps={self.steps}; '
                'lower it')
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError(f'train.final_lr_ratio={self.final_lr_ratio} must be in [0, 1]')
        for name in ('b1', 'b2'):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f'train.{name}={getattr(self, name)} must be in [0, 1)')
        if not 0 <= self.param_ema < 1:
            raise ValueError(f'train.param_ema={self.param_ema} must be in [0, 1): the decay of '
                             'the parameter average, e.g. 0.98 (about 50 steps); 0 disables it')
        if self.optimizer != 'adamw':
            raise ValueError(f"train.optimizer={self.optimizer!r} is not supported; use 'adamw'")

    def build_schedule(self) -> optax.Schedule:
        """Linear warmup from 0 then cosine decay to ``learning_rate * final_lr_ratio``."""
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=self.learning_rate,
            warmup_steps=self.warmup_steps,
            decay_steps=self.steps,
            end_value=self.learning_rate * self.final_lr_ratio,
        )

    def build_optimizer(self, *extra: optax.GradientTransformation) -> optax.GradientTransformation:
        """Returns ``apply_if_finite(chain(clip, *extra, adamw[, param_ema]))``.

        Args:
          *extra: transforms inserted between clipping and adamw (e.g. a pruning method's pieces).

        Returns:
          An optax transformation. Weight decay applies to parameters with ``ndim >= 2`` only.
          ``apply_if_finite`` leaves parameters and inner state unchanged on a non-finite update;
          the train step additionally guards on a non-finite loss. With ``param_ema > 0`` the
          last element is :func:`jaxprune.transforms.param_ema`, which averages the parameters
          without changing the update.
        """
        parts = []
        if self.grad_clip > 0:
            parts.append(optax.clip_by_global_norm(self.grad_clip))
        parts.extend(extra)
        parts.append(
            optax.adamw(
                self.build_schedule(),
                b1=self.b1,
                b2=self.b2,
                weight_decay=self.weight_decay,
                mask=_decay_mask,
            ))
        if self.param_ema:
            from jaxprune.transforms import _average

            parts.append(_average.param_ema(self.param_ema))
        return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=2**30)


def _decay_mask(params):
    import jax

    return jax.tree.map(lambda p: p.ndim >= 2, params)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshCfg:
    """Device mesh sizes; -1 on one axis absorbs the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = {'data': self.data, 'fsdp': self.fsdp, 'tensor': self.tensor}
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ValueError(f'mesh: at most one axis may be -1, got {sizes}')
        for name, v in sizes.items():
            if v != -1 and v < 1:
                raise ValueError(f'mesh.{name}={v} must be >= 1 or -1 (use remaining devices)')

    def shape(self, num_devices: int) -> dict[str, int]:
        """Resolves -1 against ``num_devices``; a product below it uses the first devices only."""
        sizes = {'data': self.data, 'fsdp': self.fsdp, 'tensor': self.tensor}
        known = 1
        for v in sizes.values():
            known *= v if v != -1 else 1
        for k, v in sizes.items():
            if v == -1:
                if num_devices % known:
                    raise ValueError(f'mesh {sizes} does not divide {num_devices=}')
                sizes[k] = num_devices // known
        total = sizes['data'] * sizes['fsdp'] * sizes['tensor']
        if total > num_devices:
            raise ValueError(f'mesh {sizes} needs {total} devices but {num_devices=}; use -1')
        return sizes


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointCfg:
    """Checkpointing: ``dir`` None = ``<run_dir>/checkpoints``; ``every`` 0 = only at the end."""

    dir: str | None = None
    every: int = 0
    keep: int = 2
    resume: bool = True

    def __post_init__(self):
        _non_negative('checkpoint.every', self.every, 'pass 0 to save only at the end')
        _positive('checkpoint.keep', self.keep, 'pass e.g. checkpoint.keep=2')


_PRUNE_REGISTRY: dict[str, type[PruneCfg]] = {}


def register_prune(name: str) -> Callable[[type], type]:
    """Class decorator registering a ``PruneCfg`` subclass under ``prune.method=name``."""

    def deco(cls):
        if name in _PRUNE_REGISTRY and _PRUNE_REGISTRY[name] is not cls:
            raise ValueError(f'prune method {name!r} is already registered')
        cls.method_name = name
        _PRUNE_REGISTRY[name] = cls
        return cls

    return deco


def prune_methods() -> tuple[str, ...]:
    """Names of the registered pruning methods."""
    return tuple(sorted(_PRUNE_REGISTRY))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneCfg:
    """Base of the pruning-method configs; ``method`` picks the registered subclass."""

    method_name: ClassVar[str] = ''
    method: str = 'none'
    target_density: float = 1.0  # fraction of parameters kept at the end

    def __post_init__(self):
        if self.method not in _PRUNE_REGISTRY:
            raise ValueError(
                f'prune.method={self.method!r} is not registered; choose from {prune_methods()}')
        if self.method != type(self).method_name:
            raise ValueError(f'prune.method={self.method!r} does not match {type(self).__name__}')
        if not 0 < self.target_density <= 1:
            raise ValueError(
                f'prune.target_density={self.target_density} must be in (0, 1]; pass e.g. 0.5')


@register_prune('none')
@dataclasses.dataclass(frozen=True, kw_only=True)
class NoPruneCfg(PruneCfg):
    """Plain fine-tuning."""

    def __post_init__(self):
        super().__post_init__()
        if self.target_density != 1.0:
            raise ValueError(
                f'prune.target_density={self.target_density} needs a pruning method; set '
                f'prune.method to one of {prune_methods()} or target_density=1.0')


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunCfg:
    """A whole run: composed topic configs plus the output directory."""

    run_dir: str = 'runs/default'
    model: ModelCfg = dataclasses.field(default_factory=ModelCfg)
    data: DataCfg = dataclasses.field(default_factory=DataCfg)
    lora: LoraCfg = dataclasses.field(default_factory=LoraCfg)
    train: TrainCfg = dataclasses.field(default_factory=TrainCfg)
    mesh: MeshCfg = dataclasses.field(default_factory=MeshCfg)
    checkpoint: CheckpointCfg = dataclasses.field(default_factory=CheckpointCfg)
    prune: PruneCfg = dataclasses.field(default_factory=NoPruneCfg)

    def __post_init__(self):
        if not self.run_dir:
            raise ValueError("run_dir='' is empty; pass e.g. run_dir=runs/my_run")
        if self.model.task == 'causal_lm' and self.data.dataset == 'tiny-sentiment':
            raise ValueError("data.dataset='tiny-sentiment' is a classification set; use "
                             "data.dataset=tiny-text for model.task=causal_lm")

    @property
    def checkpoint_dir(self) -> Any:
        """``checkpoint.dir`` or ``run_dir/checkpoints``; a ``gs://`` URL stays a URL (epath)."""
        from jaxprune.checkpoint import _checkpointer  # local: config stays import-light

        return _checkpointer.as_directory(self.checkpoint.dir or pathlib.Path(self.run_dir)
                                          / 'checkpoints')

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (YAML/JSON safe) that ``from_dict`` turns back into this config.

        Tuple fields become lists (YAML's safe dumper has no tuples).
        """
        def plain(x):
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            if isinstance(x, list | tuple):
                return [plain(v) for v in x]
            return x

        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunCfg:
        """Builds a config from a (possibly partial) nested dict; unknown keys raise."""
        return _build(cls, dict(d), prefix='')


# ---------------------------------------------------------------------------------------------
# Loader.


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _unknown_key(key: str, prefix: str, choices: Sequence[str]) -> ValueError:
    full = f'{prefix}{key}'
    full_choices = [f'{prefix}{c}' for c in choices]
    close = difflib.get_close_matches(full, full_choices, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f'; valid keys: {sorted(full_choices)}'
    return ValueError(f"unknown config key '{full}'{hint}")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads '1e-4' (no dot) as a string.
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ValueError(f'{name}={value!r} must be of type {tp.__name__}')


def _discover(method: Any) -> None:
    """Imports the module that registers ``method`` (plugin discovery by convention).

    Methods register their ``PruneCfg`` subclass when ``jaxprune.methods`` (or
    ``jaxprune.methods._<method>_train``) is imported; the loader imports them on demand so
    that a yaml naming ``prune.method: apt`` loads without an explicit import.
    """
    if method in _PRUNE_REGISTRY or not isinstance(method, str) or not method.isidentifier():
        return
    import importlib

    for name in ('jaxprune.methods', f'jaxprune.methods._{method}_train'):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside the module
                raise
        if method in _PRUNE_REGISTRY:
            return


def _build(cls, d: dict[str, Any], prefix: str):
    if cls is PruneCfg or (isinstance(cls, type) and issubclass(cls, PruneCfg)):
        method = d.get('method', 'none')
        _discover(method)
        if method not in _PRUNE_REGISTRY:
            close = difflib.get_close_matches(str(method), prune_methods(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ''
            raise ValueError(
                f'{prefix}method={method!r} is not registered{hint}; choose from {prune_methods()}')
        cls = _PRUNE_REGISTRY[method]
    fields = _fields(cls)
    hints = _hints(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in fields:
            raise _unknown_key(key, prefix, list(fields))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ValueError(f'{prefix}{key} must be a mapping, got {value!r}')
            kwargs[key] = _build(tp, dict(value), prefix=f'{prefix}{key}.')
        else:
            kwargs[key] = _coerce(value, tp, f'{prefix}{key}')
    for key, tp in hints.items():
        if key in fields and key not in kwargs and dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, {}, prefix=f'{prefix}{key}.')
    return cls(**kwargs)


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _read_yaml(path: pathlib.Path, seen: tuple[pathlib.Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f'config file {str(path)!r} not found; pass a path to a .yaml')
    if path in seen:
        raise ValueError(f'config inheritance cycle: {[str(p) for p in seen + (path,)]}')
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f'{path}: invalid YAML: {e}') from e
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise ValueError(f'{path}: top level must be a mapping, got {kind}')  # noqa: TRY004
    parents = [raw.pop(k) for k in _BASE_KEYS if k in raw]
    if len(parents) > 1:
        raise ValueError(f'{path}: give only one of {_BASE_KEYS}')
    merged: dict[str, Any] = {}
    for parent in (parents[0] if parents and isinstance(parents[0], list) else parents):
        ppath = pathlib.Path(str(parent))
        if not ppath.is_absolute():
            ppath = path.parent / ppath
        if not ppath.suffix:
            ppath = ppath.with_suffix('.yaml')
        merged = _deep_merge(merged, _read_yaml(ppath, seen + (path,)))
    return _deep_merge(merged, raw)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parses ``a.b.c=value`` into (['a', 'b', 'c'], yaml scalar)."""
    if '=' not in item:
        raise ValueError(f'override {item!r} must look like key.sub=value, e.g. train.steps=200')
    key, _, raw = item.partition('=')
    key = key.strip()
    if not key or any(not part for part in key.split('.')):
        raise ValueError(f'override {item!r} has an empty key; e.g. train.steps=200')
    try:
        value = yaml.safe_load(raw) if raw.strip() else ''
    except yaml.YAMLError as e:
        raise ValueError(f'override {item!r}: cannot parse value: {e}') from e
    return key.split('.'), value


def apply_overrides(d: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies dotted ``key=value`` overrides to a nested dict (new dict returned)."""
    out = _deep_merge({}, d)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = {}
                node[k] = child
            node = child
        node[keys[-1]] = value
    return out


def load_config(path: str | pathlib.Path | None = None, overrides: Sequence[str] = ()) -> RunCfg:
    """Loads a run config.

    Args:
      path: a yaml file (inheriting via ``base:``/``defaults:``) or None for the defaults.
      overrides: dotted ``key=value`` strings applied last, values parsed as YAML scalars.

    Returns:
      The validated ``RunCfg``.

    Raises:
      FileNotFoundError: the file (or a parent) does not exist.
      ValueError: an unknown key (with a did-you-mean suggestion), a wrong type or an invalid value.
    """
    d = _read_yaml(pathlib.Path(path)) if path is not None else {}
    d = apply_overrides(d, overrides)
    return RunCfg.from_dict(d)


def save_config(cfg: RunCfg, path: str | pathlib.Path) -> None:
    """Writes the full config as YAML (``load_config`` reads it back)."""
    pathlib.Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
