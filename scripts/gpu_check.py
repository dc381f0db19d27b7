"""One run that says whether compiled patching is right and fast on a machine: correctness and ratios.

    python scripts/gpu_check.py --device cuda [--dtypes float32,bfloat16] [--json out/gpu_check.json]
    python scripts/gpu_check.py --device cpu --tiny [--json out/gpu_check_tiny.json]   # smoke test

A GPT-2-small-shaped model (12 layers, width 768, 12 heads, vocabulary 50257) with random weights,
built from a config (nothing downloaded); ``--tiny`` is a 2-layer width-64 model with tiny batches
and float32 only, for a smoke test of the same code paths on a CPU in under a minute.

Per dtype, in this order (each section in its own try/except: a failure is recorded in the JSON
and the other sections still run):

- ``forward``: a ZeroPatch, an AddPatch and a ReplacePatch map, each at a module output and at an
  op inside attention; ``torch.compile(model, backend="graphpatch")`` under ``pb.patch`` against
  ``backend="graphpatch_eager"`` and against hand-written hooks on the eager model.
- ``reduce_overhead`` (CUDA only): ``mode="reduce-overhead"`` (CUDA graphs) with new patch values
  every call: right results and one compiled variant for all the calls.
- ``bench``: per-forward milliseconds at a small and a large batch, interleaved, medians: eager,
  eager + hooks, Inductor, graphpatch patched (same and new values each call, and reduce-overhead
  on CUDA); compile seconds of the first Inductor call and of the first patched call.
- ``sweep``: ``pb.sweep`` (layers x positions, restoring the clean residual stream) against the
  eager forward-hook loop and hand-batched eager hooks: rows agree; seconds excluding and
  including compile (``pb.sweep``'s first call on a fresh ``torch.compile``).
- ``generate``: patched ``generate`` with a static cache through transformers' own compile path
  (``CompileConfig(backend="graphpatch")``, ``forward`` compiled for the prefill) against eager
  ``generate`` with hooks; new values compile nothing.

Stdout gets one JSON object (progress lines go to stderr); ``ok`` is false, and the exit code 1,
when a check failed or a section raised. Compile budget (what keeps a GPU run to a few minutes):
ten Inductor compiles per dtype -- plain Inductor at two batch sizes, three patched variants at
batch 1 and one at the large batch, one reduce-overhead variant (CUDA), one sweep variant (the
sweep's batched shape is the large batch), prefill and decode for generate. graphpatch's plain
variants are never run, so never compiled; ``graphpatch_eager`` traces without compiling.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import patch_backend as pb  # noqa: E402
from bench_patching import first_call_seconds, interleaved  # noqa: E402
from bench_util import device_name, sync, write_json  # noqa: E402
from patch_backend import AddPatch, ReplacePatch, ZeroPatch  # noqa: E402
from patch_backend.sweep import last_sweep_report  # noqa: E402
from sweep_common import (  # noqa: E402
    _hidden,
    _replace,
    clean_and_corrupt,
    clean_block_outputs,
    gpt2,
    hand_batched_hooks,
    hook_loop,
    seconds,
    sweep_cells,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Smallest tolerance on logits per dtype; the check uses max(this, 4 x the unpatched
#: compiled-vs-eager difference), because fusion alone moves low-precision results that much.
ATOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
NOISE_FACTOR = 4.0
SECTIONS = ("forward", "reduce_overhead", "bench", "sweep", "generate")


@dataclass(frozen=True)
class Sizes:
    """Model and workload shape; FULL is GPT-2 small, TINY the CPU smoke test."""

    layers: int
    width: int
    heads: int
    vocab: int
    positions: int
    seq: int
    batches: Tuple[int, int]
    sweep_positions: int
    prompt: int
    new_tokens: int
    rounds: int
    sweep_rounds: int
    ro_calls: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def chunk(self) -> int:
        """Cells per sweep forward: the large batch, so the sweep's batched shape is the bench's."""
        return self.batches[-1]


FULL = Sizes(12, 768, 12, 50257, 1024, 128, (1, 32), 16, 32, 16, 15, 3, 8)
TINY = Sizes(2, 64, 4, 256, 32, 16, (1, 4), 8, 8, 4, 3, 2, 4)


def log(message: str) -> None:
    """Progress goes to stderr: stdout carries only the JSON object."""
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- cases: the same patch as a patch map and as hooks on the eager model ---------------------

Hook = Tuple[str, str, Callable]  # ("forward" | "pre", module path, hook)


@dataclass
class Case:
    """One patch map and the hand-written hooks that do the same to the eager model."""

    patch_map: Dict[str, Any]
    hooks: List[Hook]


@dataclass(frozen=True)
class AttentionOps:
    """Names (inside ``transformer.h_<i>.attn``) of the per-head queries and the per-head output
    ``[B, H, T, d]``; found by value (``find_attention_ops``), not assumed."""

    query: str
    heads: str


def _edit(index: Any, value: Any, add: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        if add:
            tensor[index] += value
        else:
            tensor[index] = value
        return tensor

    return fn


def on_output(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """Forward hook applying ``fn`` to a module's result (the first item of a tuple result)."""
    return lambda module, args, output: _replace(output, fn(_hidden(output)))


def on_input(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """Forward pre-hook applying ``fn`` to a module's first argument."""
    return lambda module, args: (fn(args[0]),) + tuple(args[1:])


def head_columns(head: int, head_dim: int) -> Tuple[Any, slice]:
    """Head ``head``'s columns of ``c_attn``'s query part and of ``c_proj``'s input."""
    return (Ellipsis, slice(head * head_dim, (head + 1) * head_dim))


def zero_case(s: Sizes, ops: AttentionOps) -> Case:
    """Zero a block output at some positions, and one head of an attention output."""
    block, layer, head = s.layers // 3, s.layers - 1, 1 % s.heads
    positions = slice(s.seq // 4, s.seq // 2)
    return Case(
        {
            f"transformer.h_{block}.output": ZeroPatch(slice=(slice(None), positions)),
            f"transformer.h_{layer}.attn.{ops.heads}": ZeroPatch(slice=(slice(None), head)),
        },
        [
            ("forward", f"transformer.h.{block}", on_output(_edit((slice(None), positions), 0.0))),
            ("pre", f"transformer.h.{layer}.attn.c_proj", on_input(_edit(head_columns(head, s.head_dim), 0.0))),
        ],
    )


def add_case(s: Sizes, ops: AttentionOps, delta: torch.Tensor, query: torch.Tensor) -> Case:
    """Add to an MLP output, and to one head's queries (inside attention, upstream of the softmax)."""
    layer, head = s.layers // 2, 1 % s.heads
    return Case(
        {
            f"transformer.h_{layer}.mlp.output": AddPatch(value=delta),
            f"transformer.h_{layer}.attn.{ops.query}": AddPatch(value=query, slice=(slice(None), head)),
        },
        [
            ("forward", f"transformer.h.{layer}.mlp", on_output(lambda t: t + delta)),
            ("forward", f"transformer.h.{layer}.attn.c_attn", on_output(_edit(head_columns(head, s.head_dim), query, add=True))),
        ],
    )


def replace_case(s: Sizes, ops: AttentionOps, row: torch.Tensor, head_row: torch.Tensor) -> Case:
    """Replace an attention output at one position, and one head's output at the last position."""
    layer, head_layer, head, position = 0, (2 * s.layers) // 3, s.heads - 1, s.seq // 2
    columns = (slice(None), -1, slice(head * s.head_dim, (head + 1) * s.head_dim))
    return Case(
        {
            f"transformer.h_{layer}.attn.output|sub_0": ReplacePatch(value=row, slice=(slice(None), position)),
            f"transformer.h_{head_layer}.attn.{ops.heads}": ReplacePatch(value=head_row, slice=(slice(None), head, -1)),
        },
        [
            ("forward", f"transformer.h.{layer}.attn", on_output(_edit((slice(None), position), row))),
            ("pre", f"transformer.h.{head_layer}.attn.c_proj", on_input(_edit(columns, head_row))),
        ],
    )


def submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


@contextlib.contextmanager
def hooked(model: torch.nn.Module, hooks: Sequence[Hook]) -> Iterator[torch.nn.Module]:
    """Registers the hooks for the block only (hooks left on a compiled model would recompile it)."""
    handles = []
    try:
        for kind, path, hook in hooks:
            module = submodule(model, path)
            register = module.register_forward_hook if kind == "forward" else module.register_forward_pre_hook
            handles.append(register(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()


# -- comparisons -------------------------------------------------------------------------------

def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def tolerance(dtype: torch.dtype, floor: float) -> float:
    return max(ATOL[dtype], NOISE_FACTOR * floor)


def logits(output: Any) -> torch.Tensor:
    """A detached float copy: CUDA-graph outputs are overwritten by the next replay."""
    return output.logits.detach().float().clone()


def float_answer_metric(answer: int) -> Callable[[Any], torch.Tensor]:
    """Log-probability of ``answer`` at the last position, in float32: a bfloat16 log-softmax
    near -11 has a resolution of 0.06 and would hide the differences the check measures."""
    return lambda output: output.logits[:, -1].float().log_softmax(-1)[:, answer]


# -- per-dtype state -----------------------------------------------------------------------------

@dataclass
class Context:
    """What the sections of one dtype share: models, inputs, cases, compiled wrappers, figures."""

    sizes: Sizes
    device: str
    dtype: torch.dtype
    model: torch.nn.Module
    reference: torch.nn.Module
    ids: Dict[int, torch.Tensor]
    cases: Dict[str, Case]
    value_maps: List[Case]
    compiled: Dict[str, Any] = field(default_factory=dict)
    compile_seconds: Dict[str, float] = field(default_factory=dict)
    floor: float = 0.0

    def values(self, seed: int, *shape: int) -> torch.Tensor:
        """Seeded on the CPU generator, so every device and dtype patches with the same numbers."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=generator).to(self.device, self.dtype)

    def wrapper(self, key: str, **options: Any) -> Any:
        """One torch.compile wrapper per key, all over the same module (parameters shared)."""
        if key not in self.compiled:
            self.compiled[key] = torch.compile(self.model, dynamic=False, **options)
        return self.compiled[key]

    def first_call(self, label: str, fn: Callable[[], Any]) -> None:
        """Runs ``fn`` and records its seconds the first time ``label`` is seen (the compile)."""
        if label not in self.compile_seconds:
            self.compile_seconds[label] = first_call_seconds(fn, self.device)
            log(f"  {self.dtype} {label}: {self.compile_seconds[label]:.1f} s")


def build_context(s: Sizes, device: str, dtype: torch.dtype, attn: str) -> Context:
    model = gpt2(s.layers, s.width, s.heads, s.vocab, s.positions, device).to(dtype)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    reference = copy.deepcopy(model)  # hooks go here, never on the compiled module
    generator = torch.Generator().manual_seed(2)
    ids = {batch: torch.randint(0, s.vocab, (batch, s.seq), generator=generator).to(device) for batch in s.batches}
    ctx = Context(s, device, dtype, model, reference, ids, {}, [])
    eager_backend = ctx.wrapper("graphpatch_eager", backend="graphpatch_eager")
    eager_backend(ids[s.batches[0]])  # captures (no Inductor): names exist from here on
    ops = find_attention_ops(ctx, eager_backend)
    d = s.head_dim
    ctx.cases = {
        "ZeroPatch": zero_case(s, ops),
        "AddPatch": add_case(s, ops, ctx.values(10, s.width), ctx.values(11, d)),
        "ReplacePatch": replace_case(s, ops, ctx.values(12, s.width), ctx.values(13, d)),
    }
    # New values every call, the same structure as the AddPatch case: one compiled variant.
    ctx.value_maps = [add_case(s, ops, ctx.values(100 + k, s.width), ctx.values(200 + k, d)) for k in range(8)]
    return ctx


def find_attention_ops(ctx: Context, eager_backend: Any) -> AttentionOps:
    """Probes every op of layer 0's attention (graphpatch_eager: no compile) and picks the ones
    equal to the queries and the per-head output that the hooks edit. By value, because names
    depend on the attention implementation and on transformers' code order (5.x transposes the
    keys and values before the queries)."""
    s, ids = ctx.sizes, ctx.ids[ctx.sizes.batches[0]]
    seen: Dict[str, torch.Tensor] = {}

    def keep(key: str) -> Callable:
        return lambda module, args, output=None: seen.__setitem__(key, (args[0] if output is None else output).detach())

    hooks = [("forward", "transformer.h.0.attn.c_attn", keep("qkv")), ("pre", "transformer.h.0.attn.c_proj", keep("x"))]
    with hooked(ctx.reference, hooks):
        ctx.reference(ids)
    per_head = lambda t: t.reshape(*t.shape[:2], s.heads, s.head_dim).transpose(1, 2)  # noqa: E731
    wanted = {"query": per_head(seen["qkv"][..., : s.width]), "heads": per_head(seen["x"])}
    scope = "transformer.h_0.attn."
    names = [n for n in pb.nodes(eager_backend, scope + "*") if not n.endswith((".output", ".hidden_states"))]
    probes = {name: pb.ProbePatch() for name in names}
    with pb.patch(eager_backend, {name: [probe] for name, probe in probes.items()}):
        eager_backend(ids)
    found = {}
    for role, value in wanted.items():
        matches = [n for n, p in probes.items() if _same(p.activation, value)]
        if not matches:
            raise LookupError(f"no node in {scope}* holds the attention {role} {tuple(value.shape)}")
        found[role] = matches[0][len(scope):]
    return AttentionOps(**found)


def _same(activation: Any, value: torch.Tensor) -> bool:
    return (
        isinstance(activation, torch.Tensor) and activation.shape == value.shape
        and bool(torch.allclose(activation.float(), value.float(), rtol=1e-3, atol=1e-4))
    )


def patched_call(compiled: Any, case: Case, ids: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with pb.patch(compiled, case.patch_map):
            return compiled(ids)

    return run


def hooked_call(ctx: Context, case: Case, ids: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with hooked(ctx.reference, case.hooks):
            return ctx.reference(ids)

    return run


def cycling(calls: Sequence[Callable[[], Any]]) -> Callable[[], Any]:
    """One call after the other, round robin: a new patch value every call."""
    counter = iter(range(10**9))
    return lambda: calls[next(counter) % len(calls)]()


# -- sections ----------------------------------------------------------------------------------

Entry = Dict[str, Any]


def section_forward(ctx: Context, entry: Entry) -> None:
    """Patched forward at batch 1: compiled vs graphpatch_eager vs hooks, per patch kind."""
    ids = ctx.ids[ctx.sizes.batches[0]]
    inductor = ctx.wrapper("inductor", backend="inductor")
    ctx.first_call("inductor plain, batch 1 (trace + compile)", lambda: inductor(ids))
    plain_eager = logits(ctx.reference(ids))
    ctx.floor = max_abs(logits(inductor(ids)), plain_eager)
    entry["figures"]["unpatched Inductor vs eager, max abs (noise floor)"] = ctx.floor
    for kind, case in ctx.cases.items():
        name = f"{kind} (module output + attention op)"
        try:  # one kind failing to compile must not hide the others' results
            entry["checks"][name] = check_case(ctx, kind, case, ids, plain_eager)
        except Exception as exc:
            entry["checks"][name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc(file=sys.stderr)


def check_case(ctx: Context, kind: str, case: Case, ids: torch.Tensor, plain_eager: torch.Tensor) -> Dict[str, Any]:
    """The case's logits three ways; also that the patch changed them (a no-op would pass)."""
    compiled = ctx.wrapper("graphpatch", backend="graphpatch")
    run = patched_call(compiled, case, ids)
    ctx.first_call(f"graphpatch first patched call ({kind}), batch 1 (trace + compile)", run)
    outputs = {
        "compiled": logits(run()),
        "graphpatch_eager": logits(patched_call(ctx.wrapper("graphpatch_eager", backend="graphpatch_eager"), case, ids)()),
        "hooks": logits(hooked_call(ctx, case, ids)()),
    }
    errors = {
        "compiled vs hooks": max_abs(outputs["compiled"], outputs["hooks"]),
        "graphpatch_eager vs hooks": max_abs(outputs["graphpatch_eager"], outputs["hooks"]),
        "compiled vs graphpatch_eager": max_abs(outputs["compiled"], outputs["graphpatch_eager"]),
    }
    effect, worst, tol = max_abs(outputs["hooks"], plain_eager), max(errors.values()), tolerance(ctx.dtype, ctx.floor)
    return {
        "passed": worst <= tol and effect > tol,
        "max_abs_err": worst,
        "tolerance": tol,
        "errors": errors,
        "patch_effect": effect,
        "sites": sorted(case.patch_map),
    }


def section_reduce_overhead(ctx: Context, entry: Entry) -> None:
    """CUDA graphs with a new patch value every call: right results, one variant, no re-record."""
    if not ctx.device.startswith("cuda"):
        entry["skipped"] = "mode='reduce-overhead' needs CUDA (CUDA graphs are a no-op on CPU)"
        return
    from torch._dynamo.utils import counters

    ids = ctx.ids[ctx.sizes.batches[0]]
    compiled = ctx.wrapper("graphpatch reduce-overhead", backend="graphpatch", mode="reduce-overhead")
    before = pb.stats(ctx.model).variants_compiled
    skips_before = sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",))
    tol = tolerance(ctx.dtype, ctx.floor)
    errors = []
    for k in range(ctx.sizes.ro_calls):
        case = ctx.value_maps[k % len(ctx.value_maps)]
        run = patched_call(compiled, case, ids)
        if k == 0:
            ctx.first_call("graphpatch reduce-overhead first patched call, batch 1", run)
        got = logits(run())
        errors.append(max_abs(got, logits(hooked_call(ctx, case, ids)())))
    variants = pb.stats(ctx.model).variants_compiled - before
    entry["checks"]["reduce-overhead, new values every call"] = {
        "passed": max(errors) <= tol and variants == 1,
        "max_abs_err": max(errors),
        "tolerance": tol,
        "calls": len(errors),
        "variants_compiled": variants,
    }
    entry["figures"]["cudagraph skips"] = sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",)) - skips_before


def section_bench(ctx: Context, entry: Entry) -> None:
    """Per-forward milliseconds, interleaved medians, at each batch; compile seconds."""
    failures = []
    for batch in ctx.sizes.batches:
        try:  # the other batch's figures survive one batch's failure
            rows = bench_batch(ctx, batch)
        except Exception as exc:
            failures.append(f"batch {batch}: {type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
            continue
        entry["figures"][f"ms per forward, batch {batch}"] = {name: value * 1e3 for name, value in rows.items()}
        entry["figures"][f"ratios, batch {batch}"] = bench_ratios(rows)
    entry["figures"]["compile seconds"] = dict(ctx.compile_seconds)
    entry["figures"]["graphpatch compile seconds, all variants (pb.stats)"] = pb.stats(ctx.model).compile_seconds
    if failures:
        raise RuntimeError("; ".join(failures))


def bench_batch(ctx: Context, batch: int) -> Dict[str, float]:
    ids = ctx.ids[batch]
    inductor = ctx.wrapper("inductor", backend="inductor")
    compiled = ctx.wrapper("graphpatch", backend="graphpatch")
    case = ctx.cases["AddPatch"]
    ctx.first_call(f"inductor plain, batch {batch} (trace + compile)", lambda: inductor(ids))
    ctx.first_call(f"graphpatch first patched call (AddPatch), batch {batch} (trace + compile)",
                   patched_call(compiled, case, ids))
    calls: Dict[str, Callable[[], Any]] = {
        "eager": lambda: ctx.reference(ids),
        "eager + hooks": hooked_call(ctx, case, ids),
        "inductor": lambda: inductor(ids),
        "graphpatch patched": patched_call(compiled, case, ids),
        "graphpatch patched, new values each call": cycling([patched_call(compiled, c, ids) for c in ctx.value_maps]),
    }
    graphs = ctx.compiled.get("graphpatch reduce-overhead")
    if graphs is not None and batch == ctx.sizes.batches[0]:
        calls["graphpatch patched reduce-overhead, new values each call"] = cycling(
            [patched_call(graphs, c, ids) for c in ctx.value_maps]
        )
    return interleaved(calls, ctx.device, ctx.sizes.rounds)


def bench_ratios(rows: Dict[str, float]) -> Dict[str, float]:
    ratios = {
        "patched compiled / unpatched Inductor": rows["graphpatch patched"] / rows["inductor"],
        "patched compiled, new values each call / unpatched Inductor":
            rows["graphpatch patched, new values each call"] / rows["inductor"],
        "eager + hooks / patched compiled (speed-up)": rows["eager + hooks"] / rows["graphpatch patched"],
    }
    graphs = rows.get("graphpatch patched reduce-overhead, new values each call")
    if graphs is not None:
        ratios["patched reduce-overhead / unpatched Inductor"] = graphs / rows["inductor"]
    return ratios


def section_sweep(ctx: Context, entry: Entry) -> None:
    """pb.sweep over layers x positions against the eager per-cell hook loop and hand-batched hooks."""
    s = ctx.sizes
    release(ctx)  # a fresh torch.compile: the first pb.sweep call includes capture and compile
    clean, corrupt = clean_and_corrupt(s.vocab, s.seq, device=ctx.device)
    with torch.no_grad():
        answer = int(ctx.reference(clean).logits[0, -1].argmax())
    metric = float_answer_metric(answer)
    states = clean_block_outputs(ctx.reference, clean)
    grid = [(layer, position) for layer in range(s.layers) for position in range(s.sweep_positions)]
    cells = sweep_cells(states, grid)
    swept = ctx.wrapper("graphpatch (sweep)", backend="graphpatch")
    before = pb.stats(ctx.model).variants_compiled

    def run() -> torch.Tensor:
        return pb.sweep(swept, (corrupt,), cells, metric, batch_size=s.chunk, progress=False)

    first, rows = seconds(run, ctx.device)
    variants = pb.stats(ctx.model).variants_compiled - before
    report = last_sweep_report()
    cuts = sorted({str(cut) for cut in report.cuts}) if report is not None else []
    loop = hook_loop(ctx.reference, corrupt, states, grid, metric)
    batched = hand_batched_hooks(ctx.reference, corrupt, states, grid, metric, s.chunk)
    tol = tolerance(ctx.dtype, ctx.floor)
    err = max_abs(rows.reshape(loop.shape), loop)
    entry["checks"]["pb.sweep rows vs per-cell hook loop"] = {
        "passed": err <= tol, "max_abs_err": err, "tolerance": tol, "cells": len(cells),
        "hand-batched hooks vs hook loop, max abs": max_abs(batched.reshape(loop.shape), loop),
    }
    steady = interleaved(
        {
            "eager hook loop": lambda: hook_loop(ctx.reference, corrupt, states, grid, metric),
            "hand-batched eager hooks": lambda: hand_batched_hooks(ctx.reference, corrupt, states, grid, metric, s.chunk),
            "pb.sweep": run,
        },
        ctx.device,
        s.sweep_rounds,
    )
    entry["figures"] = {
        "cells": len(cells),
        "sweep": f"{s.layers} layers x {s.sweep_positions} positions, {s.seq} tokens, chunk {s.chunk}",
        "seconds, steady state": steady,
        "pb.sweep first call seconds (fresh torch.compile: capture + compile)": first,
        "ratios": {
            "pb.sweep vs eager hook loop (excluding compile)": steady["eager hook loop"] / steady["pb.sweep"],
            "pb.sweep vs eager hook loop (including compile)": steady["eager hook loop"] / first,
            "pb.sweep vs hand-batched eager hooks (excluding compile)":
                steady["hand-batched eager hooks"] / steady["pb.sweep"],
        },
        "sweep variants compiled": variants,
        # One compiled program per fan-out point (prefix reuse); "None": a full-repeat program.
        "sweep fan-out cuts": cuts,
    }


def section_generate(ctx: Context, entry: Entry) -> None:
    """Patched generate (static cache, transformers' compile path) vs eager generate with hooks."""
    from transformers import CompileConfig

    s = ctx.sizes
    model = copy.deepcopy(ctx.reference)
    config = CompileConfig(backend="graphpatch", fullgraph=True)
    config._compile_all_devices = True  # transformers compiles generate on CPU only when asked
    model.generation_config.compile_config = config
    model.forward = torch.compile(model.forward, backend="graphpatch")  # the prefill is patched too
    ids = torch.randint(1, s.vocab, (1, s.prompt), generator=torch.Generator().manual_seed(3)).to(ctx.device)
    options = dict(
        max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens, do_sample=False, cache_implementation="static",
        use_cache=True, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
    )
    tol = tolerance(ctx.dtype, ctx.floor)
    first = generate_case(ctx, model, ids, options, token=7, seed=20)
    variants = pb.stats(model).variants_compiled
    again = generate_case(ctx, model, ids, options, token=11, seed=21)
    entry["checks"]["patched generate vs eager generate with hooks"] = {
        "passed": first["max_abs_err"] <= tol and first["forced"] and again["max_abs_err"] <= tol and again["forced"],
        "max_abs_err": max(first["max_abs_err"], again["max_abs_err"]),
        "tolerance": tol,
        "patched tokens forced at every step": first["forced"] and again["forced"],
    }
    entry["checks"]["generate: new values compile nothing"] = {
        "passed": pb.stats(model).variants_compiled == variants,
        "variants_compiled_first": variants,
        "variants_compiled_after_second": pb.stats(model).variants_compiled,
        "graphs": pb.stats(model).graphs,
    }
    entry["figures"] = {
        "first patched generate seconds (capture + compile)": first["seconds"],
        "second patched generate seconds": again["seconds"],
        "compile_config": {"backend": config.backend, "mode": config.mode, "fullgraph": config.fullgraph},
        "prompt, new tokens": [s.prompt, s.new_tokens],
    }


def generate_case(ctx: Context, model: Any, ids: torch.Tensor, options: Dict[str, Any], token: int, seed: int) -> Dict[str, Any]:
    """Steers an MLP and forces ``token`` with a huge logit: the tokens are then the same in
    both runs by construction, so every step's logits (other than the forced one) compare."""
    layer = ctx.sizes.layers // 2
    delta = ctx.values(seed, ctx.sizes.width)
    bias = torch.zeros(ctx.sizes.vocab, device=ctx.device, dtype=ctx.dtype)
    bias[token] = 1e4
    patch_map = {f"transformer.h_{layer}.mlp.output": AddPatch(value=delta), "lm_head.output": AddPatch(value=bias)}
    hooks = [
        ("forward", f"transformer.h.{layer}.mlp", on_output(lambda t: t + delta)),
        ("forward", "lm_head", on_output(lambda t: t + bias)),
    ]
    start = time.perf_counter()
    with pb.patch(model, patch_map):
        got = model.generate(ids, **options)
    sync(ctx.device)
    elapsed = time.perf_counter() - start
    with hooked(ctx.reference, hooks):
        # disable_compile: on CUDA a static cache would otherwise make transformers compile the reference.
        want = ctx.reference.generate(ids, **options, disable_compile=True)
    keep = torch.ones(ctx.sizes.vocab, dtype=torch.bool, device=ctx.device)
    keep[token] = False
    got_logits, want_logits = torch.stack(got.logits)[..., keep], torch.stack(want.logits)[..., keep]
    forced = bool((got.sequences[:, ids.shape[1]:] == token).all()) and bool(torch.equal(got.sequences, want.sequences))
    return {"max_abs_err": max_abs(got_logits, want_logits), "forced": forced, "seconds": elapsed}


SECTION_FUNCTIONS: Dict[str, Callable[[Context, Entry], None]] = {
    "forward": section_forward,
    "reduce_overhead": section_reduce_overhead,
    "bench": section_bench,
    "sweep": section_sweep,
    "generate": section_generate,
}


# -- driver -------------------------------------------------------------------------------------

def release(ctx: Optional[Context]) -> None:
    """Drops compiled wrappers and Dynamo's caches, so later sections start from fresh compiles."""
    if ctx is not None:
        ctx.compiled.clear()
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_section(name: str, ctx: Context) -> Entry:
    entry: Entry = {"checks": {}, "figures": {}, "error": None}
    log(f"{ctx.dtype} {name} ...")
    start = time.perf_counter()
    try:
        SECTION_FUNCTIONS[name](ctx, entry)
    except Exception as exc:  # recorded, and the other sections still run
        entry["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    entry["seconds"] = time.perf_counter() - start
    failed = [check for check, value in entry["checks"].items() if not value.get("passed")]
    log(f"{ctx.dtype} {name}: {entry['seconds']:.1f} s" + (f", FAILED {failed}" if failed else "")
        + (f", ERROR {entry['error']}" if entry["error"] else ""))
    return entry


def run_dtype(sizes: Sizes, device: str, dtype: torch.dtype, attn: str, sections: Sequence[str]) -> Dict[str, Entry]:
    results: Dict[str, Entry] = {}
    ctx: Optional[Context] = None
    try:
        ctx = build_context(sizes, device, dtype, attn)
        for name in sections:
            results[name] = run_section(name, ctx)
    except Exception as exc:
        results["setup"] = {"checks": {}, "figures": {}, "error": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc(file=sys.stderr)
    finally:
        release(ctx)
        del ctx
    return results


def configure(options: argparse.Namespace) -> Dict[str, Any]:
    """Process-wide settings; what they were goes into the JSON."""
    notes: Dict[str, Any] = {}
    if options.threads:
        torch.set_num_threads(options.threads)  # before any compile: Inductor sizes kernels by it
    if options.keep_cache:
        # The smoke test: a rerun takes its compiled graphs from Inductor's caches and stays short.
        notes["inductor_caches"] = "kept, FX graph cache on: compile seconds may be cache hits"
    else:
        # Compile seconds must not come from an earlier run's on-disk caches (as the bench scripts).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpu_check_inductor_")
        torch._inductor.config.fx_graph_cache = False
        notes["inductor_caches"] = f"fresh, FX graph cache off: {os.environ['TORCHINDUCTOR_CACHE_DIR']}"
    torch._dynamo.config.recompile_limit = 64  # one frame, many backends and shapes: never fall back
    torch.set_grad_enabled(False)
    return notes


def ensure_backends() -> str:
    """The backends come from the package's entry point; a bare checkout (a GPU box where the
    package was never pip-installed) registers them here instead, so the check still runs."""
    from torch._dynamo.backends.registry import list_backends, register_backend

    known = list_backends(exclude_tags=())
    missing = [name for name in ("graphpatch", "graphpatch_eager") if name not in known]
    for name in missing:
        register_backend(compiler_fn=getattr(pb, name), name=name)
    return f"registered by this script: {missing}" if missing else "entry point"


def warm_up(device: str) -> None:
    """The first compile of a process pays one-time imports that belong to no contender."""
    warm = torch.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).to(device))
    warm(torch.randn(2, 8, device=device))
    sync(device)


def cache_counters() -> Dict[str, int]:
    """Inductor's FX graph cache hits/misses: say whether compile seconds were cold."""
    from torch._dynamo.utils import counters

    return {key: value for key, value in counters["inductor"].items() if "cache" in key}


def collect(results: Dict[str, Dict[str, Entry]]) -> Tuple[List[str], List[str]]:
    """Failed checks and section errors, as ``dtype/section/check`` strings."""
    failed, errors = [], []
    for dtype, sections in results.items():
        for section, entry in sections.items():
            if entry.get("error"):
                errors.append(f"{dtype}/{section}: {entry['error']}")
            for check, value in entry.get("checks", {}).items():
                if not value.get("passed"):
                    failed.append(f"{dtype}/{section}/{check}")
    return failed, errors


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None, help="comma-separated (default float32,bfloat16; float32 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="2 layers, width 64, tiny batches: a CPU smoke test")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attn_implementation")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--seq", type=int, default=None, help="tokens per forward (default 128; 16 with --tiny)")
    parser.add_argument("--batch", type=int, default=None, help="the large batch and sweep chunk (default 32; 4 with --tiny)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds per forward")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="torch CPU threads (0: leave as is; 1 with --tiny on CPU, where spinning OpenMP threads "
        "on a shared machine stall tiny kernels)",
    )
    parser.add_argument(
        "--keep-cache", action="store_true",
        help="use Inductor's usual on-disk caches, FX graph cache included (default with --tiny; compile seconds "
        "are then not cold)",
    )
    parser.add_argument("--json", default=None, help="also write the JSON object here")
    options = parser.parse_args(argv)
    options.keep_cache = options.keep_cache or options.tiny  # the smoke test runs warm to stay short
    if options.tiny and options.device == "cpu" and not options.threads:
        options.threads = 1
    return options


def sizes_for(options: argparse.Namespace) -> Sizes:
    sizes = TINY if options.tiny else FULL
    if options.seq:
        sizes = replace(sizes, seq=options.seq)
    if options.batch:
        sizes = replace(sizes, batches=(sizes.batches[0], options.batch))
    if options.rounds:
        sizes = replace(sizes, rounds=options.rounds)
    return sizes


def main(argv: Optional[Sequence[str]] = None) -> int:
    start = time.perf_counter()
    options = parse_args(argv)
    sizes = sizes_for(options)
    dtype_names = (options.dtypes or ("float32" if options.tiny else "float32,bfloat16")).split(",")
    sections = [name for name in options.sections.split(",") if name]
    result: Dict[str, Any] = {
        "ok": False,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": options.device,
        "dtypes": dtype_names,
        "tiny": options.tiny,
        "attn_implementation": options.attn,
        "sizes": asdict(sizes),
        "results": {},
    }
    try:
        import transformers

        result["transformers"] = transformers.__version__
        unknown = [n for n in dtype_names if n not in DTYPES] + [n for n in sections if n not in SECTION_FUNCTIONS]
        if unknown:
            raise ValueError(f"unknown dtypes or sections: {unknown}")
        result.update(configure(options))
        result["backends"] = ensure_backends()
        result["device_name"] = device_name(options.device)
        result["threads"] = torch.get_num_threads()
        result["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        log(f"{result['device_name']}, torch {torch.__version__}, {result['threads']} threads, dtypes {dtype_names}")
        warm_up(options.device)
        for name in dtype_names:
            result["results"][name] = run_dtype(sizes, options.device, DTYPES[name], options.attn, sections)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    result["inductor_cache_counters"] = cache_counters()
    failed, errors = collect(result["results"])
    result["failed_checks"], result["errors"] = failed, errors
    result["ok"] = not failed and not errors and "error" not in result and bool(result["results"])
    result["wall_seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=2))
    if options.json:
        write_json(options.json, result)
    log(f"{'ok' if result['ok'] else 'NOT ok'} in {result['wall_seconds']:.1f} s")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
