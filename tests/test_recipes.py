"""Patching recipes (patch_backend/recipes.py) against loops of single patched forwards, and
against TransformerLens's own patching functions when TransformerLens is installed."""

import copy

import pytest
import torch

import patch_backend as pb
from patch_backend import ReplacePatch, recipes

pytestmark = pytest.mark.transformers

transformers = pytest.importorskip("transformers")

LAYERS, HIDDEN, HEADS, VOCAB, LENGTH = 2, 32, 4, 64, 5


def tiny_gpt2():
    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def metric(logits):
    """Logit difference per row, as TransformerLens tutorials use it."""
    return logits[:, -1, 3] - logits[:, -1, 5]


def setup(backend="graphpatch_eager"):
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    clean, corrupted = torch.randint(0, VOCAB, (2, 2, LENGTH)).unbind(0)
    return compiled, reference, clean, corrupted


def loop(model, corrupted, cells):
    """One patched forward per cell, the metric averaged over the batch."""
    values = []
    with torch.no_grad():
        for cell in cells:
            with pb.patch(model, cell):
                values.append(metric(model(corrupted).logits).mean())
    return torch.stack(values)


def hook_loop(reference, clean, corrupted, path, columns):
    """Hand-written forward pre-hooks on the eager model: copies clean input columns of module
    ``path`` at one position into the corrupted run, per (position, columns) cell."""
    target = reference.get_submodule(path)
    seen = {}
    handle = target.register_forward_pre_hook(lambda _, args: seen.__setitem__("x", args[0].clone()))
    with torch.no_grad():
        reference(clean)
    handle.remove()
    values = []
    for position, span in columns:
        def restore(_, args, position=position, span=span):
            x = args[0].clone()
            x[:, position, span] = seen["x"][:, position, span]
            return (x,) + args[1:]

        handle = target.register_forward_pre_hook(restore)
        with torch.no_grad():
            values.append(metric(reference(corrupted).logits).mean())
        handle.remove()
    return torch.stack(values)


@pytest.mark.slow
def test_resid_pre_equals_a_loop_of_patched_forwards():
    compiled, _, clean, corrupted = setup()
    cache = pb.record(compiled, (clean,), "blocks.*.hook_resid_pre")
    grid = recipes.resid_pre(compiled, (corrupted,), cache, metric)
    assert [axis.name for axis in grid.axes] == ["layer", "pos"]
    assert grid.axis("pos").labels == tuple(range(LENGTH)) and grid.values.shape == (LAYERS, LENGTH)
    cells = [
        {f"transformer.h_{layer}.hidden_states": ReplacePatch(
            value=cache[f"blocks.{layer}.hook_resid_pre"][:, position], slice=(slice(None), position))}
        for layer in range(LAYERS) for position in range(LENGTH)
    ]
    torch.testing.assert_close(grid.values.flatten(), loop(compiled, corrupted, cells), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_attn_head_out_by_pos_equals_hooks_on_the_heads_columns():
    compiled, reference, clean, corrupted = setup()
    cache = pb.record(compiled, (clean,), "blocks.*.attn.hook_z")
    grid = recipes.attn_head_out_by_pos(compiled, (corrupted,), cache, metric)
    assert [axis.name for axis in grid.axes] == ["layer", "pos", "head"]
    assert grid.values.shape == (LAYERS, LENGTH, HEADS)
    d = HIDDEN // HEADS
    for layer in range(LAYERS):
        cells = [(position, slice(head * d, (head + 1) * d)) for position in range(LENGTH) for head in range(HEADS)]
        expected = hook_loop(reference, clean, corrupted, f"transformer.h.{layer}.attn.c_proj", cells)
        torch.testing.assert_close(grid.values[layer].flatten(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_block_every_equals_three_loops_and_compiles():
    """Under the Inductor backend: the one compiled check of the recipes."""
    compiled, _, clean, corrupted = setup("graphpatch")
    cache = pb.record(compiled, (clean,), ["blocks.*.hook_resid_pre", "blocks.*.hook_attn_out", "blocks.*.hook_mlp_out"])
    grid = recipes.block_every(compiled, (corrupted,), cache, metric)
    assert grid.axis("component").labels == ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")
    assert grid.values.shape == (3, LAYERS, LENGTH)
    eager = torch.compile(copy.deepcopy(compiled._orig_mod), backend="graphpatch_eager")
    for c, component in enumerate(grid.axis("component").labels):
        cells = [
            {f"blocks.{layer}.{component}": ReplacePatch(
                value=cache[f"blocks.{layer}.{component}"][:, position], slice=(slice(None), position))}
            for layer in range(LAYERS) for position in range(LENGTH)
        ]
        torch.testing.assert_close(grid.values[c].flatten(), loop(eager, corrupted, cells), rtol=1e-4, atol=1e-4)


def test_missing_cache_entries_say_what_to_record():
    compiled, _, clean, corrupted = setup()
    cache = pb.record(compiled, (clean,), "blocks.0.hook_resid_pre")
    with pytest.raises(KeyError, match=r"blocks.1.hook_resid_pre.*pb.record\(model, clean_inputs, 'blocks.\*.hook_resid_pre'\)"):
        recipes.resid_pre(compiled, (corrupted,), cache, metric)


def _tiny_tokenizer():
    """A word-level tokenizer built in memory, so booting TransformerLens downloads nothing (no BOS
    token: TransformerLens would reload a tokenizer with one from the hub)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
                                                unk_token="t0", eos_token="t0", pad_token="t0")


def test_against_transformer_lens_on_the_same_weights():
    """Differential test: TransformerLens's patching functions on a TransformerBridge over the same
    HF model (raw weights, no folding) give the same grids. Install with the ``compare`` extra."""
    tl = pytest.importorskip("transformer_lens", reason="TransformerLens is not installed (pip install 'patch-backend[compare]')")
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    model = tiny_gpt2()
    model.config._attn_implementation = "eager"  # what the bridge forces; the same kernels on both sides
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(model), tokenizer=_tiny_tokenizer())
    bridge.eval()
    compiled = torch.compile(model, backend="graphpatch_eager")
    clean, corrupted = torch.randint(0, VOCAB, (2, 2, LENGTH)).unbind(0)
    scalar = lambda logits: metric(logits).mean()  # noqa: E731
    _, tl_cache = bridge.run_with_cache(clean)
    ours = pb.record(compiled, (clean,), ["blocks.*.hook_resid_pre", "blocks.*.hook_attn_out",
                                           "blocks.*.hook_mlp_out", "blocks.*.attn.hook_z"])
    for name, value in ours.items():
        torch.testing.assert_close(value, tl_cache[name], rtol=1e-4, atol=1e-5, msg=name)
    pairs = [
        (recipes.resid_pre, patching.get_act_patch_resid_pre),
        (recipes.attn_head_out_by_pos, patching.get_act_patch_attn_head_out_by_pos),
        (recipes.block_every, patching.get_act_patch_block_every),
    ]
    for ours_fn, theirs_fn in pairs:
        expected = theirs_fn(bridge, corrupted, tl_cache, scalar)
        got = ours_fn(compiled, (corrupted,), ours, metric)
        assert got.values.std() > 0
        torch.testing.assert_close(got.values, expected.float(), rtol=1e-4, atol=1e-4, msg=ours_fn.__name__)
    assert tl is not None


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2"])
def test_every_alias_equals_transformer_lens_cache(family):
    """Differential test of the alias table: every alias recorded by pb.record equals the
    activation TransformerLens's own run_with_cache gives under that name, same weights."""
    pytest.importorskip("transformer_lens", reason="TransformerLens is not installed (pip install 'patch-backend[compare]')")
    from transformer_lens.model_bridge import TransformerBridge
    from test_aliases import FAMILIES

    model = FAMILIES[family].build("eager")
    bridge = TransformerBridge.boot_transformers(family, hf_model=copy.deepcopy(model), tokenizer=_tiny_tokenizer())
    bridge.eval()
    compiled = torch.compile(model, backend="graphpatch_eager")
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    _, tl_cache = bridge.run_with_cache(ids)
    ours = pb.record(compiled, (ids,), ["hook_*", "blocks.**", "ln_final.*"])
    compared = [name for name in ours if name in tl_cache]
    assert compared == list(ours), sorted(set(ours) - set(compared))  # TransformerLens has every alias
    for name in compared:
        value = ours[name]
        if name == "hook_pos_embed":  # HF computes one row for the whole batch: [1, T, D]
            value = value.expand_as(tl_cache[name])
        assert value.shape == tl_cache[name].shape, name
        torch.testing.assert_close(value, tl_cache[name], rtol=1e-4, atol=1e-5, msg=name)
