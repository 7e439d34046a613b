"""Decode and prefill speed of memfit's runtime against transformers and llama.cpp, side by side in one run.

Rows: each memfit format through (a) transformers' eager forward with its dynamic cache (what
`memfit eval` measured before the runtime), (b) the runtime's eager step, (c) the runtime's
compiled step (CUDA graphs on CUDA), (d) the runtime's native step (one call of memfit's C library
per token; the default where it runs the format); and, when llama-cpp-python is installed, llama.cpp on GGUF
files of the same model (F32 written by memfit's exporter, the others quantized from it by
llama.cpp's own quantizer). Decode: batch 1, greedy, 64 tokens after a 32-token prompt. Prefill:
one 512-token prompt to its first token. Rounds are interleaved across every row; medians. Rates
are also given as ratios to the runtime's eager fp32 in the same run.

Roofline: decode reads every weight once per token (the demo's output head is its tied
embedding), so a row's bound is ``bandwidth / weight bytes``; the fraction is the measured rate
over that bound, with the bandwidth measured here as the rate of reading a buffer of the row's
weight bytes with every thread, in every round (`ReadProbe`). (The KV cache read, under 1% of the
weights at these lengths, is left out.)

    python benchmarks/runtime.py --model demo
    python benchmarks/runtime.py --model demo --formats int8 --llama-cpp Q8_0 --rounds 5
    python benchmarks/runtime.py --config path/to/config.json --device cuda --formats bf16 --llama-cpp ""

With ``--config`` the model is built from a Hugging Face config with random weights (speed does
not depend on the values; for machines the weights cannot reach).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import memfit
from memfit.evaluate import hf_decode_tokens_per_s
from memfit.export import export
from memfit.memory.report import weight_bytes
from memfit.runtime import Engine

PROMPT, NEW, PREFILL = 32, 64, 512
LLAMA_TYPES = ("F32", "F16", "Q8_0", "Q4_K_M", "Q4_0")


def build(args):
    if args.config:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(args.config)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return model.eval(), None
    model, tokenizer = memfit.load(args.model)
    return model.to(args.device).eval(), tokenizer


def variant(base, fmt: str, device: str):
    model = copy.deepcopy(base).cpu() if device != "cpu" else copy.deepcopy(base)
    if fmt != "fp32":
        memfit.apply(model, fmt)
    return model.to(device).eval()


class ReadProbe:
    """Bytes/s of reading a buffer of a given size with every thread, prefetching as memfit's kernels
    do: the bound for a decode step that reads that many bytes of weights once.

    Measured per size because the rate depends on it here (about 32 GB/s at 538 MB, 40-55 GB/s at
    86-135 MB, on this virtual machine), and in every round, the best of 3 reads, because it also
    drifts with the host's load over a run; a row's bound is the median of its size's rounds, as
    its rate is the median of its rounds. PyTorch's ``sum`` of a 1 GiB buffer reads at about
    19 GB/s here, so it would misstate the fractions of the small formats.
    """

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}
        self.rates: dict[int, list[float]] = {}

    def measure(self, nbytes: int) -> None:
        from memfit import native

        if nbytes not in self.buffers:
            self.buffers[nbytes] = torch.ones(max(nbytes, 1 << 20) // 256 * 64)  # float32, a multiple of 64 bytes
        buffer = self.buffers[nbytes]
        read = lambda: native.library().memfit_read(buffer.data_ptr(), buffer.nbytes)  # noqa: E731
        read()
        times = []
        for _ in range(3):
            began = time.perf_counter()
            read()
            times.append(time.perf_counter() - began)
        self.rates.setdefault(nbytes, []).append(buffer.nbytes / min(times))

    def bandwidth(self, nbytes: int) -> float:
        return statistics.median(self.rates[nbytes])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class MemfitRow:
    def __init__(self, model, fmt: str, device: str, step: str):
        self.model, self.device, self.fmt = model, device, fmt
        self.engine = Engine(model, compile=step == "compiled", native=step == "native")
        # its own cache, so neither shape reallocates the other's (the prefill is the same eager forward)
        self.long_engine = Engine(model, compile=False, native=False)
        self.weight_bytes = weight_bytes(model)

    def warm(self, prompt: list[int], long: list[int]) -> float:
        """Run each shape once (compiling the step); returns the first start's seconds."""
        began = time.perf_counter()
        for _ in self.engine.stream([prompt], 4):
            pass
        first = time.perf_counter() - began
        for _ in self.long_engine.stream([long], 1):
            pass
        return first

    def decode(self, prompt: list[int]) -> float:
        steps = self.engine.stream([prompt], NEW + 1)
        next(steps)  # the prefill's token
        _sync(self.device)
        began = time.perf_counter()
        count = sum(1 for _ in steps)
        _sync(self.device)
        return count / (time.perf_counter() - began)

    def prefill(self, long: list[int]) -> float:
        _sync(self.device)
        began = time.perf_counter()
        next(iter(self.long_engine.stream([long], 1)))
        _sync(self.device)
        return len(long) / (time.perf_counter() - began)


class LlamaRow:
    def __init__(self, path: Path):
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_ctx=1024, n_batch=PREFILL, n_ubatch=PREFILL, n_threads=torch.get_num_threads(),
                         n_threads_batch=torch.get_num_threads(), verbose=False)
        self.weight_bytes = gguf_tensor_bytes(path)

    def warm(self, prompt: list[int], long: list[int]) -> float:
        self.decode(prompt)
        self.prefill(long)
        return 0.0

    def decode(self, prompt: list[int]) -> float:
        import numpy as np

        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        began = time.perf_counter()
        for _ in range(NEW):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return NEW / (time.perf_counter() - began)

    def prefill(self, long: list[int]) -> float:
        self.llm.reset()
        began = time.perf_counter()
        self.llm.eval(long)
        return len(long) / (time.perf_counter() - began)


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of the tensors decode reads: all of them, less the input embedding when an output head exists."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    return sum(tensors.values()) - (tensors["token_embd.weight"] if "output.weight" in tensors else 0)


def gguf_files(model, tokenizer, types: list[str], directory: Path) -> dict[str, Path]:
    """GGUF files of ``model``: F32 from memfit's exporter, the other types from llama.cpp's quantizer."""
    import llama_cpp

    directory.mkdir(parents=True, exist_ok=True)
    f32 = directory / "model-F32.gguf"
    if not f32.exists():
        export(model, tokenizer, "gguf-f32", f32)
    files = {}
    for name in types:
        path = directory / f"model-{name}.gguf"
        if name != "F32" and not path.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
            params.nthread = torch.get_num_threads()
            if llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params) != 0:
                raise SystemExit(f"llama.cpp could not quantize {f32} to {name}")
        files[name] = f32 if name == "F32" else path
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--config", help="build from this HF config with random weights instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--formats", default="fp32,bf16,int8,int4-g128,w8a8")
    parser.add_argument("--llama-cpp", default=",".join(LLAMA_TYPES), metavar="TYPES",
                        help="GGUF types to run through llama.cpp ('' for none; needs llama-cpp-python)")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    parser.add_argument("--gguf-dir", type=Path, default=cache / "memfit" / "bench-gguf")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers eager column")
    parser.add_argument("--steps", default="eager,compiled,native",
                        help="memfit decode steps to run: eager, compiled (torch.compile), native (a C call per token)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base, tokenizer = build(args)
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (PROMPT,), generator=generator).tolist()
    long = torch.randint(0, vocab, (PREFILL,), generator=generator).tolist()
    probe = ReadProbe() if args.device == "cpu" else None

    rows: dict[str, dict] = {}
    runners: dict[str, object] = {}
    for fmt in filter(None, args.formats.split(",")):
        model = variant(base, fmt, args.device)
        for step in filter(None, args.steps.split(",")):
            row = MemfitRow(model, fmt, args.device, step)
            if step == "native" and row.engine.native_step is None:
                continue  # the native step does not run this format (or device): the compiled row stands for it
            runners[f"memfit {fmt} {step}"] = row
        if not args.no_transformers:
            runners[f"transformers {fmt}"] = model
    llama_types = [t for t in args.llama_cpp.split(",") if t]
    if llama_types and args.device == "cpu":
        files = gguf_files(base, tokenizer, llama_types, args.gguf_dir / (args.config or args.model).replace("/", "_"))
        for name, path in files.items():
            runners[f"llama.cpp {name}"] = LlamaRow(path)

    ids = torch.tensor(prompt, device=args.device)
    rates: dict[str, dict[str, list[float]]] = {name: {"decode": [], "prefill": []} for name in runners}
    for name, runner in runners.items():
        if not name.startswith("transformers"):
            rows[name] = {"first start s": runner.warm(prompt, long), "weight_bytes": runner.weight_bytes}
        print(f"warmed {name}", file=sys.stderr, flush=True)
    for round_ in range(args.rounds):
        if probe is not None:
            for size in sorted({runner.weight_bytes for runner in runners.values() if hasattr(runner, "weight_bytes")}):
                probe.measure(size)
        for name, runner in runners.items():
            if name.startswith("transformers"):
                rates[name]["decode"].append(hf_decode_tokens_per_s(runner, ids, NEW, repeats=1))
                continue
            rates[name]["decode"].append(runner.decode(prompt))
            rates[name]["prefill"].append(runner.prefill(long))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for name, r in rates.items():
        row = rows.setdefault(name, {})
        row["decode tokens/s"] = statistics.median(r["decode"])
        row["prefill tokens/s"] = statistics.median(r["prefill"]) if r["prefill"] else None
        if isinstance(runners[name], MemfitRow) and runners[name].engine.compiled is False and "compiled" in name:
            row["note"] = "compile failed: ran eagerly"
        if probe is not None and row.get("weight_bytes"):
            row["read GB/s"] = probe.bandwidth(row["weight_bytes"]) / 1e9
            row["roofline fraction"] = row["decode tokens/s"] * row["weight_bytes"] / (row["read GB/s"] * 1e9)

    reference = rows.get("memfit fp32 eager") or next(iter(rows.values()))
    print(f"{args.device}, {torch.get_num_threads()} threads; decode: batch 1, {NEW} tokens after {PROMPT}; "
          f"prefill: {PREFILL} tokens; {args.rounds} interleaved rounds, medians")
    print()
    print("| row | weight MB | decode tok/s | vs memfit fp32 eager | read GB/s | roofline | prefill tok/s "
          "| vs memfit fp32 eager |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        prefill = r["prefill tokens/s"]
        prefill_ratio = prefill / reference["prefill tokens/s"] if prefill else None
        roof = r.get("roofline fraction")
        read, roof_text = (f"{r['read GB/s']:.1f}", f"{roof:.0%}") if roof else ("-", "-")
        print(f"| {name} | {r.get('weight_bytes', 0) / 1e6:.0f} | {r['decode tokens/s']:.1f} | "
              f"{r['decode tokens/s'] / reference['decode tokens/s']:.2f}x | {read} | {roof_text} | "
              f"{f'{prefill:.0f}' if prefill else '-'} | {f'{prefill_ratio:.2f}x' if prefill else '-'} |"
              + (f" {r['note']}" if "note" in r else ""))
    if args.json:
        print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
