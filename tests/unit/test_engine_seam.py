"""The engine seam, checked on the source: DeepSpeed is imported in one folder only, the checkpoint
code never learns which engine wrote it, and the model knows nothing of parallelism."""

from __future__ import annotations

import ast
from pathlib import Path

import moe_dist

PACKAGE = Path(moe_dist.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against the package)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    here = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module or "")
    return out


def _files(sub: str = "") -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def test_deepspeed_is_imported_only_behind_the_seam():
    behind = PACKAGE / "parallel" / "deepspeed"
    offenders = [str(p.relative_to(PACKAGE)) for p in _files()
                 if behind not in p.parents and any(m.split(".")[0] == "deepspeed" for m in _imports(p))]
    assert not offenders, f"import deepspeed outside parallel/deepspeed/: {offenders}"


def test_checkpoint_code_knows_no_engine():
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in _imports(p)
                                                      if m.startswith(("moe_dist.parallel", "deepspeed", "accelerate")))
                 for p in _files("checkpoint")}
    assert not {k: v for k, v in offenders.items() if v}


def test_model_knows_no_parallelism():
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in _imports(p) if m.startswith(
        ("torch.distributed", "deepspeed", "accelerate", "moe_dist.parallel"))) for p in _files("model")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_import_scan_sees_relative_imports():
    """The checks above would pass vacuously if relative imports were misread."""
    found = _imports(PACKAGE / "parallel" / "deepspeed" / "setup.py")
    assert {"moe_dist.parallel.world", "moe_dist.parallel.deepspeed.config"} <= found, found
