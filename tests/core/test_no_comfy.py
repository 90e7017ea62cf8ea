"""psedit_core must work with no ComfyUI anywhere: no import of `comfy*`, statically or at run time."""

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "psedit_core"
HOST_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "execution", "server")


def test_no_host_imports_in_source():
    offending = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offending += [f"{path.name}: {n}" for n in names if n.split(".")[0] in HOST_MODULES]
    assert not offending, offending
    assert len(list(CORE.rglob("*.py"))) >= 7


def test_imports_with_comfy_blocked():
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        f"    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {HOST_MODULES!r}: raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pkgutil, importlib, psedit_core\n"
        "mods = [m.name for m in pkgutil.iter_modules(psedit_core.__path__)]\n"
        "for m in mods: importlib.import_module('psedit_core.' + m)\n"
        "assert not any(k.split('.')[0] in %r for k in sys.modules), 'a host module was imported'\n"
        "print(len(mods))\n" % (HOST_MODULES,)
    )
    out = subprocess.run([sys.executable, "-c", blocker], check=True, capture_output=True, text=True,
                         cwd=CORE.parent)
    assert int(out.stdout.strip()) >= 7
