"""Export memfit models to formats other runtimes load without memfit.

- `export_compressed_tensors`: a Hugging Face directory in the compressed-tensors format
  (``pack-quantized``) for transformers (and vLLM); memfit's int4/int8 codes and scales are written
  as they are, so the loaded model computes with exactly memfit's weights.
- `export_gguf`: one llama.cpp GGUF file (Q8_0, Q4_0, F16 or F32) for llama and qwen2 models; the
  weights are dequantized and re-quantized into llama.cpp's blocks.

Both need the ``export`` extra (``pip install 'memfit[export]'``) and write atomically.

Example:
    >>> memfit.apply(model, "int4-g128")
    >>> export_compressed_tensors(model, tokenizer, "smollm2-w4")
    >>> export_gguf(model, tokenizer, "smollm2-q4_0.gguf", "Q4_0")
"""

from __future__ import annotations

from pathlib import Path

from memfit.errors import OutputError
from memfit.export import compressed_tensors, gguf
from memfit.export.compressed_tensors import Int4Strategy, export_compressed_tensors
from memfit.export.gguf import GgufKind, export_gguf
from memfit.plan import Plan

FORMATS = ("memfit", "compressed-tensors", *(f"gguf-{kind.value.lower()}" for kind in GgufKind))
"""What ``memfit compress --format`` writes: memfit's own directory, or one of the exports."""



def check_target(fmt: str, out: str | Path, plan: Plan | None = None) -> None:
    """Fail now (`memfit.errors.OutputError`) if exporting ``plan``'s result as ``fmt`` to ``out``
    cannot work."""
    for strategy in plan.strategies if plan is not None else ():
        if not strategy.exportable:  # kept values plus a bitmask, two factors: neither format has them
            raise OutputError(
                f"{fmt} cannot hold the layers {strategy.token!r} makes (sparse or factored Linears)",
                "save in memfit's format (--format memfit), or use structured pruning (prune-mlp-25), "
                "which exports as plain layers",
            )
    if fmt == "compressed-tensors":
        compressed_tensors.check_target(out)
    elif fmt.startswith("gguf-"):
        gguf.check_target(out)


def export(model, tokenizer, fmt: str, out: str | Path) -> Path:
    """Write ``model`` as ``fmt`` (one of `FORMATS` other than ``memfit``) to ``out``."""
    if fmt == "compressed-tensors":
        return export_compressed_tensors(model, tokenizer, out)
    return export_gguf(model, tokenizer, out, fmt.removeprefix("gguf-").upper())


__all__ = ["FORMATS", "GgufKind", "Int4Strategy", "check_target", "export", "export_compressed_tensors", "export_gguf"]
