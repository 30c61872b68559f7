"""Lightning checkpoints read without running any code they hold.

Each checkpoint here carries traps: pickled objects that, unpickled the
ordinary way, write a file into tmp_path (through a test function,
``os.system`` or ``exec``) or set a module-level flag (``__setstate__``,
``__reduce__``). The control test shows the traps do fire under a plain
``torch.load(weights_only=False)``; every other test checks that pyvq's
reader loads the weights exactly and that no trap fires, or that a file
which is not a checkpoint is refused with one ValueError naming it.
"""

from __future__ import annotations

import argparse
import builtins
import io
import os
import pickle
import tarfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyvq.convert import _safe_unpickle, from_diffusers, from_taming
from pyvq.convert.files import torch_load
from tests.test_convert import (  # noqa: F401  (taming_source is a fixture)
    KL_DIR_CONFIG,
    _assert_same_weights,
    _kl_pyvq_source,
    _write_diffusers_dir,
    taming_source,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS: list = []  # a trap that fires appends here


@pytest.fixture(autouse=True)
def _clear_flags():
    FLAGS.clear()
    yield
    FLAGS.clear()


def _touch(path):
    with open(path, "w") as f:
        f.write("the trap fired")
    FLAGS.append(("touch", path))
    return {}


class _WritesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (_touch, (self.path,))


class _System:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


class _Exec:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.path!r}, 'w').close()",))


class _SetsFlag:
    """Pickled by copyreg's NEWOBJ + BUILD; its __setstate__ is the trap."""

    def __init__(self):
        self.lr = 4.5e-6

    def __setstate__(self, state):
        FLAGS.append(("setstate", state))
        self.__dict__.update(state)


class _NewArgs:
    """NEWOBJ_EX (protocol 4) with a __new__ that is the trap."""

    def __new__(cls, *args, **kwargs):
        if args or kwargs:  # only the unpickler passes them
            FLAGS.append(("new", args, kwargs))
        return super().__new__(cls)

    def __getnewargs_ex__(self):
        return (1,), {"k": 2}


class _AttributeDict(dict):
    """Lightning's hyper-parameter container is a dict subclass (NEWOBJ + SETITEMS)."""


class _TrapDict(dict):
    def __setitem__(self, key, value):
        FLAGS.append(("setitem", key))


class _TrapList(list):
    def extend(self, items):
        FLAGS.append(("extend", items))


class _TrapSet:
    def add(self, item):
        FLAGS.append(("add", item))


class _ModelCheckpoint:
    pass


class _EarlyStopping:
    pass


def _traps(tmp_path):
    return {
        "writes": _WritesFile(tmp_path / "by_function"),
        "system": _System(tmp_path / "by_os_system"),
        "exec": _Exec(tmp_path / "by_exec"),
        "setstate": _SetsFlag(),
        "newobj_ex": _NewArgs(),
    }


def _trap_files(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("by_"))


def _lightning_checkpoint(state, tmp_path):
    """A Lightning 1.x checkpoint's layout, with traps in its pickled objects."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    hparams = _AttributeDict(embed_dim=16, n_embed=256, ddconfig={"ch": 32, "ch_mult": (1, 2, 2)})
    ckpt = {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": state,
        "callbacks": {
            _ModelCheckpoint: {"best_model_score": torch.tensor(0.25), "best_model_path": "/ckpt/last.ckpt"},
            _EarlyStopping: {"wait_count": 0, "stopped_epoch": 0, "traps": _traps(tmp_path)},
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
        "hparams_namespace": argparse.Namespace(lr=4.5e-6, trap=_WritesFile(tmp_path / "by_namespace")),
        **_traps(tmp_path),
    }
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        ckpt["monitor_value"] = np.float64(0.5)
    return ckpt


FORMATS = [
    pytest.param(dict(), id="zip-proto2"),
    pytest.param(dict(pickle_protocol=4), id="zip-proto4"),
    pytest.param(dict(_use_new_zipfile_serialization=False), id="legacy-proto2"),
    pytest.param(dict(_use_new_zipfile_serialization=False, pickle_protocol=4), id="legacy-proto4"),
]


def test_control_the_traps_fire_under_a_plain_unpickle(taming_source, tmp_path):
    """Without this, a trap that never fires would make every test below pass."""
    _, state = taming_source
    path = tmp_path / "control.ckpt"
    torch.save(_lightning_checkpoint(state, tmp_path), path, pickle_protocol=4)
    torch.load(path, map_location="cpu", weights_only=False)
    assert _trap_files(tmp_path) == ["by_exec", "by_function", "by_namespace", "by_os_system"]
    kinds = sorted({flag[0] for flag in FLAGS})
    assert kinds == ["new", "setstate", "touch"]


@pytest.mark.parametrize("save_kwargs", FORMATS)
def test_lightning_checkpoint_loads_and_runs_nothing(taming_source, tmp_path, save_kwargs):
    source, state = taming_source
    path = tmp_path / "last.ckpt"
    torch.save(_lightning_checkpoint(state, tmp_path), path, **save_kwargs)

    model = from_taming(path, "vqgan_tiny")
    _assert_same_weights(model, source)
    assert _trap_files(tmp_path) == [] and FLAGS == []

    # only the tensors come back: the state dict; numbers, lists and class-keyed callbacks are dropped
    loaded = torch_load(str(path), "test")
    assert list(loaded) == ["state_dict"]
    assert loaded["state_dict"].keys() == state.keys()
    for key, value in state.items():
        assert loaded["state_dict"][key].dtype == value.dtype and torch.equal(loaded["state_dict"][key], value), key
    assert _trap_files(tmp_path) == [] and FLAGS == []


@pytest.mark.parametrize("save_kwargs", FORMATS)
def test_plain_state_dict_files_still_load(taming_source, tmp_path, save_kwargs):
    source, state = taming_source
    path = tmp_path / "weights.pt"
    torch.save(state, path, **save_kwargs)
    _assert_same_weights(from_taming(path, "vqgan_tiny"), source)
    safetensors_path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(safetensors_path))
    _assert_same_weights(from_taming(safetensors_path, "vqgan_tiny"), source)


def test_tensor_kinds_round_trip(tmp_path):
    """Every rebuild path torch.save emits: views, Parameters, conj bits, dtypes without a typed storage,
    tensors with Python attributes, a dict that holds itself."""
    view = torch.arange(10.0)[3:9:2]
    tagged = torch.randn(3)
    tagged.note = "a python attribute"  # saved through _rebuild_from_type_v2
    tensors = {
        "view": view,
        "param": torch.nn.Parameter(torch.randn(2, 3)),
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
        "uint16": torch.tensor([1, 2, 60000], dtype=torch.uint16),
        "float8": torch.randn(4).to(torch.float8_e4m3fn),
        "bfloat16": torch.randn(4).to(torch.bfloat16),
        "bool": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(7),
        "tagged": tagged,
    }
    for save_kwargs in ({}, {"_use_new_zipfile_serialization": False}):
        if save_kwargs:  # torch cannot read back the legacy format's untyped storages (uint16, float8) itself
            tensors = {k: v for k, v in tensors.items() if k not in ("uint16", "float8")}
        nested = {"weights": dict(tensors)}
        nested["weights"]["loop"] = nested  # a cycle: read once, contributes nothing
        path = tmp_path / "kinds.pt"
        torch.save(nested, path, **save_kwargs)
        got = torch_load(str(path), "test")["weights"]
        assert sorted(got) == sorted(tensors)
        for key, want in tensors.items():
            assert type(got[key]) is torch.Tensor and got[key].dtype == want.dtype, key
            assert got[key].shape == want.shape and got[key].is_conj() == want.is_conj(), key
            assert torch.equal(_bytes(got[key]), _bytes(want)), key


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("save_kwargs", FORMATS[::2])
def test_from_diffusers_bin_still_loads(tmp_path, save_kwargs):
    source = _kl_pyvq_source()
    _write_diffusers_dir(source, "AutoencoderKL", KL_DIR_CONFIG, tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), tmp_path / "diffusion_pytorch_model.bin", **save_kwargs)
    weights.unlink()
    model = from_diffusers(tmp_path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ----------------------------------------------------------------- opcodes, one by one
MOD = __name__.encode()


def _crafted(tmp_path) -> dict:
    """Hand-written pickles, each trying to reach a callable by one opcode."""
    p = repr(str(tmp_path / "by_crafted")).encode()
    return {
        # protocol 0/1: INST resolves a class and calls it with the marked args
        "INST": b"(S" + p + b"\ni" + MOD + b"\n_touch\n.",
        # OBJ calls the class found on the stack
        "OBJ": b"(c" + MOD + b"\n_touch\nS" + p + b"\no.",
        # GLOBAL + REDUCE through builtins: getattr(__import__('os'), 'system')('touch ...')
        "getattr-chain": (
            b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'touch " + p[1:]
            + b"\ntR."
        ),
        # protocol 4 STACK_GLOBAL + REDUCE, NEWOBJ_EX, BUILD with __setstate__
        "STACK_GLOBAL": pickle.dumps(_WritesFile(tmp_path / "by_crafted"), protocol=4),
        "NEWOBJ_EX": pickle.dumps(_NewArgs(), protocol=4),
        "BUILD": pickle.dumps(_SetsFlag(), protocol=2),
        # SETITEMS / APPENDS / ADDITEMS on a placeholder
        "SETITEMS": pickle.dumps(_TrapDict(a=1, b=2), protocol=2),
        "APPENDS": pickle.dumps(_TrapList([1, 2]), protocol=2),
        "ADDITEMS": b"\x80\x04c" + MOD + b"\n_TrapSet\n)\x81(K\x01\x90.",
    }


REFUSED = {
    "EXT1": b"\x80\x02\x82\x01.",
    "EXT2": b"\x80\x02\x83\x01\x00.",
    "EXT4": b"\x80\x02\x84\x01\x00\x00\x00.",
    "NEXT_BUFFER": b"\x80\x05\x97.",
    "READONLY_BUFFER": b"\x80\x05N\x98.",
    "unknown opcode": b"\x80\x02\xff.",
    "REDUCE on a value": b"ctorch\nTensor\n(tR.",
    "NEWOBJ on a value": b"\x80\x02ctorch\nTensor\n)\x81.",
    "NEWOBJ on an allowed callable": b"\x80\x02ccollections\nOrderedDict\n)\x81.",
    "rebuild without a storage": b"ctorch._utils\n_rebuild_tensor_v2\n(NI0\n(I2\nt(I1\ntI00\nNtR.",
    "SETITEM on a tuple": b"(tS'k'\nS'v'\ns.",
    "APPEND on a dict": b"}S'v'\na.",
}


def test_crafted_opcodes_reach_no_callable(tmp_path):
    # the same bytes do fire under the plain unpickler (so the check below can fail)
    for name, data in _crafted(tmp_path).items():
        pickle.loads(data)
        assert _trap_files(tmp_path) or FLAGS, name
        for f in tmp_path.iterdir():
            f.unlink()
        FLAGS.clear()
    for name, data in _crafted(tmp_path).items():
        out = _safe_unpickle.loads(data)
        assert isinstance(out, (_safe_unpickle.Inert, dict)), (name, out)
        assert _trap_files(tmp_path) == [] and FLAGS == [], name


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_opcodes_refused(name):
    with pytest.raises(pickle.UnpicklingError):
        _safe_unpickle.loads(REFUSED[name])


def test_placeholders_are_hashable_distinct_and_inert():
    data = pickle.dumps({_ModelCheckpoint: 1, _EarlyStopping: 2, "obj": _SetsFlag()}, protocol=2)
    out = _safe_unpickle.loads(data)
    keys = [k for k in out if k != "obj"]
    assert len(keys) == 2 and all(issubclass(k, _safe_unpickle.Inert) for k in keys)
    assert sorted(k.pickled_name for k in keys) == [f"{__name__}._EarlyStopping", f"{__name__}._ModelCheckpoint"]
    assert isinstance(out["obj"], _safe_unpickle.Inert) and FLAGS == []
    assert isinstance(out["obj"](), _safe_unpickle.Inert)  # calling one makes another placeholder, nothing else


def _legacy_file(main_pickle: bytes) -> bytes:
    """torch's legacy (non-zip) layout around a hand-written main pickle."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True, "type_sizes": {}}
    header = b"".join(pickle.dumps(x, protocol=2) for x in (MAGIC_NUMBER, PROTOCOL_VERSION, sys_info))
    return header + main_pickle + pickle.dumps([], protocol=2)


# ----------------------------------------------------------------- not checkpoints
def _not_checkpoints(tmp_path, state) -> dict:
    good = io.BytesIO()
    torch.save({"state_dict": state}, good)
    legacy = io.BytesIO()
    torch.save({"state_dict": state}, legacy, _use_new_zipfile_serialization=False)
    scripted = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = tarfile.TarInfo("storages")
        info.size = 4
        t.addfile(info, io.BytesIO(b"\x80\x02K\x00"))
    no_tensors = io.BytesIO()
    torch.save({"epoch": 3, "hyper_parameters": argparse.Namespace(lr=1.0), "state_dict": {"w": _SetsFlag()}},
               no_tensors)
    bare = io.BytesIO()
    torch.save(torch.zeros(3), bare)
    tensor_list = io.BytesIO()
    torch.save([torch.zeros(3)], tensor_list)
    crafted = _legacy_file(b"(S" + repr(str(tmp_path / "by_crafted")).encode() + b"\ni" + MOD + b"\n_touch\n.")
    return {
        "random.ckpt": (torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
                        .numpy().tobytes(), "reading it failed"),
        "text.ckpt": (b"model:\n  target: taming.models.vqgan.VQModel\n", "reading it failed"),
        "empty.ckpt": (b"", "reading it failed"),
        "truncated-zip.ckpt": (good.getvalue()[: len(good.getvalue()) // 2], "reading it failed"),
        "truncated-legacy.ckpt": (legacy.getvalue()[: len(legacy.getvalue()) - 100], "reading it failed"),
        "plain-pickle.ckpt": (pickle.dumps({"state_dict": dict(state)}, protocol=2), "reading it failed"),
        "scripted.pt": (scripted.getvalue(), "TorchScript archive"),
        "legacy.tar": (tar.getvalue(), "legacy tar checkpoint"),
        "no-tensors.ckpt": (no_tensors.getvalue(), "holds no tensor"),
        "bare-tensor.pt": (bare.getvalue(), "holds no tensor .*Tensor"),
        "tensor-list.pt": (tensor_list.getvalue(), "holds no tensor .*list"),
        "crafted-legacy.ckpt": (crafted, r"holds no tensor .*\._touch"),
    }


@pytest.mark.filterwarnings("ignore:`torch.jit.s:FutureWarning")  # the TorchScript archive is made with it
def test_not_checkpoints_refused(taming_source, tmp_path):
    _, state = taming_source
    small = {k: state[k] for k in list(state)[:3]}
    for name, (data, reason) in _not_checkpoints(tmp_path, small).items():
        path = tmp_path / name
        path.write_bytes(data)
        pattern = rf"^from_taming: cannot (read|use) '.*{name}': expected a torch\.save file .*but .*{reason}"
        with pytest.raises(ValueError, match=pattern):
            from_taming(path, "vqgan_tiny")
        assert _trap_files(tmp_path) == [] and FLAGS == [], name


def test_views_that_do_not_fit_their_storage_refused():
    """torch's set_ would grow the storage (uninitialised bytes) instead of refusing a corrupt view."""
    rebuild = _safe_unpickle.ALLOWED[("torch._utils", "_rebuild_tensor_v2")]
    storage = torch.arange(4.0).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    assert torch.equal(rebuild(typed, 1, (3,), (1,), False, None), torch.tensor([1.0, 2.0, 3.0]))
    bad = [(2, (3,), (1,)), (0, (2, 3), (3, 1)), (0, (5,), (1,)), (-1, (2,), (1,)), (0, (2,), (-1,)), (0, (2,), ())]
    for offset, size, stride in bad:
        with pytest.raises(pickle.UnpicklingError, match="does not fit|bad view"):
            rebuild(typed, offset, size, stride, False, None)
    assert storage.nbytes() == 16  # never grown


def test_dropped_tensor_kinds_are_warned_about(taming_source, tmp_path):
    source, state = taming_source
    path = tmp_path / "mixed.ckpt"
    torch.save({"state_dict": state, "extra": {"sparse": torch.eye(3).to_sparse()}}, path)
    with pytest.warns(UserWarning, match=r"mixed\.ckpt.*torch\._utils\._rebuild_sparse_tensor.*dropped") as record:
        model = from_taming(path, "vqgan_tiny")
    assert [w.filename for w in record] == [__file__]
    _assert_same_weights(model, source)
