"""The package surface and the one-way import direction of DESIGN.md.

Imports are read from the source (``ast``), so an import inside a function
counts as much as one at the top of a module. The rules:

- ``pyvq._checks`` (argument checks, dtype rules) imports only torch and the
  standard library; every layer may use it.
- ``reference`` imports only torch (and ``pyvq._checks``);
- ``ops`` imports ``reference`` and the extension;
- ``nn`` imports ``ops`` (and ``pyvq._collectives``, the blocking
  collectives that wait for gloo's worker thread; it imports only torch);
- ``models`` import ``nn`` and ``ops`` (and ``pyvq._hub``, the Hub folder
  resolver of ``from_pretrained``), never ``losses``, ``train``, ``data``
  or ``cli``;
- ``losses`` import ``nn``;
- ``train``, ``cli`` and ``demo`` may import anything below them;
- no module imports another layer's private (``_name``) names.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

import pyvq

PKG = pathlib.Path(pyvq.__file__).resolve().parent
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

# The pyvq modules each layer may import (besides its own layer).
ALLOWED = {
    "_checks": set(),
    "_collectives": set(),
    "reference": {"_checks"},
    "ops": {"_checks", "_backend", "_C", "reference", "triton_kernels"},
    "nn": {"_checks", "_collectives", "ops", "reference"},
    "models": {"_checks", "_hub", "nn", "ops", "reference"},
    "losses": {"_checks", "_weights", "nn", "ops", "reference"},
}
# Layers whose third-party imports are limited too (the references are plain PyTorch).
THIRD_PARTY = {"_checks": {"torch"}, "_collectives": {"torch"}, "reference": {"torch"}}
LAZY = ("nn", "models", "convert", "losses", "metrics", "data", "train", "refit")


def _layer(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(tree: ast.AST, module: str):
    """(line, absolute module, imported names) for every import in ``tree``."""
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield node.lineno, base, [a.name for a in node.names]


def violations(root: pathlib.Path) -> list[str]:
    """Every import under ``root`` (a pyvq package directory) that breaks the rules."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        module = ".".join(("pyvq",) + rel.with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")] + ".__init__"
        layer = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for line, target, names in _imports(ast.parse(path.read_text()), module):
            where = f"{rel}:{line}"
            top = target.split(".")[0]
            if top == "pyvq":
                parts = target.split(".")
                if len(parts) == 1:  # from pyvq import x, y: each name is a submodule
                    targets = [(n, [n]) for n in names]
                else:
                    targets = [(parts[1], names)]
                for other, imported in targets:
                    if other == layer or other == "__version__":
                        pass
                    elif layer in ALLOWED and other not in ALLOWED[layer]:
                        found.append(f"{where}: layer '{layer}' imports pyvq.{other}")
                    private = [n for n in imported if n.startswith("_") and not n.startswith("__")]
                    if other != layer and private and not (len(parts) == 1 and other.startswith("_")):
                        found.append(f"{where}: imports private {private} from pyvq.{other}")
            elif layer in THIRD_PARTY and top not in STDLIB and top not in THIRD_PARTY[layer]:
                found.append(f"{where}: layer '{layer}' imports {target}")
    return found


def test_imports_flow_one_way():
    assert violations(PKG) == []


@pytest.mark.parametrize("layer,source,expect", [
    ("reference", "from pyvq.ops import nearest_code\n", "layer 'reference' imports pyvq.ops"),
    ("reference", "import numpy\n", "layer 'reference' imports numpy"),
    ("ops", "def f():\n    from pyvq.nn import VectorQuantizer\n", "layer 'ops' imports pyvq.nn"),
    ("nn", "from pyvq.models import VQGAN\n", "layer 'nn' imports pyvq.models"),
    ("models", "def f():\n    from pyvq.losses.wgan import ReconstructionWGANLoss\n", "layer 'models' imports pyvq.losses"),
    ("models", "from pyvq.data import BuiltinImages\n", "layer 'models' imports pyvq.data"),
    ("models", "from pyvq.train import trainer\n", "layer 'models' imports pyvq.train"),
    ("losses", "from pyvq.models import VQGAN\n", "layer 'losses' imports pyvq.models"),
    ("nn", "from pyvq.reference.grid import _corner\n", "imports private ['_corner'] from pyvq.reference"),
    ("_checks", "from pyvq import ops\n", "layer '_checks' imports pyvq.ops"),
])
def test_checker_catches(tmp_path, layer, source, expect):
    """The checker itself: each rule, broken once, is reported."""
    target = tmp_path / (f"{layer}.py" if layer.startswith("_") else f"{layer}/bad.py")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source)
    found = violations(tmp_path)
    assert any(expect in v for v in found), found


def test_checker_allows_the_rules(tmp_path):
    for layer, source in [
        ("reference", "import math\nimport torch\nfrom pyvq._checks import accumulation_dtype\n"),
        ("ops", "from pyvq import reference\nfrom pyvq.ops._common import use_kernel\n"),
        ("models", "from pyvq.nn import Encoder\nfrom pyvq.ops import nearest_code\n"),
        ("train", "from pyvq.losses import build_lpips\nfrom pyvq.models import VQGAN\n"),
    ]:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "ok.py").write_text(source)
    assert violations(tmp_path) == []


def test_subpackages_are_attributes_loaded_lazily():
    code = textwrap.dedent(f"""
        import sys
        import pyvq
        lazy = {LAZY!r}
        assert not [m for m in lazy if "pyvq." + m in sys.modules], sorted(sys.modules)
        assert set(lazy) <= set(dir(pyvq))
        assert pyvq.nn.VectorQuantizer.__name__ == "VectorQuantizer"
        assert callable(pyvq.convert.from_taming) and callable(pyvq.convert.from_diffusers)
        assert pyvq.models.VQGAN is pyvq.models.tokenizers.VQGAN
        for m in lazy:
            assert getattr(pyvq, m) is sys.modules["pyvq." + m]
        try:
            pyvq.no_such_module
        except AttributeError as exc:
            assert "no_such_module" in str(exc)
        else:
            raise AssertionError("pyvq.no_such_module did not raise")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(PKG.parent))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
