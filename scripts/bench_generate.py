"""Patched generation: compiled (graphpatch) ``generate`` vs eager ``generate`` with a forward hook.

    python scripts/bench_generate.py [--model gpt2|llama --layers 4 --width 256 --prompt 32
                                      --new-tokens 32 --batch 1 --repeats 5 --device cpu]
                                     [--json out/bench_generate.json]

Every row generates ``--new-tokens`` tokens greedily from the same prompt with the same patch (an
AddPatch on a middle layer's MLP output, at every step) or, for the eager rows, the same
surgery done by a forward hook. Rows: eager, eager + hook, graphpatch unpatched / patched with
transformers' default DynamicCache (``model.forward`` compiled), graphpatch patched with a static
cache through transformers' own compile path (``CompileConfig(backend="graphpatch")``). Tokens/s
are medians of interleaved runs after warm-up (compiles excluded, reported apart); ratios are
what to compare: they are measured in this process on this machine. ``--threads 1`` (default)
keeps CPU figures stable on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable, Dict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import patch_backend as pb  # noqa: E402
from bench_util import device_name, sync, write_json  # noqa: E402
from patch_backend import AddPatch  # noqa: E402

VOCAB = 1024


def build(kind: str, layers: int, width: int, heads: int, positions: int, device: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=layers, n_embd=width, n_head=heads, vocab_size=VOCAB, n_positions=positions,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        model, site, module = GPT2LMHeadModel(config), "transformer.h_{}.mlp.output", "transformer.h.{}.mlp"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width, num_attention_heads=heads,
            num_key_value_heads=max(heads // 2, 1), vocab_size=VOCAB, max_position_embeddings=positions,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        model, site, module = LlamaForCausalLM(config), "model.layers_{}.mlp.output", "model.layers.{}.mlp"
    layer = layers // 2
    return model.eval().to(device), site.format(layer), module.format(layer)


def submodule(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root



def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads (default 1: OpenMP kernels on a loaded machine stall on spinning threads)",
    )
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    options = parser.parse_args()

    from transformers import CompileConfig

    device = options.device
    torch.set_grad_enabled(False)
    if options.threads:
        torch.set_num_threads(options.threads)  # before any compile: Inductor sizes its kernels by it
    # The first compile in a process pays one-time imports that belong to no contender.
    warmup = torch.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).to(device))
    warmup(torch.randn(2, 8, device=device))

    positions = options.prompt + options.new_tokens + 8
    model, site, module_path = build(options.model, options.layers, options.width, options.heads, positions, device)
    ids = torch.randint(1, VOCAB, (options.batch, options.prompt), device=device)
    delta = torch.randn(options.width, device=device) * 0.5
    steps = dict(max_new_tokens=options.new_tokens, min_new_tokens=options.new_tokens, do_sample=False)

    eager = model
    hooked = copy.deepcopy(model)
    submodule(hooked, module_path).register_forward_hook(lambda m, a, out: out + delta)

    dynamic = copy.deepcopy(model)
    dynamic.forward = torch.compile(dynamic.forward, backend="graphpatch")

    static = copy.deepcopy(model)
    compile_config = CompileConfig(backend="graphpatch", fullgraph=True)
    compile_config._compile_all_devices = True
    static.generation_config.compile_config = compile_config
    static.forward = torch.compile(static.forward, backend="graphpatch")  # patches the prefill too

    def patched(model_, **extra):
        def run():
            with pb.patch(model_, {site: AddPatch(value=delta)}):
                return model_.generate(ids, **steps, **extra)

        return run

    calls: Dict[str, Callable[[], object]] = {
        "eager": lambda: eager.generate(ids, **steps),
        "eager + hook": lambda: hooked.generate(ids, **steps),
        "graphpatch unpatched (dynamic cache)": lambda: dynamic.generate(ids, **steps),
        "graphpatch patched (dynamic cache)": patched(dynamic),
        "graphpatch patched (static cache, transformers compile)": patched(static, cache_implementation="static"),
    }
    # First calls: compiles (plain graphs, then the patched variants), timed apart.
    first_call = {name: timed(fn, device) for name, fn in calls.items()}
    # Longer runs and other values must not compile again (one variant per graph, not per step).
    variants_after_warmup = {"dynamic": pb.stats(dynamic).variants_compiled, "static": pb.stats(static).variants_compiled}

    reference = hooked.generate(ids, **steps)
    agree = {
        "dynamic cache": bool(torch.equal(patched(dynamic)(), reference)),
        "static cache": bool(torch.equal(patched(static, cache_implementation="static")(), reference)),
    }

    samples: Dict[str, list] = {name: [] for name in calls}
    for _ in range(options.repeats):
        for name, fn in calls.items():
            samples[name].append(timed(fn, device))
    tokens = options.batch * options.new_tokens
    tokens_per_second = {name: tokens / statistics.median(values) for name, values in samples.items()}

    hook = tokens_per_second["eager + hook"]
    ratios = {
        "compiled patched (dynamic cache) / eager + hook": tokens_per_second["graphpatch patched (dynamic cache)"] / hook,
        "compiled patched (static cache) / eager + hook":
            tokens_per_second["graphpatch patched (static cache, transformers compile)"] / hook,
        "compiled patched / unpatched (dynamic cache)": tokens_per_second["graphpatch patched (dynamic cache)"]
        / tokens_per_second["graphpatch unpatched (dynamic cache)"],
        "eager + hook / eager": hook / tokens_per_second["eager"],
    }
    result = {
        "config": vars(options) | {"torch": torch.__version__, "site": site, "device_name": device_name(device)},
        "tokens_per_second": tokens_per_second,
        "first_call_seconds": first_call,
        "ratios": ratios,
        "patched_tokens_equal_hooked": agree,
        "graphs": {"dynamic": pb.stats(dynamic).graphs, "static": pb.stats(static).graphs},
        "variants_compiled": {"dynamic": pb.stats(dynamic).variants_compiled, "static": pb.stats(static).variants_compiled},
        "variants_compiled_after_warmup": variants_after_warmup,
    }
    _print_table(result)
    if options.json:
        write_json(options.json, result)
    return result



def _print_table(result: Dict[str, object]) -> None:
    print(f"config: {result['config']}")
    print(f"{'generate':58s} {'tokens/s':>10s} {'first call s':>13s}")
    for name, rate in result["tokens_per_second"].items():
        print(f"{name:58s} {rate:10.1f} {result['first_call_seconds'][name]:13.2f}")
    for name, ratio in result["ratios"].items():
        print(f"{name:58s} {ratio:10.3f}")
    print(f"patched tokens equal the hooked eager model's: {result['patched_tokens_equal_hooked']}")
    print(f"graphs: {result['graphs']}  patched variants: {result['variants_compiled']}")


if __name__ == "__main__":
    main()
