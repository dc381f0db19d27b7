"""Regional compile (program/regions.py): one artifact per distinct block, patched blocks reused
across layers, results equal to the whole-graph compile and to eager."""

from __future__ import annotations

from typing import Any, List, Sequence

import pytest
import torch

import patch_backend as pb
from fixtures import NestedModel
from patch_backend import AddPatch, ReplacePatch, ZeroPatch
from patch_backend._torch_compat.inductor import compile_inductor
from patch_backend.program import regions
from patch_backend.program.regions import compile_regional, parse_module_path
from patch_backend.runtime import dispatcher as dispatcher_module
from patch_backend.sweep import last_sweep_report

WIDTH, HEADS, VOCAB, TOKENS = 32, 4, 64, 8


def tiny_gpt2(layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, n_embd=WIDTH, n_head=HEADS, vocab_size=VOCAB, n_positions=16,
                        bos_token_id=0, eos_token_id=0, use_cache=False)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def captured(model: torch.nn.Module, *args: Any):
    """The graph Dynamo hands a backend, with the backend's example inputs."""
    graphs = []

    def backend(gm, example):
        graphs.append((gm, list(example)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args)
    assert len(graphs) == 1
    return graphs[0]


class Counting:
    """A compile_fn that records the region graphs it compiles."""

    def __init__(self, inductor: bool) -> None:
        self.inductor = inductor
        self.graphs: List[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example: Sequence[Any]):
        self.graphs.append(gm)
        return compile_inductor(gm, example, {}) if self.inductor else gm.forward


@pytest.fixture(autouse=True)
def fresh_cache():
    regions.clear_region_cache()
    yield
    regions.clear_region_cache()


def test_module_paths_parse_both_spellings():
    assert parse_module_path("L['self'].transformer.h[3].mlp") == ("transformer", "h", "3", "mlp")
    assert parse_module_path("L['self'].transformer.h.3.mlp") == ("transformer", "h", "3", "mlp")
    assert parse_module_path("L['self'].blocks['a']") == ("blocks", "a")


def test_layers_share_one_block_artifact():
    """(Was test_twelve_layers_share_one_block_artifact: four layers show the same sharing, and
    Dynamo's capture, most of this test's cost, grows with the layers.)"""
    layers = 4
    model, ids = tiny_gpt2(layers), torch.randint(0, VOCAB, (2, TOKENS))
    gm, example = captured(model, ids)
    compile_fn = Counting(inductor=False)
    with torch.no_grad():
        program = compile_regional(gm, example, compile_fn, options={})
        assert program.report.regions == layers + 2 and program.report.container == "transformer.h"
        assert program.report.compiled == 3 and program.report.reused == layers - 1
        labels = [entry.label for entry in regions.region_report().history]
        assert labels == ["before transformer.h", "transformer.h[*]", "after transformer.h"]
        torch.testing.assert_close(program(*example)[0], model(ids).logits)
        # Another graph of the same structure (a 2-layer model) reuses all three artifacts.
        small_gm, small_example = captured(tiny_gpt2(2), ids)
        again = compile_regional(small_gm, small_example, compile_fn, options={})
    assert again.report.compiled == 0 and len(compile_fn.graphs) == 3
    # Canonical names: blocks differ only in which tensors they read.
    block = compile_fn.graphs[1]
    inputs = [n for n in block.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in inputs][:3] == ["in_0", "in_1", "in_2"]
    # CUDA graphs (mode="reduce-overhead"): each region keeps Dynamo's markers, so AOTAutograd
    # keeps the block's parameters static instead of copying them into the graph every call.
    from patch_backend._torch_compat.inductor import dynamo_static_input

    assert "dynamo_compile_id" in block.meta
    assert inputs[0]._dynamo_source is None  # the residual stream: another region's output
    params = [n for n in inputs if n._dynamo_source is not None]
    assert len(params) == 12 and all(dynamo_static_input(n.meta) for n in params)


def test_no_repeats_compiles_whole():
    model, x = NestedModel(), torch.randn(2, 100)
    gm, example = captured(model, x)
    compile_fn = Counting(inductor=False)
    program = compile_regional(gm, example, compile_fn, options={})
    assert program.report.whole_reason == "no repeated blocks"
    assert compile_fn.graphs == [gm]
    with pb.config.patch(regional_compile=False):
        gm2, example2 = captured(tiny_gpt2(2), torch.randint(0, VOCAB, (1, TOKENS)))
        assert compile_regional(gm2, example2, compile_fn).report.whole_reason.startswith("config")


class Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def test_blocks_without_prefix_and_symbolic_shapes_fall_back():
    model, x = Stack(), torch.randn(2, 4)
    gm, example = captured(model, x)
    compile_fn = Counting(inductor=False)
    with torch.no_grad():  # with grad on, the first block (reading x, no grad) differs from the rest
        program = compile_regional(gm, example, compile_fn, options={})
    # Blocks and the root's relu between them: one artifact for the blocks, one for the relus.
    assert (program.report.regions, program.report.compiled, program.report.container) == (6, 2, "layers")
    torch.testing.assert_close(program(*example)[0], model(x))
    graphs = []

    def backend(gm, example):
        graphs.append((gm, list(example)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, dynamic=True)(torch.randn(3, 4))
    dynamic = compile_regional(*graphs[0], compile_fn, options={})
    assert dynamic.report.whole_reason == "symbolic shapes"


def test_inductor_regions_equal_whole_graph_and_eager():
    model, ids = tiny_gpt2(2), torch.randint(0, VOCAB, (2, TOKENS))
    gm, example = captured(model, ids)
    compile_fn = Counting(inductor=True)
    with torch.no_grad():
        program = compile_regional(gm, example, compile_fn, options={})
        whole = compile_inductor(gm, example, {})
        expected = model(ids).logits
        regional, whole_out = program(*example)[0], whole(*example)[0]
    assert program.report.compiled == 3
    torch.testing.assert_close(regional, whole_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(regional, expected, rtol=1e-5, atol=1e-5)


def test_patched_block_compiles_once_and_is_reused_across_layers(monkeypatch):
    """The dispatcher compiles through compile_regional (as the integrator will wire it): a
    patched variant hits the plain artifacts for every unpatched block, and the same relative
    site in another layer reuses the patched block's artifact."""
    compile_fn = Counting(inductor=True)

    def regional(gm, example, options):
        return compile_regional(gm, example, compile_fn, options=options)

    monkeypatch.setattr(dispatcher_module, "compile_graph", regional)
    model, ids = tiny_gpt2(3), torch.randint(0, VOCAB, (1, TOKENS))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="graphpatch")
    eager = torch.compile(model, backend="graphpatch_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits)
        assert len(compile_fn.graphs) == 3  # prefix, one block, suffix
        for layer in (1, 2):  # a middle block, then the last
            patches = {f"transformer.h_{layer}.mlp.act.mul_1": AddPatch(value=0.5),
                       f"transformer.h_{layer}.attn.output|sub_0": ZeroPatch()}
            with pb.patch(compiled, patches):
                got = compiled(ids).logits
            with pb.patch(eager, patches):
                want = eager(ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert len(compile_fn.graphs) == 4, f"layer {layer}: only the patched block compiles, once"
        patched_block = compile_fn.graphs[3]
        names = [n.name for n in patched_block.graph.nodes if n.op == "placeholder"]
        assert len(names) > len([n for n in compile_fn.graphs[1].graph.nodes if n.op == "placeholder"])


def test_layer_position_sweep_compiles_one_block_variant_whatever_its_cuts(monkeypatch):
    """T5: a layers x positions sweep fans out at a different block per chunk; the row repeats at
    each cut sit between blocks, so every cut shares one slotted block artifact (before, the
    first block after a cut was its own variant, one more for the last block's cut)."""
    compile_fn = Counting(inductor=False)

    def regional(gm, example, options):
        return compile_regional(gm, example, compile_fn, options=options)

    monkeypatch.setattr(dispatcher_module, "compile_graph", regional)
    # Three layers, one per chunk: a cut at the first, a middle and the last block. (Dynamo's
    # captures of the model, plain and at the chunk's batch, are most of this test's cost, and
    # they grow with the layers.)
    layers, positions = 3, 4
    model, ids = tiny_gpt2(layers), torch.randint(0, VOCAB, (1, TOKENS))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="graphpatch")
    eager = torch.compile(model, backend="graphpatch_eager")
    torch.manual_seed(1)
    cells = [{f"transformer.h_{layer}.output": ReplacePatch(value=torch.randn(WIDTH), slice=(slice(None), position))}
             for layer in range(layers) for position in range(positions)]

    def metric(out):
        return out.logits[:, -1].log_softmax(-1)

    with torch.no_grad(), pb.config.patch(compile_policy="sync"):
        compiled(ids)
        plain = len(compile_fn.graphs)
        rows = pb.sweep(compiled, (ids,), cells, metric, batch_size=positions, progress=False)
        cuts = {cut for cut in last_sweep_report().cuts}
        want = pb.sweep(eager, (ids,), cells, metric, batch_size=positions, progress=False)
    torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5)
    assert None not in cuts and len(cuts) == layers
    labels = [entry.label for entry in regions.region_report().history]
    assert plain == 3 and labels[:plain] == ["before transformer.h", "transformer.h[*]", "after transformer.h"]
    swept = labels[plain:]
    assert swept.count("transformer.h[*]") == 1, swept
    assert swept.count("between transformer.h") == 1, swept  # the row repeats, one artifact for every cut
