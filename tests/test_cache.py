"""pb.save_cache / pb.load_cache: a second process with a fresh cache directory compiles
(nearly) nothing for the same model and patch structures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Optional

import pytest
import torch

import patch_backend as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process: a tiny 2-layer GPT-2, its plain graph and one patched structure, compiled
# through compile_regional as the dispatcher will (regions share one block artifact).
SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import patch_backend as pb
    from patch_backend import AddPatch
    from patch_backend._torch_compat.inductor import fx_graph_cache_counters
    from transformers import GPT2Config, GPT2LMHeadModel

    action, path = sys.argv[1], sys.argv[2]
    if action == "load":
        pb.load_cache(path)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0,
                        eos_token_id=0, use_cache=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.arange(8).reshape(1, 8)
    compiled = torch.compile(model, backend="graphpatch")
    with torch.no_grad():
        plain = compiled(ids).logits
        with pb.patch(compiled, {"transformer.h_1.mlp.act.mul_1": AddPatch(value=0.5)}):
            patched = compiled(ids).logits
    result = {"counters": fx_graph_cache_counters(), "compile_seconds": pb.stats(compiled).compile_seconds,
              "plain": plain.sum().item(), "patched": patched.sum().item()}
    if action == "save":
        result["file"] = pb.save_cache(path).artifacts
    print("RESULT " + json.dumps(result))
    """
)


def run(action: str, path: str, cache_dir: Optional[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    if cache_dir is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    done = subprocess.run([sys.executable, "-c", SCRIPT, action, path], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_saved_cache_serves_a_fresh_process(tmp_path):
    path = str(tmp_path / "compiled.pbcache")
    # The first process may use the usual (warm) cache directory: artifacts served from it are
    # saved too, and a cold one would spend minutes compiling C++ kernels on this machine.
    first = run("save", path, None)
    compiles = sum(first["counters"][kind] for kind in ("fxgraph_cache_miss", "fxgraph_cache_hit"))
    assert first["file"].get("inductor", 0) == compiles > 0
    second = run("load", path, str(tmp_path / "fresh"))  # a fresh, empty cache directory
    assert second["counters"]["fxgraph_cache_hit"] == compiles
    assert second["counters"]["fxgraph_cache_miss"] == 0 and second["counters"]["autograd_cache_miss"] == 0
    assert second["plain"] == pytest.approx(first["plain"], rel=1e-5)
    assert second["patched"] == pytest.approx(first["patched"], rel=1e-5)


def test_save_and_load_in_one_process(tmp_path):
    """The fast set's round trip (the two-process test above is slow): what this process
    compiled, plain and patched, is written with its header and read back whole."""
    model, x = torch.nn.Linear(2, 3), torch.randn(4, 2)
    compiled = torch.compile(model, backend="graphpatch")
    compiled(x)
    with pb.patch(compiled, {"output": pb.AddPatch(value=1.0)}):
        torch.testing.assert_close(compiled(x), model(x) + 1)
    assert pb.stats(compiled).variants_compiled == 1
    path = tmp_path / "compiled.pbcache"
    saved = pb.save_cache(path)
    assert saved.artifacts.get("inductor", 0) >= 2 and saved.size > 0  # at least this test's two
    from patch_backend.cache import _MAGIC

    assert path.read_bytes().startswith(_MAGIC)
    loaded = pb.load_cache(path)
    assert (loaded.artifacts, loaded.size, loaded.torch_version) == (saved.artifacts, saved.size, torch.__version__)


def test_missing_and_damaged_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cache file"):
        pb.load_cache(tmp_path / "absent.pbcache")
    stranger = tmp_path / "stranger.bin"
    stranger.write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="not a patch_backend cache file"):
        pb.load_cache(stranger)
    from patch_backend.cache import _MAGIC

    old = tmp_path / "old.pbcache"
    old.write_bytes(_MAGIC + json.dumps({"torch": "1.0", "artifacts": {}}).encode() + b"\n" + b"x")
    with pytest.raises(ValueError, match="written by torch 1.0"):
        pb.load_cache(old)
    damaged = tmp_path / "damaged.pbcache"
    damaged.write_bytes(_MAGIC + json.dumps({"torch": torch.__version__, "artifacts": {}}).encode() + b"\n" + b"junk")
    with pytest.raises(ValueError, match="damaged"):
        pb.load_cache(damaged)
