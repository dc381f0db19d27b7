"""pb.sweep: many patch maps as row blocks of a few compiled forwards; causal tracing."""

import copy
import os
import sys

import pytest
import torch
from torch import nn

import patch_backend as pb
from fixtures import TwoLayerMLP
from patch_backend import AddPatch, ReplacePatch, ZeroPatch
from patch_backend.sweep import last_sweep_report


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0, use_cache=False
    )
    return GPT2LMHeadModel(config).eval()


def per_cell_reference(model, inputs, cells, metric):
    eager = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    results = []
    with torch.no_grad():
        for cell in cells:
            with pb.patch(eager, cell):
                results.append(metric(eager(**inputs) if isinstance(inputs, dict) else eager(*inputs)))
    return torch.stack(results)


@pytest.mark.transformers
@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_sweep_matches_cells_run_alone(batch):
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (batch, 8))
    compiled = torch.compile(model, backend="graphpatch")
    with torch.no_grad():
        compiled(input_ids=ids)
    cells = []
    for layer in range(2):
        for position in (0, 3, -1):
            cells.append({f"transformer.h_{layer}.mlp.output": ZeroPatch(slice=(slice(None), position))})
            cells.append({f"transformer.h_{layer}.mlp.output": AddPatch(value=torch.ones(32), slice=(slice(None), position))})
        cells.append({f"transformer.h_{layer}.attn.transpose_1": ReplacePatch(value=0.5, slice=(slice(None), 1))})
    cells.append({"transformer.h_0.mlp.output": ZeroPatch(), "transformer.h_1.attn.transpose_1": AddPatch(value=1.0)})
    metric = lambda out: out.logits[:, -1].log_softmax(-1)  # noqa: E731
    with torch.no_grad():
        swept = pb.sweep(compiled, {"input_ids": ids}, cells, metric, batch_size=4, progress=False)
    assert swept.shape == (len(cells), batch, 64)
    torch.testing.assert_close(swept, per_cell_reference(model, {"input_ids": ids}, cells, metric), rtol=1e-4, atol=1e-4)
    # 15 cells in chunks of 4: one variant per fan-out cut (the padded last chunk reuses its own).
    assert pb.stats(compiled).variants_compiled == len(set(last_sweep_report().cuts))


def test_sweep_on_plain_module_and_default_chunking():
    model, x = TwoLayerMLP(), torch.randn(2, 5, 8)
    cells = [{f"layers_{l}.up.output": ZeroPatch(slice=(slice(None), p))} for l in range(2) for p in range(5)]
    metric = lambda out: out.sum(-1)  # noqa: E731
    swept = pb.sweep(model, (x,), cells, metric, progress=False)
    torch.testing.assert_close(swept, per_cell_reference(model, (x,), cells, metric))
    assert pb.stats(model).variants_compiled == 1


def test_sweep_rejects_bad_cells_before_running():
    model, x = TwoLayerMLP(), torch.randn(2, 5, 8)
    compiled = torch.compile(model, backend="graphpatch")
    compiled(x)
    with pytest.raises(KeyError, match="close matches"):
        pb.sweep(compiled, (x,), [{"layers_0.up.outptu": ZeroPatch()}], lambda o: o, progress=False)
    with pytest.raises(ValueError, match="Zero/Add/Replace"):
        pb.sweep(compiled, (x,), [{"layers_0.up.output": pb.ProbePatch()}], lambda o: o, progress=False)
    with pytest.raises(ValueError, match="leading batch dimension"):
        pb.sweep(compiled, (x,), [{"layers_0.up.weight": ZeroPatch()}], lambda o: o, progress=False)
    assert pb.stats(compiled).patched_calls == 0


class Planted(nn.Module):
    """Only layer 0's MLP at the planted position can restore the clean answer."""

    def __init__(self, vocab=16, width=8, positions=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([TwoLayerMLP(width).layers[0] for _ in range(2)])
        self.head = nn.Linear(width, vocab)
        with torch.no_grad():
            self.embed.weight.mul_(0.01)
            self.layers[0].up.weight.mul_(20)
            for parameter in self.layers[1].parameters():
                parameter.zero_()

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x.mean(1))


@pytest.mark.slow
def test_causal_trace_finds_planted_site(tmp_path):
    torch.manual_seed(1)
    model = Planted()
    clean = torch.randint(0, 16, (1, 6))
    corrupt = clean.clone()
    corrupt[0, 2] = (clean[0, 2] + 5) % 16
    with torch.no_grad():
        target = int((model(clean) - model(corrupt))[0].argmax())
    trace = pb.causal_trace(
        model, (clean,), (corrupt,), "layers_*.output", 6, lambda logits: logits[:, target], progress=False
    )
    assert trace.grid.shape == (2, 6)
    assert trace.sites == ["layers_0.output", "layers_1.output"]
    assert divmod(int(trace.grid.argmax()), 6) == (0, 2)
    assert float(trace.grid[0, 2]) > float(trace.corrupt[0]) + 1e-3
    path = pb.plot_grid(trace, str(tmp_path / "trace.png"))
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_grid_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"patch-backend\[plot\]"):
        pb.plot_grid(torch.zeros(2, 2), str(tmp_path / "x.png"))
