"""A pickle module for ``torch.load`` that runs no code the file names.

``torch.load(f, weights_only=False, pickle_module=<this module>)`` reads a
``torch.save`` file (zip format, or the legacy non-tar format) whatever
Python objects it holds beside its tensors: a Lightning checkpoint's
callbacks (a dict keyed by callback *classes*), hyper-parameter objects
(``argparse.Namespace``, an ``AttributeDict``, an omegaconf ``DictConfig``),
numpy scalars, optimizer states. Nothing the file names is imported or
called; the tensors come back, every other object comes back as an inert
placeholder, and :func:`tensors_only` then keeps the tensors.

How pickle could run code, and what this module does about each way:

* ``GLOBAL`` / ``STACK_GLOBAL`` (and the class name of ``INST``) resolve a
  ``module.name`` through ``find_class``. Ours imports nothing: it looks the
  pair up in a fixed table (``ALLOWED``) of objects imported here, and maps
  every other pair to a fresh placeholder *class* (one per pair and load, a
  subclass of :class:`Inert`). The table holds
  - callables: ``collections.OrderedDict`` and pyvq's own versions of the
    tensor-rebuild functions ``torch.save`` emits (``torch._utils.
    _rebuild_tensor``/``_v2``/``_v3``, ``_rebuild_parameter``,
    ``_rebuild_parameter_with_state``, ``torch._tensor.
    _rebuild_from_type_v2``): they check their arguments (the storage must
    be one ``torch.load`` itself made, sizes and strides tuples of ints whose
    view fits in that storage, metadata a dict of bools) and build a plain
    tensor; hooks, state and subclass types in the file are dropped. Other
    rebuilds (quantized, sparse, nested, meta tensors) become placeholders:
    their entries are dropped, and :func:`recording` lets the caller say so;
  - values, never called: the ``torch.<dtype>`` objects, ``torch.Tensor``,
    ``torch.nn.Parameter`` and ``torch.UntypedStorage`` (for the type test in
    torch's own ``persistent_load``). Typed storage names (``torch.
    FloatStorage``) never reach us: torch's wrapper maps them to its inert
    ``StorageType``.
* ``REDUCE``, ``INST``, ``OBJ`` call an object from the stack. Ours calls it
  only if it *is* (identity) one of the table's callables; a placeholder
  class or instance "called" this way yields a new placeholder instance;
  anything else (a value from the table, a tensor, a storage) is refused
  with ``UnpicklingError``.
* ``NEWOBJ`` / ``NEWOBJ_EX`` call ``cls.__new__``: only placeholder classes
  are accepted (they yield a placeholder instance); anything else is refused.
* ``BUILD`` calls ``__setstate__`` or sets attributes: ours discards the
  state, on every object, so no ``__setstate__`` and no ``setattr`` runs.
* ``SETITEM(S)``, ``APPEND(S)``, ``ADDITEMS`` call ``__setitem__``,
  ``extend``/``append``, ``add``: ours fill only exact ``dict`` /
  ``OrderedDict``, ``list`` and ``set`` objects, discard the items given to
  a placeholder, and refuse any other target.
* ``EXT1``/``EXT2``/``EXT4`` look names up in copyreg's extension registry
  and cache, which a C unpickler consults before ``find_class``: refused
  (``torch.save`` never emits them). ``NEXT_BUFFER``/``READONLY_BUFFER``
  (out-of-band buffers): refused. Any byte that is not a known opcode:
  refused.
* ``PERSID`` / ``BINPERSID`` go to the ``persistent_load`` torch installs,
  which only makes storages (its type checks see our table's values).
* Every other opcode (constants, ``MARK``, memo, ``LIST``, ``TUPLE*``,
  ``DICT``, ``FROZENSET``, ``FRAME``, ``PROTO``, ``STOP``) only builds
  builtin values; the only methods it can reach are the hashes of dict keys
  and set items, which for a placeholder or a tensor are ``object``'s.

The unpickler is the pure-Python one (``pickle._Unpickler``) with its
dispatch table rebuilt from an allowlist of opcodes, so every opcode above
runs Python code written here or in ``pickle`` itself, never C code that
could take a shortcut (the C unpickler's extension cache). Its speed does
not matter: a checkpoint's pickle holds the metadata only, the tensor bytes
are read by torch.

Files this module refuses outright (``check_container``): TorchScript
archives, which ``torch.load`` would hand to ``torch.jit.load`` and so run
their code, and legacy tar files (PyTorch < 0.4), which ``torch.load``
extracts to a temporary directory.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import pickletools
import tarfile
import threading

import torch

__all__ = ["ALLOWED", "Inert", "Unpickler", "check_container", "load", "loads", "recording", "tensors_only"]

UnpicklingError = pickle.UnpicklingError


class Inert:
    """Stands for an object the checkpoint names that is never imported.

    Subclassed once per pickled ``module.name`` and load (``pickled_name``
    says which), so a dict keyed by classes keeps distinct keys. Hashable by
    identity; instances hold nothing.
    """

    __slots__ = ()
    pickled_name = "?"
    dump_patches = False  # read by torch's legacy-format source check; never write a patch file

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return type(self)()

    def __repr__(self):
        return f"<{self.pickled_name} (not unpickled)>"


def _is_inert(obj) -> bool:
    return isinstance(obj, Inert) or (isinstance(obj, type) and issubclass(obj, Inert))


# ----------------------------------------------------------------- tensor rebuilds
def _check_storage(storage, fn: str) -> None:
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnpicklingError(f"{fn}: expected a storage read by torch.load, got {type(storage).__name__}")


def _check_ints(value, what: str, fn: str, sequence: bool) -> None:
    if sequence:
        ok = type(value) is tuple and all(type(v) is int for v in value)
    else:
        ok = type(value) is int
    if not ok:
        kind = "a tuple of ints" if sequence else "an int"
        raise UnpicklingError(f"{fn}: {what} must be {kind}, got {value!r:.80}")


def _check_metadata(metadata, fn: str) -> None:
    if metadata is None:
        return
    if type(metadata) is not dict or not all(type(k) is str and type(v) is bool for k, v in metadata.items()):
        raise UnpicklingError(f"{fn}: tensor metadata must be a dict of str to bool, got {metadata!r:.80}")


def _check_view(storage, storage_offset, size, stride, dtype, fn: str) -> None:
    """The view fits in the storage: torch's ``set_`` would grow the storage instead of refusing."""
    _check_storage(storage, fn)
    _check_ints(storage_offset, "storage_offset", fn, sequence=False)
    _check_ints(size, "size", fn, sequence=True)
    _check_ints(stride, "stride", fn, sequence=True)
    if len(size) != len(stride) or storage_offset < 0 or min(size + stride, default=0) < 0:
        raise UnpicklingError(f"{fn}: bad view: offset {storage_offset}, size {size}, stride {stride}")
    if 0 in size:
        return
    end = storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end * itemsize > storage._untyped_storage.nbytes():
        raise UnpicklingError(
            f"{fn}: a tensor of size {size}, stride {stride}, offset {storage_offset} does not fit in its "
            f"storage of {storage._untyped_storage.nbytes()} bytes (the file is corrupt)"
        )


def _rebuild_tensor(storage, storage_offset, size, stride):
    _check_storage(storage, "_rebuild_tensor")  # before storage.dtype is read
    _check_view(storage, storage_offset, size, stride, storage.dtype, "_rebuild_tensor")
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _check_metadata(metadata, "_rebuild_tensor_v2")
    tensor = _rebuild_tensor(storage, storage_offset, size, stride)
    if metadata:
        torch._utils.set_tensor_metadata(tensor, metadata)
    return tensor


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    fn = "_rebuild_tensor_v3"
    if not isinstance(dtype, torch.dtype):
        raise UnpicklingError(f"{fn}: dtype must be a torch.dtype, got {type(dtype).__name__}")
    _check_view(storage, storage_offset, size, stride, dtype, fn)
    _check_metadata(metadata, fn)
    return torch._utils._rebuild_tensor_v3(
        storage, storage_offset, size, stride, False, collections.OrderedDict(), dtype, metadata
    )


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, torch.Tensor):
        raise UnpicklingError(f"_rebuild_parameter: expected a tensor, got {type(data).__name__}")
    return data


_REBUILDS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    if not any(func is f for f in _REBUILDS) or type(args) is not tuple:
        raise UnpicklingError(f"_rebuild_from_type_v2: expected a tensor rebuild, got {type(func).__name__}")
    return func(*args)  # the subclass type and its state are dropped


_CALLABLES = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}
_VALUES = {
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "UntypedStorage"): torch.UntypedStorage,
    ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
}
ALLOWED = {**_VALUES, **_CALLABLES}
"""Every ``(module, name)`` a checkpoint may name and get a real object for."""
_CALLABLE_OBJECTS = tuple(_CALLABLES.values())


# ----------------------------------------------------------------- the unpickler
_OPNAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}

# Opcodes kept as pickle implements them: they build builtin values only.
_KEEP = (
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
    "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
    "EMPTY_LIST", "LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_DICT", "DICT",
    "EMPTY_SET", "FROZENSET",
    "GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE",
    "GLOBAL", "STACK_GLOBAL",  # both resolve through find_class
    "PERSID", "BINPERSID",  # both go to torch's persistent_load
)


def _call(func, args):
    if type(args) is not tuple:
        raise UnpicklingError(f"call arguments must be a tuple, got {type(args).__name__}")
    if isinstance(func, type) and issubclass(func, Inert):
        return func()
    if isinstance(func, Inert):
        return type(func)()
    if any(func is f for f in _CALLABLE_OBJECTS):
        return func(*args)
    raise UnpicklingError(f"refusing to call {type(func).__name__} {func!r:.80}: only tensor rebuilds are called")


def _new(cls):
    if isinstance(cls, type) and issubclass(cls, Inert):
        return cls()
    raise UnpicklingError(f"refusing to create an object of {cls!r:.80}: only placeholders are created")


def _load_reduce(self):
    args = self.stack.pop()
    self.stack[-1] = _call(self.stack[-1], args)


def _load_inst(self):
    module = self.readline()[:-1].decode("ascii")
    name = self.readline()[:-1].decode("ascii")
    klass = self.find_class(module, name)
    args = tuple(self.pop_mark())  # before self.append is looked up: pop_mark replaces it
    self.append(_call(klass, args))


def _load_obj(self):
    args = self.pop_mark()
    if not args:
        raise UnpicklingError("OBJ without a class")
    klass = args.pop(0)
    self.append(_call(klass, tuple(args)))


def _load_newobj(self):
    self.stack.pop()  # args
    self.append(_new(self.stack.pop()))


def _load_newobj_ex(self):
    self.stack.pop()  # kwargs
    self.stack.pop()  # args
    self.append(_new(self.stack.pop()))


def _load_build(self):
    self.stack.pop()  # the state is never applied: no __setstate__, no setattr


def _fill(target, kind: str, items: list) -> None:
    if _is_inert(target):
        return
    if kind == "dict" and type(target) in (dict, collections.OrderedDict):
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]
    elif kind == "list" and type(target) is list:
        target.extend(items)
    elif kind == "set" and type(target) is set:
        target.update(items)
    else:
        raise UnpicklingError(f"refusing to add {kind} items to a {type(target).__name__}")


def _load_setitem(self):
    value = self.stack.pop()
    key = self.stack.pop()
    _fill(self.stack[-1], "dict", [key, value])


def _load_setitems(self):
    items = self.pop_mark()
    if len(items) % 2:
        raise UnpicklingError("SETITEMS with an odd number of items")
    _fill(self.stack[-1], "dict", items)


def _load_append(self):
    value = self.stack.pop()
    _fill(self.stack[-1], "list", [value])


def _load_appends(self):
    items = self.pop_mark()
    _fill(self.stack[-1], "list", items)


def _load_additems(self):
    items = self.pop_mark()
    _fill(self.stack[-1], "set", items)


def _refuser(code: int):
    name = _OPNAMES.get(code, f"byte 0x{code:02x}")

    def refuse(self):
        raise UnpicklingError(f"pickle opcode {name} is not allowed in a checkpoint")

    return refuse


def _dispatch() -> dict:
    base = pickle._Unpickler.dispatch
    table = {code: _refuser(code) for code in range(256)}
    codes = {name: code for code, name in _OPNAMES.items()}
    for name in _KEEP:
        table[codes[name]] = base[codes[name]]
    own = {
        "REDUCE": _load_reduce, "INST": _load_inst, "OBJ": _load_obj, "NEWOBJ": _load_newobj,
        "NEWOBJ_EX": _load_newobj_ex, "BUILD": _load_build, "SETITEM": _load_setitem,
        "SETITEMS": _load_setitems, "APPEND": _load_append, "APPENDS": _load_appends, "ADDITEMS": _load_additems,
    }
    for name, handler in own.items():
        table[codes[name]] = handler
    return table


class Unpickler(pickle._Unpickler):
    """An unpickler whose ``find_class`` imports nothing (see the module docstring)."""

    dispatch = _dispatch()

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self._placeholders: dict = {}

    def find_class(self, module, name):
        key = (module, name)
        if key in ALLOWED:
            return ALLOWED[key]
        cls = self._placeholders.get(key)
        if cls is None:
            cls = type("Inert", (Inert,), {"__slots__": (), "pickled_name": f"{module}.{name}"})
            self._placeholders[key] = cls
            names = getattr(_RECORDING, "names", None)
            if names is not None:
                names.append(cls.pickled_name)
        return cls


_RECORDING = threading.local()


@contextlib.contextmanager
def recording():
    """Collects, in the list it yields, the ``module.name`` of every placeholder
    made in this thread meanwhile (torch.load makes the unpickler, so this is
    how its caller learns what was not unpickled)."""
    previous = getattr(_RECORDING, "names", None)
    _RECORDING.names = names = []
    try:
        yield names
    finally:
        _RECORDING.names = previous


def load(file, **kwargs):
    """``pickle.load`` with :class:`Unpickler` (torch's legacy format reads its headers with it)."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs):
    return Unpickler(io.BytesIO(data), **kwargs).load()


# ----------------------------------------------------------------- before and after torch.load
def check_container(f) -> str | None:
    """Why ``torch.load`` must not see the open binary file ``f``, or None.

    A zip that holds ``constants.pkl`` is a TorchScript archive (torch.load
    would call ``torch.jit.load``); a tar is the legacy format torch.load
    extracts to disk. ``f`` is left at offset 0.
    """
    f.seek(0)
    head = f.read(4)
    f.seek(0)
    try:
        if head == b"PK\x03\x04":
            try:
                records = torch._C.PyTorchFileReader(f).get_all_records()
            except RuntimeError:
                return None  # torch.load fails on it the same way, and says why
            if "constants.pkl" in records:
                return "it is a TorchScript archive (torch.jit.save), whose loading would run its code"
            return None
        try:
            with tarfile.open(fileobj=f, mode="r:"):
                return "it is a legacy tar checkpoint (PyTorch < 0.4), which pyvq does not read"
        except tarfile.TarError:
            return None
    finally:
        f.seek(0)


def tensors_only(obj, _memo=None):
    """The tensors of ``obj``: tensors, and dicts (str keys) down to them.

    Everything else (numbers, strings, lists, placeholders, entries keyed by
    a class) is dropped; a dict left empty is dropped too. Returns None when
    nothing is left. Shared and cyclic dicts are visited once.
    """
    memo = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        return obj
    if type(obj) not in (dict, collections.OrderedDict):
        return None
    if id(obj) in memo:
        return memo[id(obj)]
    memo[id(obj)] = None  # a cycle back to this dict contributes nothing
    out = {}
    for key, value in dict.items(obj):
        if type(key) is str:
            kept = tensors_only(value, memo)
            if kept is not None:
                out[key] = kept
    memo[id(obj)] = out or None
    return memo[id(obj)]
