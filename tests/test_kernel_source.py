"""Rules for Triton kernel source that the CPU interpreter cannot check (CI has no GPU to compile on)."""
import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def jit_functions():
    for path in sorted(KERNELS.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list):
                yield path, fn


def test_the_rule_sees_every_kernel():
    decorated = sum(path.read_text().count("@triton.jit") for path in KERNELS.rglob("*.py"))
    assert len(list(jit_functions())) == decorated >= 20


def test_no_kernel_assigns_underscore():
    # Compiled Triton gives a name one type per scope: `_` holding an int32 and then, inside an `if` or a
    # loop, a tensor fails to compile on the GPU (by_chunk.py did, session 9), while the interpreter runs it.
    found = [f"{path.relative_to(KERNELS)}:{node.lineno} in {fn.name}"
             for path, fn in jit_functions() for node in ast.walk(fn)
             if isinstance(node, ast.Name) and node.id == "_" and isinstance(node.ctx, ast.Store)]
    assert not found, f"name the unused values instead of assigning `_` in Triton kernels: {found}"
