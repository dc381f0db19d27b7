"""scripts/gpu_check.py in its CPU smoke-test mode: the same code paths as the GPU run.

One subprocess (about a minute on a 2-core CPU with warm Inductor caches): the script must print
one JSON object, write the same to ``--json``, pass every correctness check and exit 0.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_check.py")
# Every test here reads one run of the script (about a minute on the CPU machine): CI runs them.
pytestmark = pytest.mark.slow
SECTIONS = {"forward", "reduce_overhead", "bench", "sweep", "generate"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_check") / "tiny.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--json", str(path)],
        capture_output=True, text=True, timeout=900,
    )
    return proc, path


def test_tiny_run_passes_and_exits_zero(tiny_run):
    proc, path = tiny_run
    assert proc.returncode == 0, proc.stderr[-6000:]
    printed, written = json.loads(proc.stdout), json.loads(path.read_text())
    assert printed["ok"] is True and written["ok"] is True
    assert printed["failed_checks"] == [] and printed["errors"] == []
    assert printed.keys() == written.keys()


def test_tiny_json_structure(tiny_run):
    _, path = tiny_run
    result = json.loads(path.read_text())
    for key in ("torch", "device", "device_name", "dtypes", "threads", "sizes", "wall_seconds", "backends"):
        assert key in result, key
    assert result["device_name"] == "cpu" and result["dtypes"] == ["float32"] and result["threads"] >= 1
    assert result["sizes"]["layers"] == 2 and result["sizes"]["width"] == 64
    sections = result["results"]["float32"]
    assert set(sections) == SECTIONS
    for name, entry in sections.items():
        assert entry["error"] is None, (name, entry["error"])
    assert "CUDA" in sections["reduce_overhead"]["skipped"]


def test_tiny_checks_all_pass(tiny_run):
    _, path = tiny_run
    sections = json.loads(path.read_text())["results"]["float32"]
    forward = sections["forward"]["checks"]
    assert {name.split()[0] for name in forward} == {"ZeroPatch", "AddPatch", "ReplacePatch"}
    checks = [check for entry in sections.values() for check in entry["checks"].values()]
    assert len(checks) == 6  # 3 patch kinds, the sweep, patched generate, generate's variant count
    for check in checks:
        assert check["passed"] is True, check
        if "max_abs_err" in check:
            assert 0 <= check["max_abs_err"] <= check["tolerance"]
    assert all(check["patch_effect"] > check["tolerance"] for check in forward.values())


def test_tiny_figures(tiny_run):
    _, path = tiny_run
    sections = json.loads(path.read_text())["results"]["float32"]
    bench = sections["bench"]["figures"]
    for batch in json.loads(path.read_text())["sizes"]["batches"]:
        ratios = bench[f"ratios, batch {batch}"]
        assert ratios["patched compiled / unpatched Inductor"] > 0
    assert any(label.startswith("inductor plain, batch 1") for label in bench["compile seconds"])
    assert any(label.startswith("graphpatch first patched call") for label in bench["compile seconds"])
    sweep = sections["sweep"]["figures"]
    # One program per fan-out point of the sweep (issue 14's prefix reuse), each compiled once.
    assert sweep["sweep variants compiled"] == len(sweep["sweep fan-out cuts"]) >= 1
    assert set(sweep["ratios"]) == {
        "pb.sweep vs eager hook loop (excluding compile)",
        "pb.sweep vs eager hook loop (including compile)",
        "pb.sweep vs hand-batched eager hooks (excluding compile)",
    }
