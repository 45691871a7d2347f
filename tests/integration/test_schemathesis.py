"""Schemathesis (a property-based API fuzzer) against the service's own `/openapi.json`: every route, every one
of its checks, a bounded number of examples. No 5xx, no response that breaks the document, and a document that
says what the service really requires (what it calls valid is accepted, what it calls invalid is refused)."""

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import app_args

REPO = Path(__file__).resolve().parents[2]

EXAMPLES = int(os.environ.get("ST_EXAMPLES", "25"))


def test_the_service_conforms_to_its_openapi_document(serve_url, tmp_path, tiny_model_dir, second_model_dir):
    max_inputs = app_args(tiny_model_dir, second_model_dir)["max_inputs_per_request"]
    schemathesis = Path(sys.executable).parent / "schemathesis"
    command = [
        str(schemathesis), "run", f"{serve_url}/openapi.json", "--checks", "all", "--max-examples", str(EXAMPLES),
        "--workers", "1", "--seed", os.environ.get("ST_SEED", "1"), "--request-timeout", "60", "--no-color",
        "--report", "junit", "--report-dir", str(tmp_path),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "CLIP_MAX_INPUTS": str(max_inputs),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    print(result.stdout[-20000:])
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
