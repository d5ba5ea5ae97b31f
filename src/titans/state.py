"""A `TitansState` as a file: every tensor in one safetensors file, named by its path in the nested state, and the
structure (variant, width, position, each layer's state type, None entries, dict keys, plain numbers) as JSON in the
file's metadata. No pickle: loading rebuilds only the state types listed here, then checks the result against the
model it is for (variant, width, layer count, state types, tensor shapes) with one-line errors.

Also the generic walks behind `TitansState.detach`, `.to` and `.nbytes`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from .attention import AttentionState
from .deltanet import DeltaNetState
from .fileio import atomic_write
from .memory import NeuralMemoryState
from .mixers import GateMixerState, MACState, MALState
from .ops.memory_scan import MemoryState, PendingTokens
from .ops.ttt import TTTInnerState, TTTPending
from .ttt import TTTState

if TYPE_CHECKING:
    from .model import TitansLM, TitansState

FORMAT = "titans-state"
VERSION = 1
METADATA_KEY = "titans_state"

# The only types a saved state may name (every dataclass that a layer state is built from).
STATE_CLASSES: dict[str, type] = {cls.__name__: cls for cls in (
    AttentionState, NeuralMemoryState, GateMixerState, MALState, MACState, DeltaNetState, TTTState, MemoryState,
    PendingTokens, TTTInnerState, TTTPending)}


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor], keep_shared: bool = True,
                _done: dict[int, Tensor] | None = None) -> Any:
    """`obj` (a layer state: dataclasses, dicts, lists, tensors, numbers, None) with `fn` applied to every tensor;
    a tensor that two parts share stays shared (MAC's segment memory is its memory at the segment's start), unless
    keep_shared is False: then `fn` sees every occurrence."""
    done = {} if _done is None else _done
    if isinstance(obj, Tensor):
        if not keep_shared:  # no id(): under torch.compile it would guard on the tensor's identity
            return fn(obj)
        if id(obj) not in done:
            done[id(obj)] = fn(obj)
        return done[id(obj)]
    recurse = lambda x: map_tensors(x, fn, keep_shared, done)  # noqa: E731
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: recurse(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        return {k: recurse(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(recurse(v) for v in obj)
    return obj


def tensors(obj: Any) -> list[Tensor]:
    """Every tensor in `obj`, each once (states may share a tensor between two of their parts)."""
    found: dict[int, Tensor] = {}
    map_tensors(obj, lambda t: found.setdefault(id(t), t))
    return list(found.values())


def _encode(obj: Any, path: str, named: dict[str, Tensor], names: dict[int, str]) -> Any:
    """The JSON structure of `obj`, its tensors added to `named` (a tensor met twice is stored once)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Tensor):
        if id(obj) not in names:
            names[id(obj)] = path
            named[path] = obj.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        return {"tensor": names[id(obj)]}
    if dataclasses.is_dataclass(obj) and type(obj).__name__ in STATE_CLASSES:
        return {"type": type(obj).__name__,
                "fields": {f.name: _encode(getattr(obj, f.name), f"{path}.{f.name}", named, names)
                           for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"dict": {k: _encode(v, f"{path}.{k}", named, names) for k, v in obj.items()}}
    raise ValueError(f"cannot save a state holding {type(obj).__name__} at {path}")


def _decode(node: Any, tensors_: dict[str, Tensor], where: str) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict) and set(node) == {"tensor"}:
        if node["tensor"] not in tensors_:
            raise ValueError(f"{where}: the state file names a tensor {node['tensor']!r} it does not hold")
        return tensors_[node["tensor"]]
    if isinstance(node, dict) and set(node) == {"dict"} and isinstance(node["dict"], dict):
        return {k: _decode(v, tensors_, where) for k, v in node["dict"].items()}
    if isinstance(node, dict) and set(node) == {"type", "fields"} and isinstance(node["fields"], dict):
        cls = STATE_CLASSES.get(node["type"])
        if cls is None:
            raise ValueError(f"{where}: unknown state type {node['type']!r} in the state file")
        fields = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        if not set(node["fields"]) <= fields or fields - optional - set(node["fields"]):  # older files lack optionals
            raise ValueError(f"{where}: a {cls.__name__} with fields {sorted(node['fields'])}, expected "
                             f"{sorted(fields)}")
        return cls(**{k: _decode(v, tensors_, where) for k, v in node["fields"].items()})
    raise ValueError(f"{where}: a malformed entry in the state file")


def pack_state(state: "TitansState") -> dict:
    """``{"structure": JSON text, "tensors": {name: CPU tensor}}``: the state as a file holds it (a checkpoint stores
    the training state carried across steps this way); :func:`unpack_state` undoes it."""
    named: dict[str, Tensor] = {}
    names: dict[int, str] = {}
    layers = [_encode(layer, f"layers.{i}", named, names) for i, layer in enumerate(state.layers)]
    structure = {"format": FORMAT, "version": VERSION, "variant": state.variant, "dim": state.dim,
                 "position": int(state.position), "layers": layers}
    return {"structure": json.dumps(structure), "tensors": named}


def unpack_state(packed: dict, device: torch.device | str = "cpu") -> "TitansState":
    """The state :func:`pack_state` packed, on ``device`` (not checked against a model: the model checks the state
    it is given)."""
    from .model import TitansState

    structure = json.loads(packed["structure"])
    tensors_ = {k: v.to(device) for k, v in packed["tensors"].items()}
    layers = [_decode(node, tensors_, f"packed state layer {i}") for i, node in enumerate(structure["layers"])]
    return TitansState(layers, structure["position"], structure["variant"], structure["dim"])


def save_state(state: "TitansState", path: str | Path) -> None:
    """Write `state` to `path` atomically (one safetensors file, the structure in its metadata)."""
    packed = pack_state(state)
    data = safetensors.torch.save(packed["tensors"], metadata={METADATA_KEY: packed["structure"]})
    atomic_write(path, data)


def load_state(path: str | Path, model: "TitansLM") -> "TitansState":
    """The state saved at `path`, on `model`'s device, checked against `model`: a one-line ValueError when it was
    made by a different model or is not a state file."""
    from .model import TitansState

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no state file at {path}")
    data = path.read_bytes()
    try:
        tensors_ = safetensors.torch.load(data)
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path} is not a readable state file ({str(exc).splitlines()[0] if str(exc) else exc})") \
            from None
    try:
        structure = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{path} is a safetensors file but not a titans state (no {METADATA_KEY} metadata)") \
            from None
    if not isinstance(structure, dict) or structure.get("format") != FORMAT:
        raise ValueError(f"{path} is not a titans state file")
    if structure.get("version") != VERSION:
        raise ValueError(f"{path} is a state file of version {structure.get('version')}; this titans reads "
                         f"version {VERSION}")
    c = model.config
    if (structure.get("variant"), structure.get("dim")) != (c.variant, c.dim):
        raise ValueError(f"{path} holds a state made by a different model (variant {structure.get('variant')}, "
                         f"width {structure.get('dim')}); this model is variant {c.variant}, width {c.dim}")
    layers_ = structure.get("layers")
    position = structure.get("position")
    if not isinstance(layers_, list) or not isinstance(position, int) or position < 0:
        raise ValueError(f"{path} is a malformed state file (layers or position)")
    device = next(model.parameters()).device
    tensors_ = {k: v.to(device) for k, v in tensors_.items()}
    layers = [_decode(node, tensors_, f"{path} layer {i}") for i, node in enumerate(layers_)]
    state = TitansState(layers, position, structure["variant"], structure["dim"])
    try:
        model._check_state(state, None)
        with torch.no_grad():  # the parts a state of this model has (dict keys, tensor ranks), after one token
            _, reference = model(torch.zeros(1, 1, dtype=torch.long, device=device))
        for i, (got, want) in enumerate(zip(state.layers, reference.layers)):
            _same_parts(got, want, f"layer {i}")
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return state


def _same_parts(got: Any, want: Any, where: str) -> None:
    """A ValueError unless `got` has the parts of `want` (a state this model made): the same types, dict keys and
    tensor ranks wherever both have a part (None: nothing there yet; sizes along batch and time may differ)."""
    if got is None or want is None:
        return
    if isinstance(want, Tensor):
        if not isinstance(got, Tensor) or got.dim() != want.dim():
            what = f"{got.dim()}-d tensor" if isinstance(got, Tensor) else type(got).__name__
            raise ValueError(f"the state was made by a different model ({where} holds a {what}, this model's a "
                             f"{want.dim()}-d tensor)")
    elif dataclasses.is_dataclass(want):
        if type(got) is not type(want):
            raise ValueError(f"the state was made by a different model ({where} holds {type(got).__name__}, "
                             f"this model's {type(want).__name__})")
        for f in dataclasses.fields(want):
            _same_parts(getattr(got, f.name), getattr(want, f.name), f"{where} {f.name}")
    elif isinstance(want, dict):
        if not isinstance(got, dict) or sorted(got) != sorted(want):
            keys = sorted(got) if isinstance(got, dict) else type(got).__name__
            raise ValueError(f"the state was made by a different model ({where} holds {keys}, this model's "
                             f"{sorted(want)})")
        for k in want:
            _same_parts(got[k], want[k], f"{where} {k}")
