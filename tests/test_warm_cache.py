"""What a second process with warm on-disk caches still does (issue 10, T7): every region of
a plain or patched program is served by torch's FX graph and AOTAutograd caches. Counts only,
never times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.package import sys_importer

import patch_backend as pb
from patch_backend import AddPatch, ReplacePatch, ZeroPatch
from patch_backend._torch_compat.inductor import fx_graph_cache_counters
from patch_backend.program import ops, regions
from patch_backend.program.spec import MaskedSlice, PatchKind, PatchOp, ScalarValue, SliceRange, WholeTensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_gpt2(layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0,
                        eos_token_id=0, use_cache=False)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def test_patch_functions_are_found_again_by_their_import_name():
    """AOTAutograd's cache key spells every global of a graph as an import line, found through
    torch.package's importer: a patch op must be found under its name, as the same object, and
    two forms must get two names (else the key could not tell their graphs apart)."""
    add = PatchOp(PatchKind.ADD, WholeTensor(), ScalarValue(0))
    masked = PatchOp(PatchKind.ADD, MaskedSlice((SliceRange(0, 1, None, True),)), ScalarValue(0))
    first = ops.patch_function(add)
    assert ops.patch_function(PatchOp(PatchKind.ADD, WholeTensor(), ScalarValue(0))) is first  # one per op
    module, name = sys_importer.get_name(first)
    assert module == "patch_backend.program.ops" and name.startswith("_patch_add_")
    other_module, other_name = sys_importer.get_name(ops.patch_function(masked))
    assert other_name != name
    assert first.__name__ == "add"  # FX still names the nodes after the kind
    assert type(first).__qualname__ == "PatchFunction"


def test_patched_programs_use_the_aot_autograd_cache():
    """Before, every region holding a zero/add/replace op bypassed AOTAutograd's cache (its key
    could not spell the op), so a warm process traced and partitioned it again."""
    model, ids = tiny_gpt2(2), torch.randint(0, 64, (1, 8))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="graphpatch")
    eager = torch.compile(model, backend="graphpatch_eager")
    patches = {"transformer.h_1.mlp.act.mul_1": AddPatch(value=0.5, slice=(slice(None), slice(2, 5))),
               "transformer.h_1.attn.output|sub_0": ZeroPatch(),
               "transformer.h_0.ln_2.output": ReplacePatch(value=torch.ones(32))}
    with pb.config.patch(compile_policy="sync"), torch.no_grad():
        compiled(ids)
        before, compiles = fx_graph_cache_counters(), regions.region_report().compiles
        with pb.patch(compiled, patches):
            got = compiled(ids).logits
        after = fx_graph_cache_counters()
        compiled_here = regions.region_report().compiles - compiles
        with pb.patch(eager, patches):
            want = eager(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    looked_up = sum(after[f"autograd_cache_{kind}"] - before[f"autograd_cache_{kind}"] for kind in ("hit", "miss"))
    assert compiled_here >= 1
    assert after["autograd_cache_bypass"] == before["autograd_cache_bypass"]
    assert looked_up == compiled_here


# Two processes on one fresh cache directory: a tiny 2-layer GPT-2, its plain program and one
# patched structure (ops in a block), compiled in the calling thread.
SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import patch_backend as pb
    from patch_backend import AddPatch
    from patch_backend._torch_compat.inductor import fx_graph_cache_counters
    from patch_backend.program.regions import region_report
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0,
                        eos_token_id=0, use_cache=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.arange(8).reshape(1, 8)
    compiled = torch.compile(model, backend="graphpatch")
    with torch.no_grad(), pb.config.patch(compile_policy="sync"):
        plain = compiled(ids).logits
        with pb.patch(compiled, {"transformer.h_1.mlp.act.mul_1": AddPatch(value=0.5, slice=(slice(None), 3))}):
            patched = compiled(ids).logits
    print("RESULT " + json.dumps({"counters": fx_graph_cache_counters(),
                                  "regions": region_report().compiles, "plain": plain.sum().item(),
                                  "patched": patched.sum().item()}))
    """
)


def run(cache_dir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_a_warm_second_process_is_served_from_disk_for_every_region(tmp_path):
    cache_dir = str(tmp_path / "cache")  # empty: the first process compiles everything
    first = run(cache_dir)
    second = run(cache_dir)
    assert first["counters"]["fxgraph_cache_miss"] == first["regions"] == 4  # prefix, block, suffix, patched block
    counters = second["counters"]
    assert second["regions"] == first["regions"]  # each region structure looked up once per process
    assert counters["fxgraph_cache_hit"] == counters["autograd_cache_hit"] == second["regions"]
    assert counters["fxgraph_cache_miss"] == counters["autograd_cache_miss"] == counters["autograd_cache_bypass"] == 0
    assert second["plain"] == pytest.approx(first["plain"], rel=1e-6)
    assert second["patched"] == pytest.approx(first["patched"], rel=1e-6)
