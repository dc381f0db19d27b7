"""scripts/demo.py: the induction demo finds the head it is built to find, and caches its weights.

The full run trains for fewer steps than `make demo` (800, about 12 s on one core; induction
forms between 500 and 700 steps at seed 0), so the test stays under a minute on a 2-core CPU.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("matplotlib")

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "scripts")
sys.path.insert(0, SCRIPTS)

import induction  # noqa: E402

pytestmark = pytest.mark.transformers


@pytest.mark.slow
def test_demo_finds_the_induction_head(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "demo.py"), "--out", str(tmp_path), "--steps", "800"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "top head by patching:                layer 1 " in proc.stdout
    assert "found: the induction head" in proc.stdout
    for name in ("induction.pt", "restoration.png", "induction_heads.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_weights_are_cached_and_reloaded(tmp_path):
    config = induction.Config(steps=5)
    path = str(tmp_path / "induction.pt")
    trained, _, cached = induction.load_or_train(config, path)
    assert not cached
    loaded, _, cached = induction.load_or_train(config, path)
    assert cached
    for name, value in trained.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name])
    _, _, cached = induction.load_or_train(induction.Config(steps=6), path)
    assert not cached  # another config retrains


def test_corruption_keeps_the_second_copy():
    clean, corrupt = induction.clean_and_corrupt(induction.Config(), batch=4)
    half = induction.Config().half
    assert torch.equal(clean[:, :half], clean[:, half:])
    assert torch.equal(corrupt[:, half:], clean[:, half:])
    for row in range(4):  # nothing in the corrupted first copy can be copied
        assert not set(corrupt[row, :half].tolist()) & set(clean[row, :half].tolist())
