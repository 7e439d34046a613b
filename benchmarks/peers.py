"""Peer quantization libraries applied to a Hugging Face causal LM on CPU, and the bytes they hold.

Each entry of `PEER_CONFIGS` quantizes an fp32 model the way its library documents for CPU;
`evaluate_peer` then measures perplexity, held bytes, quantization time and prefill/decode speed
with memfit's own measurement functions, so the numbers compare with ``memfit eval``.

The peers are optional and benchmark-only (they are not memfit dependencies). Install them into
the project's environment with torch held at the pinned version:

    .venv/bin/python -m pip install -c constraints.txt torchao==0.18.0 optimum-quanto==0.2.7 hqq==0.2.8.post1

Run one configuration per process (each loads a fresh model), then render the table:

    .venv/bin/python benchmarks/peers.py --list
    .venv/bin/python benchmarks/peers.py --model demo --tokens 4096 --reference --jsonl peers.jsonl
    .venv/bin/python benchmarks/peers.py --model demo --tokens 4096 --config "hqq 4bit g64" --jsonl peers.jsonl
    .venv/bin/python benchmarks/peers.py --table peers.jsonl

On a small shared machine pass ``--threads 1``: with two contended cores every parallel op waits
milliseconds for a second thread, and small-op-bound decode steps then time the scheduler.

What each library quantizes by default differs, and so does what the bytes mean:
- torchao ``quantize_`` and quanto ``quantize`` take every ``nn.Linear``, lm_head included. On a
  model with tied embeddings this unties them: lm_head gets a quantized copy and the embedding
  keeps its float weight, so the model holds the embedding twice (once float, once quantized).
- hqq's ``AutoHQQHFModel.quantize_model`` skips lm_head (``_IGNORE_LINEAR``) and casts every other
  layer (embedding, norms, lm_head) to its compute dtype; the tie survives.
- torchao's int4 CPU path skips, with only a log line, any Linear whose in_features is not a
  multiple of the group size; `evaluate_peer` counts quantized Linears to expose that. Its kernel
  is fast only on bf16 activations, so the torchao int4 configs cast the model to bf16 first.
- quanto's qint4 weights fail under ``torch.inference_mode`` (which memfit's measurements use);
  the "(inference_mode off)" variant runs each quantized layer under ``no_grad`` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch import nn

from memfit.evaluate import decode_tokens_per_s, perplexity, prefill_tokens_per_s

Quantize = Callable[[nn.Module], "nn.Module | None"]

# The module each peer distribution installs (for `pytest.importorskip` and error hints).
LIBRARY_MODULES = {"torchao": "torchao", "optimum-quanto": "optimum.quanto", "hqq": "hqq"}

_ALL_LINEARS = ("every nn.Linear incl. lm_head; a tied lm_head is untied (the embedding keeps its float "
                "weight, lm_head gets a quantized copy)")


@dataclasses.dataclass(frozen=True)
class PeerConfig:
    """One peer library configuration.

    Args:
        library: the pip distribution that implements it (``torchao``, ``optimum-quanto``, ``hqq``).
        name: a short unique label, e.g. ``"torchao int4wo-g128"``.
        note: what gets quantized (lm_head, embedding) and how the data is stored.
        quantize: quantizes an fp32 model in place; may return a new model.
        probe: quantizes a toy Linear [64, 256] and runs it under ``torch.inference_mode``;
            raises when this library cannot run the config on CPU with this torch (missing
            kernel, CUDA-only path, inference-mode bug).
        min_sqnr_db: the logits' SQNR against fp32 that this config keeps on tiny-llama
            (measured, with margin; the test's floor).
    """

    library: str
    name: str
    note: str
    quantize: Quantize
    probe: Callable[[], None]
    min_sqnr_db: float

    def apply(self, model: nn.Module) -> nn.Module:
        """Quantize ``model`` (fp32) and return it, eval mode."""
        returned = self.quantize(model)
        return (model if returned is None else returned).eval()

    def available(self) -> bool:
        """Whether the library imports and this config runs on CPU with this torch."""
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        """Why `available` is False (the probe's error, one line), else None."""
        return _probe_error(self)


@functools.cache
def _probe_error(config: PeerConfig) -> str | None:
    try:
        config.probe()
    except ModuleNotFoundError as exc:
        return f"{_one_line(exc)} (install it: see benchmarks/peers.py's docstring)"
    except Exception as exc:  # noqa: BLE001  (the reason is the result)
        return _one_line(exc)
    return None


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


# ---- toy probe: a Linear wide enough for every group size ----------------------------------------

def _probe_model_quantize(quantize: Quantize) -> Callable[[], None]:
    """Probe for libraries that quantize any module tree (torchao, quanto)."""

    def probe() -> None:
        with torch.random.fork_rng():
            toy = nn.Sequential(nn.Linear(256, 64, bias=False))  # weight [64, 256]
            returned = quantize(toy)
            toy = toy if returned is None else returned
            _check_toy(toy, toy[0], toy[0].weight.dtype)

    return probe


def _check_toy(toy: nn.Module, layer: nn.Module, dtype: torch.dtype) -> None:
    # Runs under inference_mode, as memfit's perplexity and speed measurements do.
    if not _is_quantized(layer):
        raise RuntimeError("the library left a [64, 256] Linear unquantized")
    with torch.inference_mode():
        out = toy(torch.randn(2, 256, dtype=dtype))
    if out.shape != (2, 64) or not torch.isfinite(out).all():
        raise RuntimeError(f"toy forward gave shape {tuple(out.shape)} or non-finite values")


# ---- torchao ---------------------------------------------------------------------------------------

def _torchao(make_config: Callable[[], object], dtype: torch.dtype | None = None) -> Quantize:
    def quantize(model: nn.Module) -> nn.Module:
        from torchao.quantization import quantize_

        if dtype is not None:
            model.to(dtype)
        quantize_(model, make_config())  # default filter: every nn.Linear
        return model

    return quantize


def _ao_int8wo():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _ao_w8a8():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _ao_float8wo():
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig()


def _ao_int4wo_plain(group_size: int):
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=group_size)  # default PLAIN format: mslk (CUDA) kernels


def _ao_int4wo_cpu(group_size: int):
    # torchao 0.18 moved the CPU int4 layout (formerly Int4CPULayout / packing format "opaque")
    # to the prototype Int4OpaqueTensor: aten._weight_int4pack_mm_for_cpu.
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=group_size)


def _ao_da8w4(group_size: int):
    from torchao.prototype.quantization.int4 import Int8DynamicActivationInt4WeightConfig

    return Int8DynamicActivationInt4WeightConfig(group_size=group_size)


def _ao_intx4wo(group_size: int):
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def _ao(name: str, make_config: Callable[[], object], note: str, min_sqnr_db: float,
        dtype: torch.dtype | None = None) -> PeerConfig:
    quantize = _torchao(make_config, dtype)
    return PeerConfig("torchao", name, f"{_ALL_LINEARS}; {note}", quantize, _probe_model_quantize(quantize),
                      min_sqnr_db)


# ---- optimum-quanto --------------------------------------------------------------------------------

def _quanto(weights: str, use_grad_mode: bool) -> Quantize:
    def quantize(model: nn.Module) -> nn.Module:
        from optimum import quanto

        quanto.quantize(model, weights=getattr(quanto, weights))  # Linear (and Conv/LayerNorm) modules
        quanto.freeze(model)  # replace the float weights by the quantized ones
        if use_grad_mode:
            for module in model.modules():
                if isinstance(module, quanto.QModuleMixin):
                    module.forward = _outside_inference_mode(module.forward)
        return model

    return quantize


def _outside_inference_mode(forward: Callable) -> Callable:
    # quanto 0.2.7's WeightQBitsTensor fails under torch.inference_mode ("Cannot set
    # version_counter for inference tensor" in its transpose); it runs under no_grad.
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return forward(*args, **kwargs)

    return wrapped


def _qo(weights: str, note: str, min_sqnr_db: float, use_grad_mode: bool = False) -> PeerConfig:
    quantize = _quanto(weights, use_grad_mode)
    name = f"quanto {weights}" + (" (inference_mode off)" if use_grad_mode else "")
    if use_grad_mode:
        note += "; each QLinear runs with inference_mode off (no_grad), which quanto's qint4 needs"
    return PeerConfig("optimum-quanto", name, f"{_ALL_LINEARS}; {note}", quantize,
                      _probe_model_quantize(quantize), min_sqnr_db)


# ---- hqq -------------------------------------------------------------------------------------------

def _hqq(nbits: int, group_size: int, compute_dtype: torch.dtype) -> Quantize:
    def quantize(model: nn.Module) -> nn.Module:
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
        AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=compute_dtype, device="cpu")
        return model

    return quantize


def _hqq_probe(nbits: int, group_size: int, compute_dtype: torch.dtype) -> Callable[[], None]:
    def probe() -> None:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
        with torch.random.fork_rng():
            layer = HQQLinear(nn.Linear(256, 64, bias=False), config, compute_dtype=compute_dtype, device="cpu")
            _check_toy(layer, layer, compute_dtype)

    return probe


def _hq(nbits: int, group_size: int, min_sqnr_db: float, compute_dtype: torch.dtype = torch.float32) -> PeerConfig:
    dtype = str(compute_dtype).removeprefix("torch.")
    name = f"hqq {nbits}bit g{group_size}" + ("" if compute_dtype == torch.float32 else f" {dtype}")
    cast = "" if compute_dtype == torch.float32 else f", embedding/norms/lm_head cast to {dtype}"
    note = (f"every Linear but lm_head (hqq skips it; tie kept{cast}); W_q packed {nbits}-bit, scale and zero "
            f"{dtype} per {group_size} weights in hqq's meta dict (groups run over the flattened weight)")
    return PeerConfig("hqq", name, note, _hqq(nbits, group_size, compute_dtype),
                      _hqq_probe(nbits, group_size, compute_dtype), min_sqnr_db)


# SQNR floors: tiny-llama's measured logits SQNR (fp32 reference) less about 3 dB (8-bit) or 2 dB.
PEER_CONFIGS: list[PeerConfig] = [
    _ao("torchao int8wo", _ao_int8wo, "Int8Tensor: int8 per-row, fp32 scale, int8 zero point", 35),
    _ao("torchao int8-dyn-act-int8wo (w8a8)", _ao_w8a8, "Int8Tensor + per-token int8 activations", 33),
    _ao("torchao float8wo", _ao_float8wo, "Float8Tensor e4m3 per-row, fp32 scale", 25),
    # The CPU int4 kernel is vectorized for bf16 activations only: with fp32 ones a [512, 576] x
    # [576, 1536] matmul takes 2.4 s against 0.04 s dense, so these follow torchao's CPU example
    # and cast the model to bf16 first (embedding and norms included).
    *[_ao(f"torchao int4wo-g{g}", functools.partial(_ao_int4wo_cpu, g),
          "model cast to bf16 first (the kernel is ~60x slower than dense on fp32 activations); "
          "PrototypeInt4WeightOnlyConfig (Int4OpaqueTensor, CPU tinygemm), bf16 scale+zero per group; "
          f"Linears whose in_features % {g} != 0 stay unquantized", 14, torch.bfloat16) for g in (32, 64, 128)],
    _ao("torchao int4wo-g128 plain", functools.partial(_ao_int4wo_plain, 128),
        "Int4WeightOnlyConfig default PLAIN format (Int4Tensor, mslk kernels)", 14),
    _ao("torchao int8-dyn-act-int4wo-g32 (da8w4)", functools.partial(_ao_da8w4, 32),
        "Int4OpaqueTensor da8w4_linear_cpu path", 12),
    _ao("torchao intx-int4wo-g32", functools.partial(_ao_intx4wo, 32),
        "IntxWeightOnlyConfig int4: IntxUnpackedToInt8Tensor keeps one int8 per 4-bit value", 13),
    _qo("qint8", "WeightQBytesTensor int8 per-row, fp32 scale", 35),
    *[_qo("qint4", "WeightQBitsTensor 4-bit packed, fp32 scale+shift per group (128, else 96/64/32 to divide "
          "in_features; per-row when in_features <= 128)", 12, use_grad_mode) for use_grad_mode in (False, True)],
    _hq(8, 128, 38),
    _hq(4, 64, 15),
    _hq(4, 128, 14),
    _hq(3, 64, 11),
    _hq(2, 16, 6),
    _hq(4, 64, 15, torch.bfloat16),
]

REFERENCE = PeerConfig("memfit", "fp32 reference", "no quantization", lambda model: model, lambda: None, math.inf)


def config_named(name: str) -> PeerConfig:
    """The entry of `PEER_CONFIGS` called ``name`` (or `REFERENCE`).

    Raises:
        KeyError: no such name; the message lists the names there are.
    """
    for config in (REFERENCE, *PEER_CONFIGS):
        if config.name == name:
            return config
    raise KeyError(f"no peer config {name!r}; choose one of {[c.name for c in PEER_CONFIGS]}")


# ---- bytes held ------------------------------------------------------------------------------------

def held_bytes(model: nn.Module) -> int:
    """Bytes of storage the model really holds in its weights.

    Counts parameters, buffers and tensors kept in plain module attributes or dicts of them (hqq
    keeps scale/zero in ``HQQLinear.meta`` and its bias as a plain attribute). Tensor subclasses
    (torchao, quanto) are opened with ``__tensor_flatten__`` down to plain tensors. Each storage
    counts once, whole (a view holds its base), keyed by its data pointer, so tied weights count once.

    Example:
        >>> held_bytes(nn.Linear(4, 2, bias=False))
        32
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in _held_tensors(model):
        for leaf in _plain_tensors(tensor):
            storage = leaf.untyped_storage()
            ptr = storage.data_ptr()
            key = (str(leaf.device), ptr if ptr else storage._cdata)  # meta/empty storages have no pointer
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def _held_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    for module in model.modules():
        yield from module.parameters(recurse=False)
        yield from module.buffers(recurse=False)
        for name, value in vars(module).items():
            if not name.startswith("_"):
                yield from _tensors_in(value)


def _tensors_in(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


def _plain_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors behind ``tensor``: itself, or its flattened inner tensors, recursively."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        yield tensor
        return
    names, _ = tensor.__tensor_flatten__()
    for name in names:
        inner = getattr(tensor, name)
        if inner is not None:
            yield from _plain_tensors(inner)


def _is_quantized(module: nn.Module) -> bool:
    if getattr(module, "W_q", None) is not None:  # hqq HQQLinear
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter)


def linear_coverage(model: nn.Module) -> dict[str, object]:
    """Which Linear layers a peer quantized: counts, and the fp names left unquantized by suffix."""
    linears = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear) or hasattr(m, "W_q")]
    skipped = Counter(fqn.rsplit(".", 1)[-1] for fqn, m in linears if not _is_quantized(m))
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    return {
        "num_linears": len(linears),
        "num_quantized_linears": len(linears) - sum(skipped.values()),
        "unquantized_linears": dict(sorted(skipped.items())),
        "lm_head_quantized": head is not None and _is_quantized(head),
        "embedding_dtype": str(embeddings.weight.dtype).removeprefix("torch."),
    }


# ---- measurement -----------------------------------------------------------------------------------

def evaluate_peer(config: PeerConfig, load_model: Callable[[], nn.Module], windows: torch.Tensor) -> dict:
    """Quantize a fresh model with ``config`` and measure it.

    Args:
        config: an entry of `PEER_CONFIGS` (or `REFERENCE`).
        load_model: returns a fresh fp32 model.
        windows: token ids [N, 512] from `memfit.data.token_windows`.

    Returns:
        A JSON-ready dict: ``perplexity``, ``held_bytes``, ``quantize_s``, ``prefill_tokens_per_s``,
        ``decode_tokens_per_s`` (None where a step failed), the `linear_coverage` fields, and
        ``error`` / ``decode_error`` / ``prefill_error`` reasons (None when it ran).
    """
    result: dict = {"library": config.library, "name": config.name, "note": config.note, "error": None,
                    "eval_tokens": windows.numel(), "perplexity": None, "held_bytes": None, "quantize_s": None,
                    "prefill_tokens_per_s": None, "decode_tokens_per_s": None}
    if not config.available():
        result["error"] = f"unavailable: {config.unavailable_reason()}"
        return result
    model = load_model()
    start = time.perf_counter()
    try:
        model = config.apply(model)
    except Exception as exc:  # noqa: BLE001  (recorded: a peer failing on this model is a finding)
        result["error"] = f"quantize failed: {_one_line(exc)}"
        return result
    result["quantize_s"] = time.perf_counter() - start
    result["held_bytes"] = held_bytes(model)
    result.update(linear_coverage(model))
    try:
        result["perplexity"] = perplexity(model, windows)
    except Exception as exc:  # noqa: BLE001
        result["error"] = f"forward failed: {_one_line(exc)}"
        return result
    for key, measure in (("prefill", lambda: prefill_tokens_per_s(model, windows[0][:512])),
                         ("decode", lambda: decode_tokens_per_s(model, windows[0][:32], 64))):
        try:
            result[f"{key}_tokens_per_s"] = measure()
        except Exception as exc:  # noqa: BLE001  (e.g. a peer's layer rejecting transformers' KV cache)
            result[f"{key}_error"] = _one_line(exc)
    return result


# ---- script ----------------------------------------------------------------------------------------

def render_table(rows: list[dict]) -> str:
    """A Markdown table of `evaluate_peer` results."""

    def num(value, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    header = ("config", "perplexity", "held MB", "quantize s", "prefill tok/s", "decode tok/s", "quantized Linears",
              "notes")
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        held = None if row.get("held_bytes") is None else row["held_bytes"] / 1e6
        notes = "; ".join(str(row[k]) for k in ("error", "prefill_error", "decode_error") if row.get(k))
        skipped = row.get("unquantized_linears") or {}
        coverage = (f"{row['num_quantized_linears']}/{row['num_linears']}" if "num_linears" in row else "—")
        if skipped and row["name"] != REFERENCE.name:
            coverage += " (fp: " + ", ".join(f"{k}×{v}" for k, v in skipped.items()) + ")"
        lines.append(f"| {row['name']} | {num(row['perplexity'], '.3f')} | {num(held, '.1f')} | "
                     f"{num(row['quantize_s'], '.1f')} | {num(row['prefill_tokens_per_s'], '.0f')} | "
                     f"{num(row['decode_tokens_per_s'], '.1f')} | {coverage} | {notes or row['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="a memfit.load reference (demo, tiny-llama)")
    parser.add_argument("--tokens", type=int, default=4096, help="eval tokens, whole 512-token windows")
    parser.add_argument("--config", action="append", default=[], help="a config name (repeat); default: all")
    parser.add_argument("--reference", action="store_true", help="measure the unquantized fp32 model instead")
    parser.add_argument("--jsonl", help="append each result as one JSON line to this file")
    parser.add_argument("--table", help="print the Markdown table of a JSONL file and exit")
    parser.add_argument("--list", action="store_true", help="list configs and whether each runs here")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        with open(args.table) as f:
            print(render_table([json.loads(line) for line in f if line.strip()]))
        return 0
    if args.list:
        for c in PEER_CONFIGS:
            print(f"{c.name:42} {'ok' if c.available() else c.unavailable_reason()}")
        return 0

    from memfit.data import eval_text, token_windows
    from memfit.io import load

    configs = [REFERENCE] if args.reference else [config_named(n) for n in args.config] or PEER_CONFIGS
    tokenizer = load(args.model)[1]
    windows = token_windows(tokenizer, eval_text(), args.tokens, 512)
    for config in configs:
        row = evaluate_peer(config, lambda: load(args.model)[0], windows)
        line = json.dumps(row)
        print(line)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")
        print(render_table([row]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
