"""The dispatcher as a router: front-ends produce requests, a bounded thread-safe cache holds
programs, and the core imports no front-end."""

import ast
import pathlib
import threading
import warnings

import pytest
import torch

import patch_backend as pb
from fixtures import TwoLayerMLP
from patch_backend import AddPatch, ZeroPatch
from patch_backend.runtime.cache import ProgramCache
from patch_backend.stats import Stats

PACKAGE = pathlib.Path(pb.__file__).parent


def _imports(path):
    """Every module a file imports, as written (relative imports keep their dots)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found.extend(f"{module}.{alias.name}" if not node.module else module for alias in node.names)
    return found


def test_the_core_imports_no_front_end():
    core = sorted((PACKAGE / "runtime").glob("*.py")) + [PACKAGE / "backend.py"]
    assert len(core) >= 5
    for path in core:
        for module in _imports(path):
            parts = module.lstrip(".").split(".")
            assert "sweep" not in parts and "prepare" not in parts, f"{path.name} imports {module}"


def test_the_router_has_no_front_end_branches():
    from patch_backend.runtime.dispatcher import Dispatcher

    source = ast.get_source_segment(
        (PACKAGE / "runtime" / "dispatcher.py").read_text(),
        next(
            node
            for node in ast.walk(ast.parse((PACKAGE / "runtime" / "dispatcher.py").read_text()))
            if isinstance(node, ast.FunctionDef) and node.name == "__call__"
        ),
    )
    assert Dispatcher.__call__.__name__ == "__call__"
    for word in ("sweep", "prepared", "eager", "declared", "selection"):
        assert word not in source


def test_cache_evicts_least_recently_used_and_warns_once():
    stats = Stats()
    cache = ProgramCache(stats, graph_uid=7)
    with pb.config.patch(max_variants=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache.put("a", 1)
        cache.put("b", 2)
        assert cache.get("a") == 1  # "a" is now the most recently used: "b" goes first
        cache.put("c", 3)
        assert cache.keys() == ["a", "c"]
        cache.put("d", 4)
        assert cache.keys() == ["c", "d"]
        assert cache.get("b") is None
    assert (stats.evictions, stats.variant_hits, stats.variant_misses) == (2, 1, 1)
    bound = [w for w in caught if "graph 7 compiled more than 2 patched variants" in str(w.message)]
    assert len(bound) == 1


def test_cache_keeps_the_first_program_put_for_a_key():
    cache = ProgramCache(Stats(), graph_uid=0)
    assert cache.put("a", 1) == 1
    assert cache.put("a", 2) == 1  # another thread built it too: everyone runs the same one
    assert cache.values() == [1]


def test_cache_survives_threads_racing_on_a_small_bound():
    stats = Stats()
    cache = ProgramCache(stats, graph_uid=0)
    errors = []

    def hammer(offset):
        try:
            for step in range(2000):
                key = (offset + step) % 7
                if cache.get(key) is None:
                    cache.put(key, key)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    with pb.config.patch(max_variants=3), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threads = [threading.Thread(target=hammer, args=(offset,)) for offset in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    assert len(cache) <= 3
    assert stats.evictions > 0


def _zero_row_0(model, x, site):
    """The model's output with row 0 of ``site`` zeroed, by hand (not through a dispatcher)."""

    def zero(t):
        t = t.clone()
        t[0] = 0
        return t

    def layer(position, h):
        mlp = model.layers[position]
        up = mlp.up(h)
        if site == f"layers_{position}.up.output":
            up = zero(up)
        out = mlp.down(mlp.act(up))
        return zero(out) if site == f"layers_{position}.output" else out

    with torch.no_grad():
        h = x + layer(0, x)
        return h + layer(1, h)


def test_threads_patching_one_model_beyond_the_bound():
    """Threads patch one graph with more structures than the cache keeps: every result right."""
    model, x = TwoLayerMLP(), torch.randn(4, 8)
    compiled = torch.compile(model, backend="graphpatch_eager")  # the same cache, no compiles
    compiled(x)
    sites = ["layers_0.output", "layers_1.output", "layers_0.up.output", "layers_1.up.output"]
    expected = {site: _zero_row_0(model, x, site) for site in sites}
    errors = []

    def patch_in_turn(offset):
        try:
            for step in range(30):
                site = sites[(offset + step) % len(sites)]
                with pb.patch(compiled, {site: ZeroPatch(slice=(0,))}):
                    torch.testing.assert_close(compiled(x), expected[site])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    before = pb.stats(compiled).evictions
    with pb.config.patch(max_variants=2), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threads = [threading.Thread(target=patch_in_turn, args=(offset,)) for offset in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors[0]
    assert pb.stats(compiled).evictions > before


def test_dispatcher_keeps_its_programs_on_itself():
    """Per-graph state lives on the graph's dispatcher, and programs go with the model."""
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = torch.compile(model, backend="graphpatch")
    compiled(x)
    with pb.patch(compiled, {"layers_0.output": AddPatch(value=torch.ones(8))}):
        compiled(x)
    from patch_backend.capture.capture import all_captures
    from patch_backend.capture.index import index_for

    # This model's graphs only: another test's model may still be alive (a module-level cache).
    uids = {uid for uid, _ in index_for(model).by_occurrence}
    (dispatcher,) = [
        c.dispatcher for c in all_captures() if c.uid in uids and c.dispatcher is not None and c.dispatcher.variants
    ]
    assert len(dispatcher.variants) == 1
    del compiled, model
    import gc

    gc.collect()
    assert len(dispatcher.variants) == 0


def _graph_facts(model):
    """The GraphFacts of ``model``'s patched graph (the one whose dispatcher built a program)."""
    from patch_backend.capture.capture import all_captures
    from patch_backend.capture.index import index_for

    uids = {uid for uid, _ in index_for(model).by_occurrence}
    (dispatcher,) = [
        c.dispatcher for c in all_captures() if c.uid in uids and c.dispatcher is not None and c.dispatcher.variants
    ]
    return dispatcher.graph


def _builds(graph):
    return graph.occurrences.builds, graph.lowerings.builds, graph.checked.builds


def test_a_new_context_of_a_known_structure_derives_nothing_again(backend):
    """pb.patch's per-structure memos live on the graph: a loop of new contexts with new values
    builds the sites, the spec and the shape check once; a new structure builds them again."""
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = torch.compile(model, backend=backend)
    compiled(x)
    site = "layers_0.output"
    with pb.patch(compiled, {site: AddPatch(value=torch.ones(8))}):
        compiled(x)
    graph = _graph_facts(model)
    first = _builds(graph)
    assert first == (1, 1, 1)
    variants = pb.stats(compiled).variants_compiled
    for step in range(5):
        delta = torch.full((8,), float(step))
        with pb.patch(compiled, {site: AddPatch(value=delta)}):
            got = compiled(x)
        assert torch.allclose(got, _added(model, x, site, delta))
    assert _builds(graph) == first
    assert pb.stats(compiled).variants_compiled == variants

    # Another slice position: the same spec (positions are runtime values), a new shape check.
    with pb.patch(compiled, {site: AddPatch(value=torch.ones(8), slice=(1,))}):
        compiled(x)
    with pb.patch(compiled, {site: AddPatch(value=torch.ones(8), slice=(0,))}):
        got = compiled(x)
    assert torch.allclose(got, _added(model, x, site, torch.ones(8), row=0))
    assert _builds(graph) == (1, 2, 3)
    # Another value shape, another site: each is a new structure.
    with pb.patch(compiled, {site: AddPatch(value=torch.ones(2, 8))}):
        compiled(x)
    assert _builds(graph) == (1, 3, 4)
    with pb.patch(compiled, {"layers_1.output": ZeroPatch()}):
        compiled(x)
    assert _builds(graph) == (2, 4, 5)


def test_a_known_structure_still_checks_each_context(backend):
    """Memos per structure keep every check: a bad slice raises before the model runs, and a
    name whose node never ran raises at exit, in the tenth context as in the first."""
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = torch.compile(model, backend=backend)
    compiled(x)
    for _ in range(3):
        with pb.patch(compiled, {"layers_0.output": AddPatch(value=torch.ones(8), slice=(1,))}):
            compiled(x)
    calls = []
    handle = model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(IndexError, match="layers_0.output"):
            with pb.patch(compiled, {"layers_0.output": AddPatch(value=torch.ones(8), slice=(5,))}):
                compiled(x)
        with pytest.raises(ValueError, match="does not broadcast"):
            with pb.patch(compiled, {"layers_0.output": AddPatch(value=torch.ones(3), slice=(1,))}):
                compiled(x)
    finally:
        handle.remove()
    assert calls == []  # neither call reached the model


class _Gated(torch.nn.Module):
    """``extra`` runs only when ``flag`` is True."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.extra = torch.nn.Linear(3, 3)

    def forward(self, x, flag=False):
        x = self.linear(x)
        return self.extra(x) if flag else x


def test_a_known_structure_still_raises_for_a_node_that_never_ran(backend):
    """The run marks of a structure are shared by its contexts, their run counts are not: each
    context whose branch skips the patched node raises at its own exit."""
    model, x = _Gated(), torch.randn(2, 3)
    compiled = torch.compile(model, backend=backend)
    compiled(x, True)
    compiled(x, False)
    for flag in (True, False, True, False):
        if flag:
            with pb.patch(compiled, {"extra.output": AddPatch(value=torch.ones(3))}):
                compiled(x, True)
        else:
            with pytest.raises(pb.PatchNotAppliedError, match="'extra.output' \\(AddPatch\\) never ran"):
                with pb.patch(compiled, {"extra.output": AddPatch(value=torch.ones(3))}):
                    compiled(x, False)


def _added(model, x, site, delta, row=None):
    """The model's output with ``delta`` added at a layer's output, by hand (a forward hook)."""
    layer = model.layers[int(site.split("_")[1].split(".")[0])]

    def hook(module, args, output):
        output = output.clone()
        if row is None:
            return output + delta
        output[row] += delta
        return output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        handle.remove()


def test_walk_reads_what_lower_reads():
    """``spec.walk`` (the per-call read of a known structure) gives the values ``lower`` gives,
    slot for slot, and structures ``lower`` tells apart get different keys."""
    from patch_backend import ProbePatch, RecordPatch, ReplacePatch
    from patch_backend.capture.index import index_for
    from patch_backend.program.plan import SitePatches
    from patch_backend.program.spec import Lowerings, lower, walk

    model = TwoLayerMLP()
    compiled = torch.compile(model, backend="graphpatch_eager")
    compiled(torch.randn(2, 8))
    index = index_for(model)
    a, b = (index.by_name[name][0].site for name in ("layers_0.output", "layers_1.output"))
    selections = [
        (SitePatches(a, (AddPatch(value=torch.ones(8)),)),),
        (SitePatches(a, (ZeroPatch(slice=(1, slice(2, None))), ProbePatch())),),
        (SitePatches(a, (ReplacePatch(value=2.5, slice=(slice(0, 2, 1), 3)),)), SitePatches(b, (RecordPatch(),))),
        (SitePatches(a, (AddPatch(value=3, slice=(Ellipsis, 4)),)),),
        (SitePatches(a, (AddPatch(value=torch.ones(8, requires_grad=True)),)),),
    ]
    lowerings = Lowerings()
    keys = set()
    for selection in selections:
        walked = walk(selection)
        assert walked is not None
        expected = lower(selection)
        assert walked.values.ints == expected.values.ints
        assert walked.values.scalars == expected.values.scalars
        assert all(x is y for x, y in zip(walked.values.tensors, expected.values.tensors))
        assert len(walked.values.tensors) == len(expected.values.tensors)
        assert lowerings.lower(selection, walked).spec == expected.spec
        assert lowerings.lower(selection, walk(selection)).spec == expected.spec  # from the memo
        keys.add(walked.key)
    assert len(keys) == len(selections) and lowerings.builds == len(selections)
    # Numbers are values, not structure; what lower cannot read cheaply is not walked.
    assert walk((SitePatches(a, (ZeroPatch(slice=(0, slice(5, None))),)),)).key == walk(
        (SitePatches(a, (ZeroPatch(slice=(1, slice(2, None))),)),)
    ).key
    assert walk((SitePatches(a, (ZeroPatch(slice=([0, 1],)),)),)) is None
    assert walk((SitePatches(a, (ZeroPatch(slice=(None, 1)),)),)) is None
    assert walk((SitePatches(a, (AddPatch(value=2**60),)),)) is None


@pytest.mark.parametrize("backend, policy", [("graphpatch_eager", "sync"), ("graphpatch", "never")])
def test_the_eager_form_scans_the_graph_once_per_structure(monkeypatch, backend, policy):
    """A loop of contexts of one structure with new values, on the eager interpreter (the
    ``graphpatch_eager`` program, or the eager tier under "never"), plans its sites once: the
    interpreter is kept per graph and its plans per structure; a second structure plans anew."""
    import patch_backend.program.eager as eager

    plans = []
    real = eager.site_plan

    def counted(gm, spec):
        plans.append(spec)
        return real(gm, spec)

    monkeypatch.setattr(eager, "site_plan", counted)
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = torch.compile(model, backend=backend)
    expected = compiled(x)
    with pb.config.patch(compile_policy=policy):
        for step in range(4):
            with pb.patch(compiled, {"output": AddPatch(value=float(step))}):
                torch.testing.assert_close(compiled(x), expected + step)
        assert len(plans) == 1
        with pb.patch(compiled, {"output": ZeroPatch()}):
            torch.testing.assert_close(compiled(x), torch.zeros_like(expected))
    assert len(plans) == 2


class _Counted:
    """Counts the calls of a function of patch_backend.context (monkeypatched)."""

    def __init__(self, monkeypatch, name):
        import patch_backend.context as context

        self.calls = 0
        real = getattr(context, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(context, name, counted)


def test_a_context_of_a_planned_structure_reads_only_its_values(monkeypatch, backend):
    """The second context of a map structure on a handle is planned (context._Plan): its entry
    checks, sites, spec and shape check come from one lookup, and its call reads no structure
    (no ``read_map``, ``validate_entered``, ``walk``); every result is the hand-hooked one."""
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = torch.compile(model, backend=backend)
    compiled(x)
    site = "layers_0.output"
    read, validated, walked = (_Counted(monkeypatch, name) for name in ("read_map", "validate_entered", "walk"))
    # The first context is checked and walked in full, and leaves its plan and program.
    with pb.patch(compiled, {site: AddPatch(value=torch.zeros(8))}):
        compiled(x)
    assert (read.calls, validated.calls, walked.calls) == (1, 1, 1)
    graph = _graph_facts(model)
    builds = _builds(graph)
    variants = pb.stats(compiled).variants_compiled
    for step in range(6):
        delta = torch.randn(8)
        with pb.patch(compiled, {site: AddPatch(value=delta)}):
            got = compiled(x)
            again = compiled(x)  # a second call of the same context: the same plan
        torch.testing.assert_close(got, _added(model, x, site, delta))
        torch.testing.assert_close(again, got)
    assert (read.calls, validated.calls, walked.calls) == (1, 1, 1)
    assert _builds(graph) == builds
    assert pb.stats(compiled).variants_compiled == variants

    # Structure changes are new plans, checked and walked again; each result is right.
    with pb.patch(compiled, {site: AddPatch(value=torch.ones(2, 8))}):  # another value shape
        got = compiled(x)
    torch.testing.assert_close(got, _added(model, x, site, torch.ones(2, 8)))
    assert (read.calls, walked.calls) == (2, 2)
    with pb.patch(compiled, {site: AddPatch(value=torch.ones(8), slice=(1,))}):  # a slice
        got = compiled(x)
    torch.testing.assert_close(got, _added(model, x, site, torch.ones(8), row=1))
    with pb.patch(compiled, {"layers_1.output": AddPatch(value=torch.ones(8))}):  # another name
        got = compiled(x)
    torch.testing.assert_close(got, _added(model, x, "layers_1.output", torch.ones(8)))
    with pb.patch(compiled, {site: ZeroPatch()}):  # another kind
        got = compiled(x)
    torch.testing.assert_close(got, _zero_output(model, x, site))
    assert (read.calls, walked.calls) == (5, 5)
    # A planned slice structure with other numbers: the same plan, positions are values.
    for row in (0, 1, 0):
        with pb.patch(compiled, {site: AddPatch(value=torch.ones(8), slice=(row,))}):
            got = compiled(x)
        torch.testing.assert_close(got, _added(model, x, site, torch.ones(8), row=row))
    assert read.calls == 5


def _zero_output(model, x, site):
    layer = model.layers[int(site.split("_")[1].split(".")[0])]
    handle = layer.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        handle.remove()


def test_a_planned_structure_still_checks_each_context_and_call(backend):
    """A plan keeps every check: a value of the wrong shape raises before the model runs,
    naming the node and the patch, after any number of planned contexts; and a patch changed
    inside a context (its value, or its value's grad flag) is read at the call, as before."""
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = torch.compile(model, backend=backend)
    compiled(x)
    site = "layers_0.output"
    for _ in range(3):
        with pb.patch(compiled, {site: AddPatch(value=torch.ones(8))}):
            compiled(x)
    calls = []
    handle = model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="AddPatch at 'layers_0.output': value of shape \\(3,\\) does not broadcast"):
            with pb.patch(compiled, {site: AddPatch(value=torch.ones(3))}):
                compiled(x)
        patch = AddPatch(value=torch.ones(8))
        with pytest.raises(ValueError, match="AddPatch at 'layers_0.output'.*does not broadcast"):
            with pb.patch(compiled, {site: patch}):
                patch.value = torch.ones(5)  # changed inside the context: read at the call
                compiled(x)
        with pytest.raises(ValueError, match="cannot be stored in the target's dtype"):
            with pb.patch(compiled, {site: AddPatch(value=torch.ones(8, dtype=torch.complex64))}):
                compiled(x)
    finally:
        handle.remove()
    assert calls == []  # no call reached the model

    patch = AddPatch(value=torch.ones(8))
    with pb.patch(compiled, {site: patch}):
        other = torch.full((8,), 3.0)
        patch.value = other
        got = compiled(x)
    torch.testing.assert_close(got, _added(model, x, site, other))

    delta = torch.zeros(8)
    with pb.patch(compiled, {site: AddPatch(value=delta)}):
        delta.requires_grad_(True)  # the grad flag is structure: read at the call
        with torch.enable_grad():
            compiled(x).sum().backward()
    assert delta.grad is not None
    expected = torch.zeros(8, requires_grad=True)  # the same forward with a hand-written hook
    hooked = model.layers[0].register_forward_hook(lambda m, a, out: out + expected)
    try:
        with torch.enable_grad():
            model(x).sum().backward()
    finally:
        hooked.remove()
    torch.testing.assert_close(delta.grad, expected.grad)


def test_threads_share_plans_with_their_own_values():
    """Threads entering contexts of one structure with their own values share the plan and
    each get their own result."""
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = torch.compile(model, backend="graphpatch_eager")
    compiled(x)
    site = "layers_1.output"
    errors = []
    deltas = {(offset, step): torch.full((8,), float(offset * 100 + step)) for offset in range(3) for step in range(20)}
    # Expected results first: a hand-written hook on the model changes what Dynamo runs.
    expected = {key: _added(model, x, site, delta) for key, delta in deltas.items()}
    compiled(x)

    def loop(offset):
        try:
            for step in range(20):
                with pb.patch(compiled, {site: AddPatch(value=deltas[offset, step])}):
                    got = compiled(x)
                torch.testing.assert_close(got, expected[offset, step])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=loop, args=(offset,)) for offset in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
