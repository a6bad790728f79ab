"""kdstore stands alone: it never imports pipeline, flows, prefect, and only torch_stream imports torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import kdstore

KDSTORE_DIR = Path(kdstore.__file__).parent
FORBIDDEN = ("pipeline", "flows", "prefect", "torch", "transformers")
TORCH_MODULES = {"torch_stream.py"}  # the one module allowed to import torch

CHECK = """
import json, sys
import kdstore, kdstore.writer, kdstore.reader, kdstore.verify
import kdstore.codecs, kdstore.fields, kdstore.spec, kdstore.shard_io, kdstore.records, kdstore.location
forbidden = {forbidden!r}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print(json.dumps(loaded))
"""


def test_importing_the_store_pulls_in_no_pipeline_and_no_torch():
    proc = subprocess.run(
        [sys.executable, "-c", CHECK.format(forbidden=FORBIDDEN)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_kdstore_module_imports_upwards():
    modules = sorted(KDSTORE_DIR.glob("*.py"))
    assert {"writer.py", "reader.py", "verify.py"} <= {p.name for p in modules}
    for path in modules:
        allowed_torch = path.name in TORCH_MODULES
        bad = {r for r in _imported_roots(path) if r in FORBIDDEN and not (allowed_torch and r == "torch")}
        assert not bad, f"kdstore/{path.name} imports {sorted(bad)}"
