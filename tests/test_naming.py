"""Node names and the graph tree (snapshots reviewed through expecttest)."""

import expecttest
import torch

import patch_backend as pb
from fixtures import (
    BlocksWithBreak,
    BufferModel,
    CalledTwice,
    ContainerModel,
    GraphBreakModel,
    LayerNormModel,
    LinearModel,
    NestedModel,
    TupleModel,
    VarArgsModel,
)


def ascii_tree(node) -> str:
    """repr of a tree with the box-drawing characters spelled in ASCII (expecttest needs ASCII)."""
    return repr(node).replace("├─", "+-").replace("└─", "`-").replace("│", "|")


def listing(model, *args, backend="graphpatch_eager", **kwargs):
    pg = pb.PatchableGraph(model, *args, _backend=backend, **kwargs)
    return "\n".join(pb.nodes(pg))


class NamingTest(expecttest.TestCase):
    def test_linear(self):
        self.assertExpectedInline(listing(LinearModel(), torch.randn(3, 2)), """\
x
linear.input
linear.weight
linear.bias
linear.linear
linear.output
output""")

    def test_linear_tree(self):
        pg = pb.PatchableGraph(LinearModel(), torch.randn(3, 2), _backend="graphpatch_eager")
        self.assertExpectedInline(ascii_tree(pg.graph), """\
<root>: CompiledGraphModule
+-x: Tensor(3, 2)
+-linear: CompiledGraphModule
| +-input: Tensor(3, 2)
| +-weight: Tensor(3, 2)
| +-bias: Tensor(3)
| +-linear: Tensor(3, 3)
| `-output: Tensor(3, 3)
`-output: Tensor(3, 3)""")

    def test_layer_norm(self):
        self.assertExpectedInline(listing(LayerNormModel(), torch.randn(2, 4)), """\
x
ln.input
ln.weight
ln.bias
ln.layer_norm
ln.output
output""")

    def test_nested(self):
        self.assertExpectedInline(listing(NestedModel(), torch.randn(2, 100)), """\
x
a.x
a.b_0.x
a.b_0.c.x
a.b_0.c.linear.input
a.b_0.c.linear.weight
a.b_0.c.linear.bias
a.b_0.c.linear.linear
a.b_0.c.linear.output
a.b_0.c.output
a.b_0.relu
a.b_0.output
a.b_1.x
a.b_1.c.x
a.b_1.c.linear.input
a.b_1.c.linear.weight
a.b_1.c.linear.bias
a.b_1.c.linear.linear
a.b_1.c.linear.output
a.b_1.c.output
a.b_1.relu
a.b_1.output
a.b_2.x
a.b_2.c.x
a.b_2.c.linear.input
a.b_2.c.linear.weight
a.b_2.c.linear.bias
a.b_2.c.linear.linear
a.b_2.c.linear.output
a.b_2.c.output
a.b_2.relu
a.b_2.output
a.output
mul
output""")

    def test_nested_tree(self):
        pg = pb.PatchableGraph(NestedModel(), torch.randn(2, 100), _backend="graphpatch_eager")
        self.assertExpectedInline(ascii_tree(pg.graph.a.b_1), """\
a.b_1: CompiledGraphModule
+-x: Tensor(2, 100)
+-c: CompiledGraphModule
| +-x: Tensor(2, 100)
| +-linear: CompiledGraphModule
| | +-input: Tensor(2, 100)
| | +-weight: Tensor(100, 100)
| | +-bias: Tensor(100)
| | +-linear: Tensor(2, 100)
| | `-output: Tensor(2, 100)
| `-output: Tensor(2, 100)
+-relu: Tensor(2, 100)
`-output: Tensor(2, 100)""")

    def test_tuple_output(self):
        self.assertExpectedInline(listing(TupleModel(), torch.randn(3, 2)), """\
x
linear.input
linear.weight
linear.bias
linear.linear
linear.output
add
output|sub_0
mul
output|sub_1""")

    def test_called_twice(self):
        self.assertExpectedInline(listing(CalledTwice(), torch.randn(2, 3)), """\
x
linear_0.input
linear_0.weight
linear_0.bias
linear_0.linear
linear_0.output
relu
linear_1.input
linear_1.weight
linear_1.bias
linear_1.linear
linear_1.output
output""")

    def test_called_twice_tree(self):
        pg = pb.PatchableGraph(CalledTwice(), torch.randn(2, 3), _backend="graphpatch_eager")
        self.assertExpectedInline(ascii_tree(pg.graph), """\
<root>: CompiledGraphModule
+-x: Tensor(2, 3)
+-linear_0: CompiledGraphModule
| +-input: Tensor(2, 3)
| +-weight: Tensor(3, 3)
| +-bias: Tensor(3)
| +-linear: Tensor(2, 3)
| `-output: Tensor(2, 3)
+-relu: Tensor(2, 3)
+-linear_1: CompiledGraphModule
| +-input: Tensor(2, 3)
| +-weight: Tensor(3, 3)
| +-bias: Tensor(3)
| +-linear: Tensor(2, 3)
| `-output: Tensor(2, 3)
`-output: Tensor(2, 3)""")

    def test_containers(self):
        self.assertExpectedInline(listing(ContainerModel(), torch.randn(2, 3)), """\
x
seq.input
seq.sub_0.input
seq.sub_0.weight
seq.sub_0.bias
seq.sub_0.linear
seq.sub_0.output
seq.sub_1.input
seq.sub_1.relu
seq.sub_1.output
seq.output
blocks_a.input
blocks_a.weight
blocks_a.bias
blocks_a.linear
blocks_a.output
blocks_b.input
blocks_b.sub_0.input
blocks_b.sub_0.weight
blocks_b.sub_0.bias
blocks_b.sub_0.linear
blocks_b.sub_0.output
blocks_b.output
layers_0.input
layers_0.weight
layers_0.bias
layers_0.linear
layers_0.output
layers_1.input
layers_1.weight
layers_1.bias
layers_1.linear
layers_1.output
output""")

    def test_buffer(self):
        self.assertExpectedInline(listing(BufferModel(), torch.randn(2, 2)), """\
x
linear.input
linear.weight
linear.bias
linear.linear
linear.output
scale
mul
output""")

    def test_varargs(self):
        names = listing(VarArgsModel(), torch.randn(2, 2), torch.ones(2), k=5, bias=torch.zeros(2))
        self.assertExpectedInline(names, """\
x
args.sub_0
kwargs.bias
linear.input
linear.weight
linear.bias
linear.linear
linear.output
mul
add
add_1
output""")

    def test_graph_break_names_match_unbroken(self):
        broken = listing(GraphBreakModel(), torch.randn(2, 3))
        self.assertExpectedInline(broken, """\
x
first.input
first.weight
first.bias
first.linear
first.output
relu
second.input
second.weight
second.bias
second.linear
second.output
add
output""")

    def test_blocks_with_break(self):
        self.assertExpectedInline(listing(BlocksWithBreak(), torch.randn(2, 3)), """\
x
embed.input
embed.weight
embed.bias
embed.linear
embed.output
blocks_0.x
blocks_0.up.input
blocks_0.up.weight
blocks_0.up.bias
blocks_0.up.linear
blocks_0.up.output
blocks_0.relu
blocks_0.down.input
blocks_0.down.weight
blocks_0.down.bias
blocks_0.down.linear
blocks_0.down.output
blocks_0.add
blocks_0.output
blocks_1.x
blocks_1.up.input
blocks_1.up.weight
blocks_1.up.bias
blocks_1.up.linear
blocks_1.up.output
blocks_1.relu
blocks_1.down.input
blocks_1.down.weight
blocks_1.down.bias
blocks_1.down.linear
blocks_1.down.output
blocks_1.add
blocks_1.output
blocks_2.x
blocks_2.up.input
blocks_2.up.weight
blocks_2.up.bias
blocks_2.up.linear
blocks_2.up.output
blocks_2.relu
blocks_2.down.input
blocks_2.down.weight
blocks_2.down.bias
blocks_2.down.linear
blocks_2.down.output
blocks_2.add
blocks_2.output
mul
output""")

    def test_same_names_through_compile_and_patchable_graph(self):
        model = NestedModel()
        compiled = torch.compile(model, backend="graphpatch")
        compiled(torch.randn(2, 100))
        self.assertEqual(pb.nodes(compiled), pb.nodes(pb.PatchableGraph(NestedModel(), torch.randn(2, 100))))

    def test_glob_pattern(self):
        pg = pb.PatchableGraph(NestedModel(), torch.randn(2, 100), _backend="graphpatch_eager")
        self.assertExpectedInline("\n".join(pb.nodes(pg, "a.b_*.c.output")), """\
a.b_0.c.output
a.b_1.c.output
a.b_2.c.output""")

    def test_tree_navigation(self):
        pg = pb.PatchableGraph(LinearModel(), torch.randn(3, 2), _backend="graphpatch_eager")
        node = pg.graph.linear.weight
        self.assertEqual(str(node), "linear.weight")
        self.assertEqual(node._shape, torch.Size([3, 2]))
        self.assertIn("weight", dir(pg.graph.linear))
        self.assertIn("self.linear(x)", pg.graph.linear.linear._code)
        with self.assertRaisesRegex(AttributeError, "no node 'nope'"):
            pg.graph.linear.nope

    def test_nodes_before_capture_is_a_clear_error(self):
        compiled = torch.compile(LinearModel(), backend="graphpatch")
        with self.assertRaisesRegex(RuntimeError, "has been captured yet"):
            pb.nodes(compiled)


class _C(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c_linear = torch.nn.Linear(4, 4)

    def forward(self, c_inputs, inputs_2=None, inputs_3=None, inputs_4=None):
        return self.c_linear(c_inputs + inputs_2 + inputs_3 + inputs_4)


class _B(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.b_linear = torch.nn.Linear(4, 4)
        self.c = _C()

    def forward(self, b_inputs, a_inputs):
        b_outputs = self.c(b_inputs, inputs_3=torch.ones_like(b_inputs), inputs_2=b_inputs * 2, inputs_4=a_inputs)
        return self.b_linear(b_outputs)


class _A(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a_linear = torch.nn.Linear(4, 4)
        self.grandchildren_b = torch.nn.ModuleList([_B() for _ in range(2)])

    def forward(self, a_inputs):
        b_outputs = a_inputs
        for b in self.grandchildren_b:
            b_outputs = b(b_outputs, a_inputs)
        return self.a_linear(b_outputs)


class GraphpatchNested(torch.nn.Module):
    """The shape of graphpatch 0.2.3's ``nested_module`` fixture (smaller): inputs passed by
    position and by keyword, in another order than the parameters."""

    def __init__(self):
        super().__init__()
        self.root_linear = torch.nn.Linear(4, 4)
        self.child_a = _A()

    def forward(self, root_inputs):
        return self.root_linear(self.child_a(root_inputs))


class InputNamesTest(expecttest.TestCase):
    def test_graphpatch_nested_input_names(self):
        """Every input is named after the forward parameter it was bound to, as graphpatch's
        recorded tree for its nested fixture shows (``b_inputs``, ``a_inputs``, ``c_inputs``,
        ``inputs_2`` ... ``inputs_4``), never ``input_<k>``."""
        pg = pb.PatchableGraph(GraphpatchNested(), torch.randn(1, 4), _backend="graphpatch_eager")
        self.assertExpectedInline("\n".join(pb.nodes(pg, "child_a.grandchildren_b_0.**")), """\
child_a.grandchildren_b_0.b_inputs
child_a.grandchildren_b_0.a_inputs
child_a.grandchildren_b_0.ones_like
child_a.grandchildren_b_0.mul
child_a.grandchildren_b_0.c.c_inputs
child_a.grandchildren_b_0.c.inputs_2
child_a.grandchildren_b_0.c.inputs_3
child_a.grandchildren_b_0.c.inputs_4
child_a.grandchildren_b_0.c.add
child_a.grandchildren_b_0.c.add_1
child_a.grandchildren_b_0.c.add_2
child_a.grandchildren_b_0.c.c_linear.input
child_a.grandchildren_b_0.c.c_linear.weight
child_a.grandchildren_b_0.c.c_linear.bias
child_a.grandchildren_b_0.c.c_linear.linear
child_a.grandchildren_b_0.c.c_linear.output
child_a.grandchildren_b_0.c.output
child_a.grandchildren_b_0.b_linear.input
child_a.grandchildren_b_0.b_linear.weight
child_a.grandchildren_b_0.b_linear.bias
child_a.grandchildren_b_0.b_linear.linear
child_a.grandchildren_b_0.b_linear.output
child_a.grandchildren_b_0.output""")
        for backend in ("graphpatch_eager", "graphpatch"):
            torch._dynamo.reset()
            model = GraphpatchNested()
            x = torch.randn(1, 4)
            compiled = torch.compile(model, backend=backend)
            compiled(x)
            with torch.no_grad(), pb.patch(compiled, {"child_a.grandchildren_b_1.c.inputs_3": pb.ZeroPatch()}):
                patched = compiled(x)

            def pre_hook(module, args, kwargs):
                return args, {**kwargs, "inputs_3": torch.zeros_like(kwargs["inputs_3"])}

            handle = model.child_a.grandchildren_b[1].c.register_forward_pre_hook(pre_hook, with_kwargs=True)
            try:
                with torch.no_grad():
                    expected = model(x)
            finally:
                handle.remove()
            torch.testing.assert_close(patched, expected)


class _Scaled(torch.nn.Module):
    """GPT-2 attention's shape: a Python number attribute (``self.scaling``) used in forward."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.scale = scale

    def forward(self, x):
        return self.lin(x) * self.scale


class _ScaledNet(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.inner = _Scaled(scale)
        self.head = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.inner(x))


def test_names_do_not_depend_on_what_was_compiled_before():
    """After one instance, a second with another value of a number attribute makes Dynamo lift
    the attribute as a graph input (two values seen in one code). The first compile baked it in
    and named nothing there; the second gets the same names (no ``inner.scale``), and a patch
    on them equals a forward hook."""
    x = torch.randn(2, 3)
    for backend in ("graphpatch_eager", "graphpatch"):
        torch._dynamo.reset()
        first = torch.compile(_ScaledNet(0.5), backend=backend)
        first(x)
        model = _ScaledNet(0.25)
        second = torch.compile(model, backend=backend)
        second(x)
        assert pb.nodes(second) == pb.nodes(first)
        assert "inner.scale" not in pb.nodes(second)
        handle = model.inner.lin.register_forward_hook(lambda module, args, output: output * 0)
        try:
            expected = model(x)
        finally:
            handle.remove()
        with pb.patch(second, {"inner.lin.output": pb.ZeroPatch()}):
            torch.testing.assert_close(second(x), expected)
