"""TransformerLens aliases (patch_backend/aliases.py) for every supported Hugging Face family.

Each alias is checked against a hand-written hook on the eager model (a deep copy, never
compiled), per-head patches against the same change to the head's columns of the native
projection, and what cannot be translated or does not exist against its error. Models are tiny
and run under ``graphpatch_eager``; one test runs the Inductor backend.
"""

import copy
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import pytest
import torch

import patch_backend as pb
from patch_backend import CustomPatch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch
from patch_backend.aliases import alias_table

pytestmark = pytest.mark.transformers

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS = 64, 32, 4, 2, 2


@dataclass(frozen=True)
class Layout:
    """Where a family keeps what each alias names, as module paths of the HF model."""

    build: Callable[[str], torch.nn.Module]
    embed: str
    layers: str
    attn: str
    mlp: str
    mid_norm: str  # its input is the residual between attention and MLP
    out_proj: str
    final_norm: str
    qkv: Tuple[str, ...]  # one fused module, or q, k, v
    pos_embed: str = ""
    neox_layout: bool = False


def _llama_like(config_class, model_class, **extra):
    def build(attn: str) -> torch.nn.Module:
        config = config_class(
            hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=64,
            attn_implementation=attn, **extra,
        )
        return model_class(config).eval()

    return Layout(build, "model.embed_tokens", "model.layers", "self_attn", "mlp", "post_attention_layernorm",
                  "self_attn.o_proj", "model.norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))


def _gpt2(attn: str) -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB, n_positions=64,
                                     attn_implementation=attn)
    return transformers.GPT2LMHeadModel(config).eval()


def _neox(attn: str, parallel: bool = False) -> torch.nn.Module:
    config = transformers.GPTNeoXConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=64,
                                        num_attention_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=64,
                                        use_parallel_residual=parallel, attn_implementation=attn)
    return transformers.GPTNeoXForCausalLM(config).eval()


FAMILIES: Dict[str, Layout] = {
    "gpt2": Layout(_gpt2, "transformer.wte", "transformer.h", "attn", "mlp", "ln_2", "attn.c_proj",
                   "transformer.ln_f", ("attn.c_attn",), pos_embed="transformer.wpe"),
    "gpt_neox": Layout(_neox, "gpt_neox.embed_in", "gpt_neox.layers", "attention", "mlp", "post_attention_layernorm",
                       "attention.dense", "gpt_neox.final_layer_norm", ("attention.query_key_value",),
                       neox_layout=True),
    "llama": _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": _llama_like(transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": _llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "gemma": _llama_like(transformers.GemmaConfig, transformers.GemmaForCausalLM, head_dim=HIDDEN // HEADS),
}


def module(root, path):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _qkv_heads(layout: Layout, outputs: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
    """q, k, v as [batch, pos, head, d_head], written out by hand from the projections."""
    d = HIDDEN // HEADS
    if len(outputs) == 3:
        return tuple(t.unflatten(-1, (-1, d)) for t in outputs)
    fused = outputs[0]
    if layout.neox_layout:  # [head, (q|k|v), d]
        grouped = fused.unflatten(-1, (HEADS, 3, d))
        return tuple(grouped[..., part, :] for part in range(3))
    return tuple(t.unflatten(-1, (HEADS, d)) for t in fused.split(HIDDEN, dim=-1))  # [(q|k|v), head, d]


def hooked_reference(layout: Layout, model: torch.nn.Module, ids: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Every alias's value, taken with forward hooks on the eager model."""
    seen: Dict[str, torch.Tensor] = {}
    handles = []

    def keep(name, take):
        def hook(_module, args, kwargs_or_output, *rest):
            value = take(args, kwargs_or_output, *rest)
            if value is not None:  # the pattern under sdpa
                seen[name] = value.detach().clone()
        return hook

    on_output = lambda name, path: handles.append(  # noqa: E731
        module(model, path).register_forward_hook(keep(name, lambda a, out: _first(out))))
    on_input = lambda name, path: handles.append(  # noqa: E731
        module(model, path).register_forward_pre_hook(
            keep(name, lambda a, kw: a[0] if a else next(iter(kw.values()))), with_kwargs=True))
    on_output("hook_embed", layout.embed)
    if layout.pos_embed:
        on_output("hook_pos_embed", layout.pos_embed)
    on_output("ln_final.hook_normalized", layout.final_norm)
    for i in range(LAYERS):
        block = f"{layout.layers}.{i}"
        on_input(f"blocks.{i}.hook_resid_pre", block)
        on_output(f"blocks.{i}.hook_attn_out", f"{block}.{layout.attn}")
        handles.append(module(model, f"{block}.{layout.attn}").register_forward_hook(
            keep(f"blocks.{i}.attn.hook_pattern", lambda a, out: out[1])))
        on_input(f"blocks.{i}.hook_resid_mid", f"{block}.{layout.mid_norm}")
        on_output(f"blocks.{i}.hook_mlp_out", f"{block}.{layout.mlp}")
        on_output(f"blocks.{i}.hook_resid_post", block)
        on_input(f"blocks.{i}.attn.z_flat", f"{block}.{layout.out_proj}")
        for k, path in enumerate(layout.qkv):
            on_output(f"blocks.{i}.qkv_{k}", f"{block}.{path}")
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    for i in range(LAYERS):
        outputs = tuple(seen.pop(f"blocks.{i}.qkv_{k}") for k in range(len(layout.qkv)))
        for letter, value in zip("qkv", _qkv_heads(layout, outputs)):
            seen[f"blocks.{i}.attn.hook_{letter}"] = value
        seen[f"blocks.{i}.attn.hook_z"] = seen.pop(f"blocks.{i}.attn.z_flat").unflatten(-1, (HEADS, -1))
    return seen


#: One family per alias table in patch_backend/aliases.py stays in the fast set (GPT-2's fused
#: q/k/v, GPT-NeoX's head-interleaved fused q/k/v, Llama's separate projections with grouped
#: keys); mistral, qwen2 and gemma share Llama's table and run with the slow tests.
_SAME_TABLE_AS_LLAMA = ("mistral", "qwen2", "gemma")


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name in _SAME_TABLE_AS_LLAMA else name for name in FAMILIES]
)
def test_family(name):
    """Every check on one capture per family (conftest resets Dynamo between tests): an
    eager-attention model, so hook_pattern exists, under graphpatch_eager, and its eager copy."""
    layout = FAMILIES[name]
    model = layout.build("eager")
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="graphpatch_eager")
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        compiled(ids)
    family = (layout, compiled, reference, ids)
    for check in (_every_alias_equals_a_hook_on_the_eager_model, _alias_resolves_to_the_native_node,
                  _one_head_at_one_position_is_the_heads_columns, _head_range_and_value_broadcast,
                  _what_cannot_be_translated_exactly_is_refused, _unknown_alias_suggests_alias_names):
        check(family)


def _every_alias_equals_a_hook_on_the_eager_model(family):
    layout, compiled, reference, ids = family
    expected = hooked_reference(layout, reference, ids)
    names = pb.nodes(compiled, "hook_*") + pb.nodes(compiled, "blocks.**") + pb.nodes(compiled, "ln_final.*")
    assert sorted(names) == sorted(expected)
    with torch.no_grad():
        cache = pb.record(compiled, (ids,), names)
    for name in names:
        assert cache[name].shape == expected[name].shape, name
        torch.testing.assert_close(cache[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
    assert cache["blocks.0.attn.hook_k"].shape[2] == alias_table(compiled._orig_mod).aliases[
        "blocks.0.attn.hook_k"].view.heads  # GQA: key/value heads


def _alias_resolves_to_the_native_node(family):
    layout, compiled, _, ids = family
    table = alias_table(compiled._orig_mod)
    native = table.aliases["blocks.1.hook_mlp_out"].native
    assert native in pb.nodes(compiled)
    with torch.no_grad(), pb.patch(compiled, {"blocks.1.hook_mlp_out": [a := ProbePatch()], native: [b := ProbePatch()]}):
        compiled(ids)
    assert torch.equal(a.activation, b.activation)


def _logits_with_hook(model, path, fn, ids, pre=True):
    target = module(model, path)
    if pre:
        handle = target.register_forward_pre_hook(lambda _, args: (fn(args[0].clone()),) + args[1:])
    else:
        handle = target.register_forward_hook(lambda _, __, out: fn(out.clone()))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        handle.remove()


def _patched(compiled, patch_map, ids):
    with torch.no_grad(), pb.patch(compiled, patch_map):
        return compiled(ids).logits


def _one_head_at_one_position_is_the_heads_columns(family):
    layout, compiled, reference, ids = family
    d, pos, head = HIDDEN // HEADS, 3, 2
    value = torch.randn(2, d)

    def replace_columns(t, start):
        t[:, pos, start:start + d] = value
        return t

    patched = _patched(compiled, {"blocks.1.attn.hook_z": ReplacePatch(value=value, slice=(slice(None), pos, head))}, ids)
    expected = _logits_with_hook(reference, f"{layout.layers}.1.{layout.out_proj}",
                                 lambda t: replace_columns(t, head * d), ids)
    torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-5)

    # q of the same head: a part of the fused projection for GPT-2 and GPT-NeoX
    q_start = head * 3 * d if layout.neox_layout else head * d
    patched = _patched(compiled, {"blocks.0.attn.hook_q": ReplacePatch(value=value, slice=(slice(None), pos, head))}, ids)
    expected = _logits_with_hook(reference, f"{layout.layers}.0.{layout.qkv[0]}",
                                 lambda t: replace_columns(t, q_start), ids, pre=False)
    torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-5)


def _head_range_and_value_broadcast(family):
    layout, compiled, reference, ids = family
    d = HIDDEN // HEADS
    row = torch.randn(d)  # broadcast over batch, heads 1..2 and every position

    def add_row(t):
        t[:, :, d:3 * d] += row.repeat(2)
        return t

    patched = _patched(compiled, {"blocks.0.attn.hook_z": pb.AddPatch(value=row, slice=(slice(None), slice(None), slice(1, 3)))}, ids)
    expected = _logits_with_hook(reference, f"{layout.layers}.0.{layout.out_proj}", add_row, ids)
    torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-5)


def _what_cannot_be_translated_exactly_is_refused(family):
    layout, compiled, _, ids = family
    with pytest.raises(ValueError, match=r"blocks.0.attn.hook_z.*head index \[0, 2\]"):
        with pb.patch(compiled, {"blocks.0.attn.hook_z": ZeroPatch(slice=(slice(None), 0, [0, 2]))}):
            pass
    with pytest.raises(ValueError, match="not one contiguous range"):
        with pb.patch(compiled, {"blocks.0.attn.hook_z": ZeroPatch(slice=(slice(None), 0, slice(0, 4, 2)))}):
            pass
    if layout.neox_layout:
        with pytest.raises(ValueError, match="fused q/k/v"):
            with pb.patch(compiled, {"blocks.0.attn.hook_k": ZeroPatch(slice=(slice(None), 0, slice(0, 2)))}):
                pass


def _unknown_alias_suggests_alias_names(family):
    _, compiled, _, _ = family
    with pytest.raises(KeyError, match="close matches: blocks.1.hook_resid_pre"):
        with pb.patch(compiled, {"blocks.1.hook_resid_pr": ZeroPatch()}):
            pass
    with pytest.raises(KeyError, match="close matches: blocks.0.hook_mlp_out"):
        pb.record(compiled, (torch.zeros(1, 2, dtype=torch.long),), "blocks.0.hook_mlp_ou")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_unavailable_hooks_say_why(name):
    model = FAMILIES[name].build("sdpa")
    table = alias_table(model)
    assert "sdpa" in table.unavailable["blocks.0.attn.hook_pattern"]
    assert "blocks.0.attn.hook_z" in table.aliases
    if name != "gpt2":
        assert "rotary" in table.unavailable["hook_pos_embed"]
    if name == "gpt_neox":
        assert "parallel" in alias_table(_neox("sdpa", parallel=True)).unavailable["blocks.1.hook_resid_mid"]


def test_models_without_aliases_are_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    compiled = torch.compile(model, backend="graphpatch_eager")
    compiled(torch.randn(2, 4))
    assert alias_table(model) is None
    with pytest.raises(KeyError, match="no node named 'blocks.0.hook_resid_pre'"):
        with pb.patch(compiled, {"blocks.0.hook_resid_pre": ZeroPatch()}):
            pass


def test_probe_record_and_custom_patches_on_a_view():
    layout = FAMILIES["gpt2"]
    torch.manual_seed(0)
    model = layout.build("sdpa")
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="graphpatch_eager")
    ids = torch.randint(0, VOCAB, (2, 5))
    scale = torch.arange(1.0, HEADS + 1)[:, None]
    patch_map = {"blocks.0.attn.hook_v": [probe := ProbePatch(), record := RecordPatch(),
                                          CustomPatch(custom_op=lambda v: v * scale)]}
    patched = _patched(compiled, patch_map, ids)

    def scale_v(t):
        t[..., 2 * HIDDEN:] = (t[..., 2 * HIDDEN:].unflatten(-1, (HEADS, -1)) * scale).flatten(-2)
        return t

    expected = _logits_with_hook(reference, "transformer.h.0.attn.c_attn", scale_v, ids, pre=False)
    torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-5)
    v = hooked_reference(layout, reference, ids)["blocks.0.attn.hook_v"]
    assert torch.equal(probe.activation, v) and len(record.activations) == 1
    assert torch.equal(record.activations[0], v)


@pytest.mark.slow
def test_compiled_alias_patch_and_record_match_eager():
    """The Inductor path: one compile, a per-head patch and a recorded view."""
    torch.manual_seed(0)
    model = FAMILIES["llama"].build("sdpa")
    ids = torch.randint(0, VOCAB, (2, 5))
    eager = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    compiled = torch.compile(model, backend="graphpatch")
    patch_map = lambda: {  # noqa: E731
        "blocks.1.attn.hook_k": ZeroPatch(slice=(slice(None), 2, 1)),
        "blocks.0.attn.hook_z": CustomPatch(custom_op=lambda z: z * torch.arange(1.0, HEADS + 1)[:, None]),
    }
    names = ["blocks.*.attn.hook_k", "blocks.1.hook_resid_post"]
    with torch.no_grad():
        got = pb.record(compiled, (ids,), names, patches=patch_map())
        want = pb.record(eager, (ids,), names, patches=patch_map())
    assert list(got) == ["blocks.0.attn.hook_k", "blocks.1.attn.hook_k", "blocks.1.hook_resid_post"]
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    assert got["blocks.1.attn.hook_k"][:, 2, 1].abs().max() == 0
    assert got["blocks.1.attn.hook_k"].shape == (2, 5, KV_HEADS, HIDDEN // HEADS)


def test_prepare_and_causal_trace_take_alias_patterns():
    torch.manual_seed(0)
    model = FAMILIES["gpt2"].build("sdpa")
    compiled = torch.compile(model, backend="graphpatch_eager")
    clean, corrupt = torch.randint(0, VOCAB, (2, 1, 4)).unbind(0)
    with torch.no_grad():
        compiled(clean)
    assert pb.prepare(compiled, "blocks.*.attn.hook_z") == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    from patch_backend.capture.index import index_for

    assert {"transformer.h_0.attn.c_proj.x", "transformer.h_1.attn.c_proj.x"} <= index_for(model).declared
    metric = lambda out: out.logits[:, -1, 3]  # noqa: E731
    by_alias = pb.causal_trace(compiled, (clean,), (corrupt,), "blocks.*.hook_resid_pre", 4, metric, progress=False)
    native = pb.causal_trace(compiled, (clean,), (corrupt,), "transformer.h_*.hidden_states", 4, metric, progress=False)
    assert by_alias.sites == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    torch.testing.assert_close(by_alias.grid, native.grid)
