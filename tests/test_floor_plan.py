"""The floor plan holds: a remote-engine gateway loads neither vLLM nor transformers, and
the request path is made of short functions (docs/architecture.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
MAX_SERVE_LINES = 30

_REMOTE_GATEWAY = """
import json, os, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

os.environ["GENREC_ENGINE"] = "remote"
from service.api.app import create_app
from model_store.engines import open_engine
from service.recommendations import Recommendations

app = create_app()
model = Path(sys.argv[1])
save_file({"model.embed_tokens.weight": torch.zeros(8, 4)}, str(model / "model.safetensors"))
engine = open_engine("remote", model, base_url="http://127.0.0.1:9", timeout_s=0.1)
ready = engine.ready()
engine.close()
print(json.dumps({"ready": ready, "loaded": sorted(
    m for m in ("vllm", "transformers") if m in sys.modules)}))
"""


def test_remote_gateway_loads_neither_vllm_nor_transformers(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _REMOTE_GATEWAY, str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=True,
    )  # fmt: skip
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer == {"ready": False, "loaded": []}  # nothing listens on port 9


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


@pytest.mark.parametrize("path", sorted((ROOT / "service").rglob("*.py")), ids=str)
def test_request_path_functions_are_short(path: Path) -> None:
    if "proto" in path.parts:
        pytest.skip("generated code")
    long = [
        f"{f.name} ({(f.end_lineno or f.lineno) - f.lineno + 1} lines)"
        for f in _functions(ast.parse(path.read_text()))
        if (f.end_lineno or f.lineno) - f.lineno + 1 > MAX_LINES
    ]
    assert not long, f"{path.relative_to(ROOT)}: over {MAX_LINES} lines: {long}"


def test_serve_reads_as_a_short_list_of_steps() -> None:
    tree = ast.parse((ROOT / "service" / "recommendations.py").read_text())
    (serve,) = [f for f in _functions(tree) if f.name == "serve"]
    assert (serve.end_lineno or 0) - serve.lineno + 1 <= MAX_SERVE_LINES
