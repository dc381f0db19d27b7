"""The explorer (``PatchableGraph.graph``), graphpatch-compatible: lookup by full path, nested
results drawn level by level, ``_shape``/``_code``, concrete sizes for symbolic graphs,
protected names, ``Patch[T]`` subclasses and ``PatchableGraph.generate``."""

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import expecttest
import pytest
import torch
from torch import nn

import patch_backend as pb
from fixtures import LinearModel, NestedModel
from patch_backend import AddPatch, Patch, ZeroPatch
from patch_backend.graph import ShapeTree, structure_types
from patch_backend.capture.protected import ProtectedNames, protected_name
from patch_backend.capture.index import index_for


def ascii_tree(node: Any) -> str:
    """repr of a tree with the box-drawing characters spelled in ASCII (expecttest needs ASCII)."""
    return repr(node).replace("├─", "+-").replace("└─", "`-").replace("│", "|")


class Pair(nn.Module):
    """A module with several results: ``pair.output|sub_0``, ``pair.output|sub_1``."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x * 2


class DeeplyNested(nn.Module):
    """graphpatch's deeply-nested-output shape in small: tuple, list, tuple with an int, dict."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.pair = Pair()

    def forward(self, x: torch.Tensor) -> Tuple[Any, ...]:
        y = self.lin(x)
        a, b = self.pair(y)
        return (y, [a, (b, 3), y - 1], {"d": [y.sum()]})


class ProtectedNameModule(nn.Module):
    """graphpatch's protected_name fixture: an input and a submodule named like explorer
    attributes (``_shape``, ``_code``), next to an input already called ``sub_shape``."""

    _shape = (2, 3)

    def __init__(self) -> None:
        super().__init__()
        self._code = nn.Linear(*ProtectedNameModule._shape)

    def forward(self, _shape: torch.Tensor, sub_shape: torch.Tensor) -> torch.Tensor:
        return self._code(_shape + sub_shape)


def nested_graph(backend: str = "graphpatch_eager") -> Tuple[pb.PatchableGraph, torch.Tensor]:
    x = torch.randn(2, 4)
    return pb.PatchableGraph(DeeplyNested(), x, _backend=backend), x


class TreeTest(expecttest.TestCase):
    def test_nested_results_drawn_level_by_level(self) -> None:
        pg, _ = nested_graph()
        self.assertExpectedInline(ascii_tree(pg.graph), """\
<root>: CompiledGraphModule
+-x: Tensor(2, 4)
+-lin: CompiledGraphModule
| +-input: Tensor(2, 4)
| +-weight: Tensor(4, 4)
| +-bias: Tensor(4)
| +-linear: Tensor(2, 4)
| `-output: Tensor(2, 4)
+-pair: CompiledGraphModule
| +-x: Tensor(2, 4)
| +-add: Tensor(2, 4)
| +-mul: Tensor(2, 4)
| `-output: tuple(2)
|   +-sub_0: Tensor(2, 4)
|   `-sub_1: Tensor(2, 4)
+-sub: Tensor(2, 4)
+-sum: Tensor()
`-output: tuple(3)
  +-sub_0: Tensor(2, 4)
  +-sub_1: list(3)
  | +-sub_0: Tensor(2, 4)
  | +-sub_1: tuple(2)
  | | +-sub_0: Tensor(2, 4)
  | | `-sub_1: int
  | `-sub_2: Tensor(2, 4)
  `-sub_2: dict(1)
    `-d: list(1)
      `-sub_0: Tensor()""")

    def test_subtree_repr_starts_with_its_name(self) -> None:
        pg, _ = nested_graph()
        self.assertExpectedInline(ascii_tree(pg.graph.output.sub_1), """\
output|sub_1: list(3)
+-sub_0: Tensor(2, 4)
+-sub_1: tuple(2)
| +-sub_0: Tensor(2, 4)
| `-sub_1: int
`-sub_2: Tensor(2, 4)""")

    def test_flat_listing_is_unchanged(self) -> None:
        pg, _ = nested_graph()
        self.assertEqual(
            [name for name in pb.nodes(pg) if name.startswith("output")],
            ["output|sub_0", "output|sub_1.sub_0", "output|sub_1.sub_1.sub_0", "output|sub_1.sub_2", "output|sub_2.d.sub_0"],
        )

    def test_every_leaf_is_a_patchable_name(self) -> None:
        pg, _ = nested_graph()
        leaves = [str(node) for node in walk(pg.graph) if not list(node) and node._shape is not None]
        self.assertEqual(sorted(leaves), sorted(pb.nodes(pg)))

    def test_protected_names_renamed_like_graphpatch(self) -> None:
        pg = pb.PatchableGraph(ProtectedNameModule(), torch.ones(3, 2), torch.ones(3, 2), _backend="graphpatch_eager")
        self.assertExpectedInline(ascii_tree(pg.graph), """\
<root>: CompiledGraphModule
+-sub_shape_1: Tensor(3, 2)
+-sub_shape: Tensor(3, 2)
+-add: Tensor(3, 2)
+-_code_: CompiledGraphModule
| +-input: Tensor(3, 2)
| +-weight: Tensor(3, 2)
| +-bias: Tensor(3)
| +-linear: Tensor(3, 3)
| `-output: Tensor(3, 3)
`-output: Tensor(3, 3)""")
        # The explorer's own attributes are never shadowed.
        self.assertIsInstance(pg.graph._code, str)
        self.assertIsInstance(pg.graph._shape, ShapeTree)
        self.assertNotIn("_code", pg.graph)
        self.assertNotIn("_shape", pg.graph)
        self.assertEqual(pg.graph._code_.weight._shape, torch.Size([3, 2]))
        self.assertEqual(str(pg.graph.sub_shape_1), "sub_shape_1")


def walk(node: pb.NodePath) -> List[pb.NodePath]:
    nodes = [node]
    for child in node:
        nodes.extend(walk(child))
    return nodes


class LookupTest(expecttest.TestCase):
    def test_full_dotted_path(self) -> None:
        pg = pb.PatchableGraph(NestedModel(), torch.randn(2, 100), _backend="graphpatch_eager")
        node = pg.graph["a.b_0.c.linear.output"]
        self.assertEqual(str(node), "a.b_0.c.linear.output")
        self.assertIs(node, pg.graph.a.b_0.c.linear.output)
        self.assertIs(pg.graph.a["b_0.c"], pg.graph.a.b_0.c)
        self.assertIn("a.b_1.relu", pg.graph)

    def test_bar_and_dot_paths_reach_nested_items(self) -> None:
        pg, _ = nested_graph()
        node = pg.graph["output|sub_1.sub_0"]
        self.assertIs(pg.graph["output.sub_1.sub_0"], node)
        self.assertIs(pg.graph.output.sub_1.sub_0, node)
        self.assertEqual(str(node), "output|sub_1.sub_0")
        self.assertEqual(str(pg.graph.output.sub_1), "output|sub_1")
        self.assertEqual(str(pg.graph["pair.output|sub_1"]), "pair.output|sub_1")

    def test_missing_part_is_a_key_error_naming_it(self) -> None:
        pg, _ = nested_graph()
        with self.assertRaisesRegex(KeyError, r"no node 'nope' under 'lin' \(looking up 'lin.nope'\); children: input, weight, bias, linear, output"):
            pg.graph["lin.nope"]
        with self.assertRaisesRegex(AttributeError, "no node 'nope'"):
            pg.graph.lin.nope

    def test_tree_node_as_patch_key(self) -> None:
        pg, x = nested_graph()
        with torch.no_grad():
            reference = pg(x)
            with pg.patch({pg.graph["output|sub_1.sub_0"]: ZeroPatch()}):
                patched = pg(x)
        self.assertTrue(bool((patched[1][0] == 0).all()))
        torch.testing.assert_close(patched[1][2], reference[1][2])
        self.assertEqual(pg.graph.lin.output, pg.graph["lin.output"])
        self.assertEqual(len({pg.graph.lin.output, pg.graph["lin.output"]}), 1)


class ShapeAndCodeTest(expecttest.TestCase):
    def test_shape_of_a_leaf_is_a_size(self) -> None:
        pg, _ = nested_graph()
        self.assertEqual(pg.graph.lin.weight._shape, torch.Size([4, 4]))
        self.assertEqual(pg.graph.output.sub_2.d.sub_0._shape, torch.Size([]))
        self.assertIsNone(pg.graph.output.sub_1.sub_1.sub_1._shape)  # an int in the result

    def test_shape_of_a_scope_is_a_navigable_tree(self) -> None:
        pg, _ = nested_graph()
        shape = pg.graph._shape
        self.assertIsInstance(shape, Mapping)
        self.assertEqual(shape.lin.output, torch.Size([2, 4]))
        self.assertEqual(shape.output.sub_1.sub_0, torch.Size([2, 4]))
        self.assertEqual(shape["output|sub_1.sub_0"], torch.Size([2, 4]))
        self.assertEqual(pg.graph.output._shape.sub_1.sub_0, pg.graph.output.sub_1._shape.sub_0)
        self.assertEqual(
            pg.graph.lin._shape,
            {"input": (2, 4), "weight": (4, 4), "bias": (4,), "linear": (2, 4), "output": (2, 4)},
        )
        self.assertEqual(list(shape), ["x", "lin", "pair", "sub", "sum", "output"])
        self.assertEqual(repr(shape.pair), repr(pg.graph.pair))

    def test_code_of_a_leaf_is_its_source_line(self) -> None:
        pg = pb.PatchableGraph(LinearModel(), torch.randn(3, 2), _backend="graphpatch_eager")
        self.assertEqual(pg.graph.linear.linear._code, "return self.linear(x)")

    def test_code_of_the_root_is_the_graph_code(self) -> None:
        pg, _ = nested_graph()
        code = pg.graph._code
        self.assertTrue(code.startswith("def forward("), code)
        self.assertIn("torch._C._nn.linear(", code)
        self.assertIn("return (", code)
        self.assertEqual(repr(code), str(code))  # prints as code in the REPL

    def test_code_of_a_scope_is_the_lines_computing_it(self) -> None:
        pg, _ = nested_graph()
        self.assertExpectedInline(pg.graph.pair._code, """\
a = y + 1
b = y * 2""")
        self.assertNotIn("linear", pg.graph.pair._code)

    def test_dir_lists_children_and_attributes(self) -> None:
        pg, _ = nested_graph()
        self.assertEqual(dir(pg.graph.lin), ["_code", "_dtype", "_shape", "bias", "input", "linear", "output", "weight"])
        self.assertEqual(pg.graph.lin.weight._dtype, torch.float32)


class SymbolicSizesTest(expecttest.TestCase):
    def test_symbolic_graph_drawn_with_example_sizes(self) -> None:
        model, x = LinearModel(), torch.randn(5, 2)
        torch._dynamo.mark_dynamic(x, 0)
        pg = pb.PatchableGraph(model, x, _backend="graphpatch_eager")
        # The captured graph is symbolic in the batch size...
        self.assertIsInstance(index_for(model).by_name["x"][0].site.shape[0], torch.SymInt)
        # ...and the tree shows the example's sizes.
        self.assertExpectedInline(ascii_tree(pg.graph), """\
<root>: CompiledGraphModule
+-x: Tensor(5, 2)
+-linear: CompiledGraphModule
| +-input: Tensor(5, 2)
| +-weight: Tensor(3, 2)
| +-bias: Tensor(3)
| +-linear: Tensor(5, 3)
| `-output: Tensor(5, 3)
`-output: Tensor(5, 3)""")
        self.assertEqual(pg.graph.linear.output._shape, torch.Size([5, 3]))
        self.assertEqual(pg.graph._shape.x, torch.Size([5, 2]))


class ProtectedNamesRuleTest(expecttest.TestCase):
    def rename(self, names: List[str]) -> Dict[str, str]:
        protected = ProtectedNames(names)
        return {name: protected_name(name, protected) for name in names}

    def test_values_get_sub_and_a_free_counter_scopes_a_trailing_underscore(self) -> None:
        self.assertEqual(
            self.rename(["_shape", "sub_shape", "_code", "_code.input", "_code._shape", "output|_code.sub_0"]),
            {
                "_shape": "sub_shape_1",
                "sub_shape": "sub_shape",
                "_code": "sub_code",
                "_code.input": "_code_.input",
                "_code._shape": "_code_.sub_shape",
                "output|_code.sub_0": "output|sub_code.sub_0",
            },
        )

    def test_other_names_are_untouched(self) -> None:
        names = ["x", "_private", "layers_0.mlp.output", "output|sub_1.sub_0", "_shape_", "sub_code"]
        self.assertEqual(self.rename(names), {name: name for name in names})


def test_renamed_tree_names_are_patchable() -> None:
    pg = pb.PatchableGraph(ProtectedNameModule(), torch.ones(3, 2), torch.ones(3, 2), _backend="graphpatch_eager")
    assert "sub_shape_1" in pb.nodes(pg) and "_code_.output" in pb.nodes(pg)


def test_structure_types_follow_the_result() -> None:
    types = structure_types((torch.ones(1), [2, {"a b": torch.ones(1)}]))
    assert types == {
        "output": "tuple",
        "output|sub_0": "Tensor",
        "output|sub_1": "list",
        "output|sub_1.sub_0": "int",
        "output|sub_1.sub_1": "dict",
        "output|sub_1.sub_1.a_b": "Tensor",
    }


# Patch[T] subclasses.


@dataclass(kw_only=True)
class RankOnePatch(Patch[torch.Tensor]):
    """ROME-style: adds the outer product of two vectors (graphpatch's demo subclasses
    ``Patch[torch.Tensor]`` the same way)."""

    key_vector: torch.Tensor
    value_vector: torch.Tensor

    def op(self, original_output: torch.Tensor) -> torch.Tensor:
        return original_output + self.key_vector.unsqueeze(1) @ self.value_vector.unsqueeze(0)


def test_patch_is_generic() -> None:
    assert Patch[torch.Tensor] is not Patch  # subscriptable, like graphpatch's
    patch = RankOnePatch(key_vector=torch.ones(3), value_vector=torch.ones(4))
    assert patch.requires_clone and patch.path is None
    with pytest.raises(TypeError):
        RankOnePatch(torch.ones(3), torch.ones(4))  # keyword-only, like every patch


def test_generic_subclass_patches_under_both_backends(backend: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(3, 4)
    key, value = torch.randn(3), torch.randn(4)
    pg = pb.PatchableGraph(model, x, _backend=backend)
    with torch.no_grad(), pg.patch({"sub_0.output": RankOnePatch(key_vector=key, value_vector=value)}):
        patched = pg(x)
    expected = torch.relu(model[0](x) + key.unsqueeze(1) @ value.unsqueeze(0))
    torch.testing.assert_close(patched, expected)


# PatchableGraph.generate.


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def token_bias(token: int) -> torch.Tensor:
    bias = torch.zeros(50)
    bias[token] = 1e4
    return bias


@pytest.mark.transformers
@pytest.mark.slow
def test_generate_applies_patches_at_every_step() -> None:
    model = tiny_gpt2()
    ids = torch.randint(1, 50, (1, 5))
    options: Dict[str, Any] = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        unpatched = model.generate(ids, **options)
        pg = pb.PatchableGraph(model, ids)
        with pg.patch({"lm_head.output": AddPatch(value=token_bias(7))}):
            forced = pg.generate(ids, output_logits=True, return_dict_in_generate=True, **options)
        handle = model.lm_head.register_forward_hook(lambda _, __, out: out + token_bias(7))
        hooked = model.generate(ids, output_logits=True, return_dict_in_generate=True, **options)
        handle.remove()
        assert forced.sequences[0, 5:].tolist() == [7] * 4
        torch.testing.assert_close(torch.stack(forced.logits), torch.stack(hooked.logits), rtol=1e-4, atol=1e-2)
        # Outside the context generate is unpatched, and the model is left as it was.
        assert torch.equal(pg.generate(ids, **options), unpatched)
        assert "forward" not in model.__dict__
        graphs = pb.stats(pg).graphs
        pg(ids)
        assert pb.stats(pg).graphs == graphs  # the wrapper's own compiled code still serves


@pytest.mark.transformers
def test_generate_restores_forward_when_generate_raises() -> None:
    model = tiny_gpt2()
    ids = torch.randint(1, 50, (1, 5))
    own_forward = model.forward
    pg = pb.PatchableGraph(model, ids, _backend="graphpatch_eager")
    with pytest.raises(ValueError):
        pg.generate(ids, max_new_tokens=-3)
    assert "forward" not in model.__dict__ and model.forward == own_forward


def test_generate_needs_a_generate_method() -> None:
    pg = pb.PatchableGraph(LinearModel(), torch.randn(3, 2), _backend="graphpatch_eager")
    with pytest.raises(TypeError, match="LinearModel has no generate method"):
        pg.generate(torch.randn(3, 2))


class _UserContext:
    def __enter__(self) -> "_UserContext":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


class EagerRoot(nn.Module):
    """Dynamo runs this whole forward eagerly (a graph break under a user context manager)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor):
        with _UserContext():
            print("", end="")
            h = self.lin(x)
            return h * 2, [h, 3]


class EagerRootTest(expecttest.TestCase):
    def test_forward_run_eagerly_draws_its_boundaries(self) -> None:
        """No graph holds any node of this model: the tree shows the boundaries named from its
        first eager run (inputs, parameters, results, nested as returned), no op of its body,
        and a probe on a nested result reads what the forward returned there."""
        torch._dynamo.reset()
        x = torch.randn(2, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pg = pb.PatchableGraph(EagerRoot(), x)
            self.assertExpectedInline(ascii_tree(pg.graph), """\
<root>: CompiledGraphModule
+-x: Tensor(2, 3)
+-lin: CompiledGraphModule
| +-input: Tensor(2, 3)
| +-weight: Tensor(3, 3)
| +-bias: Tensor(3)
| `-output: Tensor(2, 3)
`-output: tuple(2)
  +-sub_0: Tensor(2, 3)
  `-sub_1: list(2)
    +-sub_0: Tensor(2, 3)
    `-sub_1: int""")
            self.assertEqual(str(pg.graph.lin.output._code), "")
            probe = pb.ProbePatch()
            with torch.no_grad(), pg.patch({"output|sub_1.sub_0": probe}):
                result = pg(x)
        torch.testing.assert_close(probe.activation, result[1][0])
