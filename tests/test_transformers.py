"""Hugging Face transformers models under the backend (random weights, built from configs).

GPT-2 and Llama (grouped-query attention): names, module-output patches against forward hooks on
the eager model, op-level patches against ``graphpatch_eager``, attention-head patching,
``generate`` with a dynamic and a static KV cache, variable sequence lengths, graph breaks.
Compiles are few and the models tiny: each Inductor compile here costs seconds on a laptop CPU.
"""

import copy

import expecttest
import pytest
import torch

import patch_backend as pb
from patch_backend import AddPatch, ProbePatch, ReplacePatch, ZeroPatch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP  # noqa: E402

pytestmark = pytest.mark.transformers

VOCAB, HIDDEN, HEADS, HEAD_DIM = 128, 64, 4, 16


def gpt2(**overrides):
    config = GPT2Config(
        n_layer=2, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB, n_positions=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, **overrides,
    )
    return GPT2LMHeadModel(config).eval()


def llama(**overrides):
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=HEADS,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, **overrides,
    )
    return LlamaForCausalLM(config).eval()


def module(root, path):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _values(seed):
    generator = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=generator)


def _on_output(fn):
    """A forward hook applying ``fn`` to a module's result (the first item of a tuple result)."""

    def hook(_, __, output):
        if isinstance(output, tuple):
            return (fn(output[0].clone()),) + output[1:]
        return fn(output.clone())

    return hook


def _set(index, value):
    def fn(tensor):
        tensor[index] = value
        return tensor

    return fn


def _head_columns(head, value=0.0):
    """Pre-hook on the attention output projection: replaces one head's columns of its input."""
    columns = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)

    def hook(_, args):
        x = args[0].clone()
        x[..., columns] = value
        return (x,) + args[1:]

    return hook


#: Per model: module-output patches (name, patch, module path, hook) and the attention names.
def module_output_cases(kind):
    value = _values(1)
    if kind == "gpt2":
        block, mlp, attn, out_proj = "transformer.h_{}", "transformer.h_{}.mlp", "transformer.h_{}.attn", "c_proj"
        paths = {"block": "transformer.h.{}", "mlp": "transformer.h.{}.mlp", "attn": "transformer.h.{}.attn",
                 "act": "transformer.h.{}.mlp.act", "act_name": "transformer.h_{}.mlp.act"}
    else:
        block, mlp, attn, out_proj = "model.layers_{}", "model.layers_{}.mlp", "model.layers_{}.self_attn", "o_proj"
        paths = {"block": "model.layers.{}", "mlp": "model.layers.{}.mlp", "attn": "model.layers.{}.self_attn",
                 "act": "model.layers.{}.mlp.act_fn", "act_name": "model.layers_{}.mlp.act_fn"}
    delta, row, logit_bias, block_delta = value(HIDDEN), value(HIDDEN), value(VOCAB), value(HIDDEN)
    cases = [
        (mlp.format(0) + ".output", AddPatch(value=delta), paths["mlp"].format(0), _on_output(lambda t: t + delta)),
        (attn.format(1) + ".output|sub_0", ReplacePatch(value=row, slice=(slice(None), 3)), paths["attn"].format(1),
         _on_output(_set((slice(None), 3), row))),
        (paths["act_name"].format(0) + ".output", ZeroPatch(slice=(slice(None), slice(2, 5))), paths["act"].format(0),
         _on_output(_set((slice(None), slice(2, 5)), 0.0))),
        (block.format(1) + ".output", AddPatch(value=block_delta, slice=(0, -1)), paths["block"].format(1),
         _on_output(lambda t: _set((0, -1), t[0, -1] + block_delta)(t))),
        ("lm_head.output", AddPatch(value=logit_bias), "lm_head", _on_output(lambda t: t + logit_bias)),
    ]
    return cases, attn, paths["attn"] + "." + out_proj


MODELS = {"gpt2": gpt2, "llama": llama}


OP_LEVEL = {
    "gpt2": lambda v: {
        "transformer.h_0.mlp.act.mul_3": ZeroPatch(slice=(slice(None), slice(1, 4), slice(0, 100))),
        "transformer.h_0.attn.transpose_2": AddPatch(value=v(HEAD_DIM), slice=(slice(None), 1)),  # query, per head
        "transformer.h_1.ln_2.layer_norm": ReplacePatch(value=v(HIDDEN), slice=(0, 5)),
        "transformer.h_1.attn.scaled_dot_product_attention": ZeroPatch(slice=(slice(None), 3, -1)),
        "transformer.wpe.embedding": AddPatch(value=v(HIDDEN)),
    },
    "llama": lambda v: {
        "model.layers_0.self_attn.add_1": AddPatch(value=v(HEAD_DIM), slice=(slice(None), 1)),  # rotated key, per kv head
        "model.layers_0.mlp.mul": ZeroPatch(slice=(slice(None), slice(1, 4))),
        "model.layers_1.input_layernorm.rsqrt": ReplacePatch(value=2.0, slice=(0, 2)),
        "model.layers_1.self_attn.scaled_dot_product_attention": ZeroPatch(slice=(slice(None), 3, -1)),
        "model.norm.mul_1": AddPatch(value=v(HIDDEN), slice=(0, -1)),
    },
}


def _with_hooks(model, hooks, ids):
    handles = [register(module(model, path), hook) for register, path, hook in hooks]
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for handle in handles:
            handle.remove()


_forward = lambda m, hook: m.register_forward_hook(hook)  # noqa: E731
_pre = lambda m, hook: m.register_forward_pre_hook(hook)  # noqa: E731


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_patches_match_forward_hooks_and_graphpatch_eager(kind):
    """One compiled model (one plain compile, a variant per patch structure):

    * module-output patches and a head patch (heads are dim 1 of the attention output) equal
      the same surgery with forward hooks;
    * op-level patches equal ``graphpatch_eager``;
    * the head activation-patching recipe (probe head h on a clean prompt, put it into a
      corrupted run) equals replacing that head's columns of the output projection's input.
    """
    model = MODELS[kind]()
    ids, corrupt = torch.randint(1, VOCAB, (2, 8)), torch.randint(1, VOCAB, (2, 8))
    compiled = torch.compile(model, backend="graphpatch")
    with torch.no_grad():
        unpatched = model(ids).logits
        torch.testing.assert_close(compiled(ids).logits, unpatched)
    names = pb.nodes(compiled)
    assert names[0] == "input_ids" and names[-1] == "output|logits" and "lm_head.output" in names

    # Module outputs, and a head zeroed where heads are a dim: [batch, head, position, head_dim].
    cases, attn, out_proj = module_output_cases(kind)
    head_site = attn.format(1) + ".scaled_dot_product_attention"
    assert pb.nodes(compiled, head_site) == [head_site]
    patch_map = {name: patch for name, patch, _, _ in cases}
    patch_map[head_site] = ZeroPatch(slice=(slice(None), 2))
    # A probe on layer 0's heads for the recipe below; every patch here comes after it, so it
    # sees the clean value (and this run compiles one variant, not two).
    probe_site, head = attn.format(0) + ".scaled_dot_product_attention", 1
    patch_map[probe_site] = probe = ProbePatch()
    hooks = [(_forward, path, hook) for _, _, path, hook in cases] + [(_pre, out_proj.format(1), _head_columns(2))]
    with torch.no_grad(), pb.patch(compiled, patch_map):
        patched = compiled(ids).logits
    torch.testing.assert_close(patched, _with_hooks(model, hooks, ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(patched, unpatched, atol=1e-3)

    # Op-level patches against the eager oracle (a copy of the model, so names and graphs stay apart).
    eager = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    with torch.no_grad():
        eager(ids)
        with pb.patch(compiled, OP_LEVEL[kind](_values(2))):
            patched = compiled(ids).logits
        with pb.patch(eager, OP_LEVEL[kind](_values(2))):
            expected = eager(ids).logits
    torch.testing.assert_close(patched, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(patched, unpatched, atol=1e-3)

    # Head activation patching: layer 0's head 1 from the clean run, put into a corrupted run.
    assert probe.activation.shape == (2, HEADS, 8, HEAD_DIM)
    recipe = {probe_site: ReplacePatch(value=probe.activation[:, head], slice=(slice(None), head))}
    with torch.no_grad(), pb.patch(compiled, recipe):
        patched = compiled(corrupt).logits
    recorded = []
    clean_input = (_pre, out_proj.format(0), lambda _, args: recorded.append(args[0].detach().clone()))
    _with_hooks(model, [clean_input], ids)
    columns = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    expected = _with_hooks(model, [(_pre, out_proj.format(0), _head_columns(head, recorded[0][..., columns]))], corrupt)
    torch.testing.assert_close(patched, expected, rtol=1e-4, atol=1e-4)
    assert pb.stats(compiled).variants_compiled == 3


def _forced_logits(token):
    logits = torch.full((VOCAB,), -1e4)
    logits[token] = 1e4
    return logits


def _token_bias(token):
    bias = torch.zeros(VOCAB)
    bias[token] = 1e4
    return bias


@pytest.mark.slow
def test_generate_with_dynamic_cache():
    """``model.forward`` compiled with the backend; ``generate`` with transformers' default
    DynamicCache: prefill and decode graphs, patches at every step, a variant per graph."""
    model = gpt2()
    reference = copy.deepcopy(model)
    model.forward = torch.compile(model.forward, backend="graphpatch")
    ids = torch.randint(1, VOCAB, (1, 8))
    options = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
    delta = _values(3)(HIDDEN)

    def patch_map(token):
        # A huge logit for one token (generation must pick it at every step, prefill included)
        # and an intermediate patch whose effect shows in the logits.
        return {
            "transformer.h_1.mlp.output": AddPatch(value=delta, slice=(0,)),
            "lm_head.output": AddPatch(value=_token_bias(token)),
        }

    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=6, do_sample=False)
        with pb.patch(model, patch_map(7)):
            forced = model.generate(ids, max_new_tokens=6, **options)
        assert forced.sequences[0, 8:].tolist() == [7] * 6
        handles = [
            reference.transformer.h[1].mlp.register_forward_hook(_on_output(lambda t: t + delta)),
            reference.lm_head.register_forward_hook(_on_output(lambda t: t + _token_bias(7))),
        ]
        hooked = reference.generate(ids, max_new_tokens=6, **options)
        for handle in handles:
            handle.remove()
        torch.testing.assert_close(torch.stack(forced.logits), torch.stack(hooked.logits), rtol=1e-4, atol=1e-2)
        bounded = pb.stats(model).variants_compiled
        # Prefill, first decode step, then Dynamo's dynamic decode graph: bounded by the graphs.
        assert bounded <= pb.stats(model).graphs == 3
        # More steps and other values: the same structure, no compile.
        with pb.patch(model, patch_map(9)):
            forced = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert forced[0, 8:].tolist() == [9] * 12
        assert pb.stats(model).variants_compiled == bounded
        # Leaving the context leaves generate unpatched.
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)


@pytest.mark.slow
def test_generate_with_static_cache_and_transformers_compile():
    """Static cache with transformers' own compile path (``CompileConfig(backend="graphpatch")``)
    for the decode steps; ``forward`` compiled too, so the prefill is patched as well."""
    from transformers import CompileConfig

    model = llama()
    reference = copy.deepcopy(model)
    compile_config = CompileConfig(backend="graphpatch", fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles generate on CPU only when asked
    model.generation_config.compile_config = compile_config
    model.forward = torch.compile(model.forward, backend="graphpatch")
    ids = torch.randint(1, VOCAB, (1, 8))
    options = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        expected = reference.generate(ids, **options)
        assert torch.equal(model.generate(ids, **options), expected)
        with pb.patch(model, {"lm_head.output": ReplacePatch(value=_forced_logits(5))}):
            forced = model.generate(ids, **options)
        assert forced[0, 8:].tolist() == [5] * 6
        stats = pb.stats(model)
        assert stats.graphs == 2 and stats.variants_compiled == 2  # prefill and decode
        # Another value, another prompt of the same length: same cache shapes, no compile. (The
        # static cache's size is prompt + max_new_tokens: another size means other graphs.)
        with pb.patch(model, {"lm_head.output": ReplacePatch(value=_forced_logits(11))}):
            forced = model.generate(torch.randint(1, VOCAB, (1, 8)), **options)
        assert forced[0, 8:].tolist() == [11] * 6
        assert pb.stats(model).variants_compiled == 2
        assert torch.equal(model.generate(ids, **options), expected)


@pytest.mark.slow
def test_variable_lengths_share_one_variant():
    """Lengths 8, 12, 16, 31: Dynamo's second length brings a dynamic-shape graph; its patched
    variant is compiled with symbolic shapes and serves every later length, slices included."""
    model = gpt2()
    compiled = torch.compile(model, backend="graphpatch")
    row = _values(4)(HIDDEN)
    for length in (8, 12, 16, 31):
        ids = torch.randint(1, VOCAB, (1, length))
        patch_map = {
            "transformer.h_0.mlp.output": ReplacePatch(value=row, slice=(slice(None), length // 2)),
            "transformer.h_1.attn.scaled_dot_product_attention": ZeroPatch(slice=(slice(None), 1, slice(length - 3, None))),
        }
        with torch.no_grad(), pb.patch(compiled, patch_map):
            patched = compiled(ids).logits
        hooks = [
            (_forward, "transformer.h.0.mlp", _on_output(_set((slice(None), length // 2), row))),
            (_pre, "transformer.h.1.attn.c_proj",
             lambda _, args, length=length: (_set((slice(None), slice(length - 3, None), slice(HEAD_DIM, 2 * HEAD_DIM)), 0.0)(args[0].clone()),)),
        ]
        torch.testing.assert_close(patched, _with_hooks(model, hooks, ids), rtol=1e-4, atol=1e-4)
    stats = pb.stats(compiled)
    # The first length's static graph and the dynamic graph: one variant each, not one per length.
    assert stats.graphs == 2 and stats.variants_compiled == 2


@pytest.mark.slow
def test_variant_specialized_by_its_compile_is_not_reused_for_other_lengths():
    """A traced CustomPatch that branches on the length makes the symbolic compile assume a
    range; a call outside it compiles another specialization instead of running the first.

    Slow: the fast set runs the same model, lengths and assertions in
    test_boundary.py::test_symbolic_variant_serves_every_length_its_guards_allow (which also
    checks that no fallback warned), and test_tiers.py under the background policy."""
    from fixtures import TwoLayerMLP
    from patch_backend import CustomPatch

    model = TwoLayerMLP(8)
    compiled = torch.compile(model, backend="graphpatch", dynamic=True)

    def long_inputs_only(t):
        return t * 2 if t.shape[0] > 4 else t

    for rows in (3, 6, 2, 9):
        x = torch.randn(rows, 8)
        with torch.no_grad():
            with pb.patch(compiled, {"layers_0.output": CustomPatch(custom_op=long_inputs_only)}):
                patched = compiled(x)
            h = x + long_inputs_only(model.layers[0](x))
            torch.testing.assert_close(patched, h + model.layers[1](h))
    stats = pb.stats(compiled)
    assert stats.graphs == 1 and stats.variants_compiled == 2  # rows <= 4, rows > 4


class PrintingMLP(GPT2MLP):
    def forward(self, hidden_states):
        hidden_states = self.act(self.c_fc(hidden_states))
        print("mlp activations", tuple(hidden_states.shape))  # a graph break
        return self.dropout(self.c_proj(hidden_states))


class BranchingMLP(GPT2MLP):
    def forward(self, hidden_states):
        hidden_states = self.act(self.c_fc(hidden_states))
        if hidden_states.sum() > 0:  # data-dependent branch: a graph break
            hidden_states = hidden_states
        return self.dropout(self.c_proj(hidden_states))


class _PrintingAfter:
    """Mixed into a block's attention: a graph break after its forward."""

    def forward(self, *args, **kwargs):
        result = super().forward(*args, **kwargs)
        print("attention done")
        return result


@pytest.mark.slow
def test_names_stay_when_a_context_recompiles_a_block_differently(capsys) -> None:
    """GPT-2 with a break at the end of one block's attention: the layer loop runs eagerly and
    each block is its own frame, called through transformers' ``GradientCheckpointingLayer``
    ``__call__`` and the forward's decorators. A context's hooks make Dynamo compile a block's
    forward alone, where it had compiled the ``__call__`` with the forward inlined: the same
    call, split otherwise. Its names stay those of the first forward (they became
    ``ln_1_0``/``ln_1_1``, and the context's own name was unknown at its exit), and the patch
    equals the unbroken model's."""
    model = gpt2()
    attention = model.transformer.h[1].attn
    attention.__class__ = type("PrintingAttention", (_PrintingAfter, type(attention)), {})
    reference = copy.deepcopy(model)
    ids = torch.randint(1, VOCAB, (1, 8))
    unbroken = torch.compile(reference, backend="graphpatch_eager")
    compiled = torch.compile(model, backend="graphpatch_eager")
    value = _values(3)(HIDDEN)
    with torch.no_grad():
        unbroken(ids)
        compiled(ids)
        names = pb.nodes(compiled)
        assert names == pb.nodes(unbroken)
        for name in ("transformer.h_0.ln_1.output", "transformer.h_1.attn.c_proj.output", "transformer.h_1.ln_2.input"):
            with pb.patch(compiled, {name: AddPatch(value=value)}):
                patched = compiled(ids).logits
            assert pb.nodes(compiled) == names
            with pb.patch(unbroken, {name: AddPatch(value=value)}):
                expected = unbroken(ids).logits
            torch.testing.assert_close(patched, expected)


@pytest.mark.slow
@pytest.mark.parametrize("mlp, backend", [(PrintingMLP, "graphpatch"), (BranchingMLP, "graphpatch_eager")])
def test_graph_break_in_one_block_keeps_names_and_patches(mlp, backend, capsys):
    model = gpt2()
    reference = copy.deepcopy(model)
    broken = mlp(4 * HIDDEN, model.config).eval()
    broken.load_state_dict(model.transformer.h[1].mlp.state_dict())
    model.transformer.h[1].mlp = broken
    ids = torch.randint(1, VOCAB, (1, 8))
    # The unbroken copy first: Dynamo marks a frame it gives up on (see below) for every model.
    unbroken = torch.compile(reference, backend="graphpatch_eager")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        unbroken(ids)
        compiled(ids)
    assert pb.stats(compiled).graphs > 1
    # Every block keeps its names, in the same order, as do the head and the model's input; the
    # only names lost are the layer loop's own ops (embeddings, final norm): torch 2.13 runs a
    # frame with a graph break inside a loop eagerly ("graph break in loop"), so no graph holds
    # them.
    extra = [] if mlp is PrintingMLP else ["transformer.h_1.mlp.sum", "transformer.h_1.mlp.gt"]
    names = pb.nodes(compiled)
    assert set(extra) <= set(names)
    names = [n for n in names if n not in extra]
    expected = pb.nodes(unbroken)
    assert names == [n for n in expected if n in names]
    lost = [n for n in expected if n not in names]
    assert lost and all(n.startswith("transformer.") and not n.startswith("transformer.h_") for n in lost)
    # The model's input goes straight into that eager forward: named there too, before it.
    assert names.index("input_ids") < names.index("transformer.input_ids")
    assert [n for n in expected if n.startswith(("transformer.h_", "lm_head", "output"))] == [
        n for n in names if n.startswith(("transformer.h_", "lm_head", "output"))
    ]

    value = _values(5)
    delta, row, bias = value(HIDDEN), value(HIDDEN), value(HIDDEN)
    patch_map = {
        "transformer.h_1.mlp.act.mul_3": ZeroPatch(slice=(slice(None), 2)),  # before the break
        "transformer.h_1.mlp.c_proj.output": AddPatch(value=delta),  # after it
        "transformer.h_1.mlp.output": ReplacePatch(value=row, slice=(0, 5)),
        "transformer.h_1.output": AddPatch(value=bias),  # the block's residual add, in a resume graph
    }
    hooks = [
        (_forward, "transformer.h.1.mlp.act", _on_output(_set((slice(None), 2), 0.0))),
        (_forward, "transformer.h.1.mlp.c_proj", _on_output(lambda t: t + delta)),
        (_forward, "transformer.h.1.mlp", _on_output(_set((0, 5), row))),
        (_forward, "transformer.h.1", _on_output(lambda t: t + bias)),
    ]
    with torch.no_grad(), pb.patch(compiled, patch_map):
        patched = compiled(ids).logits
    torch.testing.assert_close(patched, _with_hooks(reference, hooks, ids), rtol=1e-4, atol=1e-4)


class NamesTest(expecttest.TestCase):
    def test_gpt2_block_names(self):
        torch._dynamo.reset()
        model = gpt2()
        compiled = torch.compile(model, backend="graphpatch_eager")
        with torch.no_grad():
            compiled(torch.randint(1, VOCAB, (1, 8)))
        from patch_backend.capture.index import index_for

        index = index_for(model)
        lines = [
            f"{name} {tuple(index.by_name[name][0].site.shape)}" for name in pb.nodes(compiled, "transformer.h_0.**")
        ]
        self.assertExpectedInline("\n".join(lines), """\
transformer.h_0.hidden_states (1, 8, 64)
transformer.h_0.ln_1.input (1, 8, 64)
transformer.h_0.ln_1.weight (64,)
transformer.h_0.ln_1.bias (64,)
transformer.h_0.ln_1.layer_norm (1, 8, 64)
transformer.h_0.ln_1.output (1, 8, 64)
transformer.h_0.attn.hidden_states (1, 8, 64)
transformer.h_0.attn.c_attn.x (1, 8, 64)
transformer.h_0.attn.c_attn.view (8, 64)
transformer.h_0.attn.c_attn.bias (192,)
transformer.h_0.attn.c_attn.weight (64, 192)
transformer.h_0.attn.c_attn.addmm (8, 192)
transformer.h_0.attn.c_attn.view_1 (1, 8, 192)
transformer.h_0.attn.c_attn.output (1, 8, 192)
transformer.h_0.attn.getitem (1, 8, 64)
transformer.h_0.attn.getitem_1 (1, 8, 64)
transformer.h_0.attn.getitem_2 (1, 8, 64)
transformer.h_0.attn.view (1, 8, 4, 16)
transformer.h_0.attn.transpose (1, 4, 8, 16)
transformer.h_0.attn.view_1 (1, 8, 4, 16)
transformer.h_0.attn.transpose_1 (1, 4, 8, 16)
transformer.h_0.attn.view_2 (1, 8, 4, 16)
transformer.h_0.attn.transpose_2 (1, 4, 8, 16)
transformer.h_0.attn.tensor (0,)
transformer.h_0.attn.tensor_1 (0,)
transformer.h_0.attn.cat (1, 4, 8, 16)
transformer.h_0.attn.cat_1 (1, 4, 8, 16)
transformer.h_0.attn.scaled_dot_product_attention (1, 4, 8, 16)
transformer.h_0.attn.reshape (1, 4, 8, 16)
transformer.h_0.attn.transpose_3 (1, 8, 4, 16)
transformer.h_0.attn.contiguous (1, 8, 4, 16)
transformer.h_0.attn.reshape_1 (1, 8, 64)
transformer.h_0.attn.contiguous_1 (1, 8, 64)
transformer.h_0.attn.c_proj.x (1, 8, 64)
transformer.h_0.attn.c_proj.view (8, 64)
transformer.h_0.attn.c_proj.bias (64,)
transformer.h_0.attn.c_proj.weight (64, 64)
transformer.h_0.attn.c_proj.addmm (8, 64)
transformer.h_0.attn.c_proj.view_1 (1, 8, 64)
transformer.h_0.attn.c_proj.output (1, 8, 64)
transformer.h_0.attn.resid_dropout.input (1, 8, 64)
transformer.h_0.attn.resid_dropout.dropout (1, 8, 64)
transformer.h_0.attn.resid_dropout.output (1, 8, 64)
transformer.h_0.attn.output|sub_0 (1, 8, 64)
transformer.h_0.add (1, 8, 64)
transformer.h_0.ln_2.input (1, 8, 64)
transformer.h_0.ln_2.weight (64,)
transformer.h_0.ln_2.bias (64,)
transformer.h_0.ln_2.layer_norm (1, 8, 64)
transformer.h_0.ln_2.output (1, 8, 64)
transformer.h_0.mlp.hidden_states (1, 8, 64)
transformer.h_0.mlp.c_fc.x (1, 8, 64)
transformer.h_0.mlp.c_fc.view (8, 64)
transformer.h_0.mlp.c_fc.bias (256,)
transformer.h_0.mlp.c_fc.weight (64, 256)
transformer.h_0.mlp.c_fc.addmm (8, 256)
transformer.h_0.mlp.c_fc.view_1 (1, 8, 256)
transformer.h_0.mlp.c_fc.output (1, 8, 256)
transformer.h_0.mlp.act.input (1, 8, 256)
transformer.h_0.mlp.act.mul (1, 8, 256)
transformer.h_0.mlp.act.pow (1, 8, 256)
transformer.h_0.mlp.act.mul_1 (1, 8, 256)
transformer.h_0.mlp.act.add (1, 8, 256)
transformer.h_0.mlp.act.mul_2 (1, 8, 256)
transformer.h_0.mlp.act.tanh (1, 8, 256)
transformer.h_0.mlp.act.add_1 (1, 8, 256)
transformer.h_0.mlp.act.mul_3 (1, 8, 256)
transformer.h_0.mlp.act.output (1, 8, 256)
transformer.h_0.mlp.c_proj.x (1, 8, 256)
transformer.h_0.mlp.c_proj.view (8, 256)
transformer.h_0.mlp.c_proj.bias (64,)
transformer.h_0.mlp.c_proj.weight (256, 64)
transformer.h_0.mlp.c_proj.addmm (8, 64)
transformer.h_0.mlp.c_proj.view_1 (1, 8, 64)
transformer.h_0.mlp.c_proj.output (1, 8, 64)
transformer.h_0.mlp.dropout.input (1, 8, 64)
transformer.h_0.mlp.dropout.dropout (1, 8, 64)
transformer.h_0.mlp.dropout.output (1, 8, 64)
transformer.h_0.mlp.output (1, 8, 64)
transformer.h_0.add_1 (1, 8, 64)
transformer.h_0.output (1, 8, 64)""")
