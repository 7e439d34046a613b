"""Export to compressed-tensors: a Hugging Face directory that transformers (and vLLM) load without memfit.

The directory holds ``config.json`` with a ``quantization_config`` (quant_method
``compressed-tensors``, format ``pack-quantized``), ``model.safetensors`` and the tokenizer files;
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads it once the ``compressed-tensors``
package is installed. How each memfit module is written ([N, K] is the weight's shape, G = K / group):

- `Int4Linear` -> 4-bit asymmetric: ``weight_packed`` int32 [N, K / 8] (value i of a word in bits
  4i..4i+3), ``weight_scale`` [N, G], ``weight_zero_point`` and ``weight_shape``. compressed-tensors
  stores signed codes (-8..7) and packs them offset by +8, so memfit's unsigned nibbles and zero
  points go in unchanged: ``(q - 8) - (z - 8) == q - z``. See `Int4Strategy` for the two layouts.
- `Int8Linear` -> 8-bit symmetric per output channel: ``weight_packed`` int32 [N, K / 4] and
  ``weight_scale`` [N, 1] (pack-quantized is compressed-tensors' weight-only int8 format too;
  its int-quantized format is w8a8).
- `Int8Embedding` -> the dequantized table (the loader quantizes no embedding); a head tied to it
  is written by Hugging Face's tie, not stored.
- `nn.Linear` left in float -> its weight, and its name in ``ignore``.

Scales are written in the activation dtype, so the loader's ``(q - z) * scale`` runs in the same
dtype as memfit's dequantize path and gives exactly its weights. Layers sharing one scheme form a
config group targeting ``Linear``; mixed plans (int4 at several group sizes, int8, float) get one
group per scheme listing its layers by name.

On load, transformers (5.x with compressed-tensors 0.20) keeps the packed tensors until the first
forward pass, which dequantizes every layer to a float weight once; it runs no int4/int8 kernel.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from memfit.errors import OutputError
from memfit.io import atomic_dir, check_output_dir
from memfit.strategies.quantize.kernels import PLAIN
from memfit.strategies.quantize.packed import Int4Linear, Int8Embedding, Int8Linear, PackedModule

WEIGHTS = "model.safetensors"
MARKER = "memfit-export.json"  # marks a directory memfit exported, so a later export may replace it
FORMAT = "pack-quantized"


class Int4Strategy(enum.Enum):
    """How 4-bit groups are described to compressed-tensors; both hold the same bits.

    - ``BLOCK``: blocks of 1 row x ``group_size`` columns (the same grouping), zero points as int8
      [N, G]. transformers 5.x with compressed-tensors 0.20 loads it; vLLM's 4-bit kernels do not
      take block schemes.
    - ``GROUP``: the group strategy llm-compressor writes for W4A16_ASYM, zero points packed eight
      per int32 along N ([ceil(N / 8), G]); what vLLM serves. transformers 5.x with
      compressed-tensors 0.20 cannot load any asymmetric group checkpoint (its loader expects the
      zero points unpacked), llm-compressor's own included.
    """

    BLOCK = "block"
    GROUP = "group"


def export_compressed_tensors(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    int4_strategy: Int4Strategy = Int4Strategy.BLOCK,
) -> Path:
    """Write ``model`` (quantized by memfit, or not) as a compressed-tensors directory, atomically.

    Args:
        model: a Hugging Face causal LM, after `memfit.apply` with int4/int8 recipes (any mix of
            `Int4Linear`, `Int8Linear` and float Linear layers).
        tokenizer: its tokenizer, saved alongside.
        out_dir: the directory to create or replace; an existing one is replaced only if it is
            empty or was written by memfit (`memfit.save` or this exporter).
        int4_strategy: how 4-bit layers are described: ``BLOCK`` loads in transformers,
            ``GROUP`` in vLLM (see `Int4Strategy`). Same bytes and values either way.

    Returns:
        The output directory.

    Raises:
        OutputError: ``out_dir`` cannot be written, the ``compressed-tensors`` package is missing,
            or a layer does not fit the format (int4 groups that do not divide its input width).

    Example:
        >>> memfit.apply(model, "int4-g128")
        >>> export_compressed_tensors(model, tokenizer, "smollm2-w4")
        >>> AutoModelForCausalLM.from_pretrained("smollm2-w4")  # in a process without memfit
    """
    ct = _import_compressed_tensors()
    out = Path(out_dir)
    if not (out / MARKER).is_file():
        check_output_dir(out)
    tensors, groups, ignore = _compressed_state(model, int4_strategy)
    quant_config = _quantization_config(groups, ignore, int4_strategy)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if quant_config is not None:  # llm-compressor's writer, so the block reads as theirs does
            ct.compressors.ModelCompressor(quantization_config=quant_config).update_config(str(tmp))
        tokenizer.save_pretrained(tmp)
        plan = getattr(model, "memfit_plan", None)
        marker = {"format": "compressed-tensors", "plan": plan.to_dict() if plan is not None else None}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    return out


def check_target(out_dir: str | Path) -> None:
    """Raise `OutputError` now if an export to ``out_dir`` would fail for want of the package or
    of a writable directory (so a long compression does not end in that error)."""
    _import_compressed_tensors()
    if not (Path(out_dir) / MARKER).is_file():
        check_output_dir(Path(out_dir))


def _import_compressed_tensors() -> Any:
    try:
        import compressed_tensors.compressors
    except ImportError:
        raise OutputError(
            "exporting to compressed-tensors needs the 'compressed-tensors' package, which is not installed",
            "pip install 'memfit[export]'",
        ) from None
    return compressed_tensors


# A scheme memfit writes: (bits, group_size); group_size None means one scale per output channel.
Scheme = tuple[int, int | None]


def _compressed_state(
    model: nn.Module, int4_strategy: Int4Strategy
) -> tuple[dict[str, torch.Tensor], dict[Scheme, list[str]], list[str]]:
    """The tensors to save (Hugging Face names), the layers of each scheme, and the float Linears."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[Scheme, list[str]] = {}
    ignore: list[str] = []
    packed: set[str] = set()  # modules whose own buffers are replaced by what is written here
    for fqn, module in model.named_modules():
        # Exact types: subclasses (W8A8's Int8DynamicLinear, Fp8Linear) compute differently.
        if isinstance(module, PackedModule) and type(module) not in (Int4Linear, Int8Linear, Int8Embedding):
            raise OutputError(
                f"layer {fqn!r} is a {type(module).__name__}, which the compressed-tensors export does not cover",
                "export a model quantized with weight-only int8/int4 recipes, or export it to GGUF",
            )
        if isinstance(module, Int4Linear):
            n, k = module.out_features, module.in_features
            if k % module.group_size:
                raise OutputError(
                    f"layer {fqn!r} has int4 groups of {module.group_size} that do not divide its {k} input "
                    "columns (a short last group), which compressed-tensors cannot store",
                    "quantize it with a group size that divides its width (e.g. int4-g64), or keep it int8",
                )
            zero = (module.zero_point.t().to(torch.int8) - 8).contiguous()  # [N, G], signed -8..7
            if int4_strategy is Int4Strategy.GROUP:
                zero = pack_to_int32(zero, 4, packed_dim=0)  # [ceil(N / 8), G]
            tensors[f"{fqn}.weight_packed"] = _words(module.layout.unpack(module.qweight), 4)  # [N, K / 8]
            tensors[f"{fqn}.weight_zero_point"] = zero
            tensors[f"{fqn}.weight_scale"] = module.scale.t().to(module.out_dtype).contiguous()  # [N, G]
            tensors[f"{fqn}.weight_shape"] = torch.tensor([n, k])
            groups.setdefault((4, module.group_size), []).append(fqn)
        elif isinstance(module, Int8Linear):
            if isinstance(embedding, Int8Embedding) and module.qweight is embedding.qweight:
                ignore.append(fqn)  # the tied head: the loader ties it to the embedding written below
            else:
                unsigned = (module.qweight.to(torch.int16) + 128).to(torch.uint8)
                tensors[f"{fqn}.weight_packed"] = _words(unsigned, 8)  # [N, K / 4]
                tensors[f"{fqn}.weight_scale"] = module.scale[:, None].to(module.out_dtype)  # [N, 1]
                tensors[f"{fqn}.weight_shape"] = torch.tensor(list(module.qweight.shape))
                groups.setdefault((8, None), []).append(fqn)
        elif isinstance(module, Int8Embedding):
            tensors[f"{fqn}.weight"] = module.dequantize(module.out_dtype)  # as its forward computes rows
        elif isinstance(module, nn.Linear):
            ignore.append(fqn)
            continue
        else:
            continue
        if getattr(module, "bias", None) is not None:
            tensors[f"{fqn}.bias"] = module.bias.detach().contiguous()
        packed.add(fqn)
    # Everything else (norms, float layers) under its Hugging Face name; a tied tensor once, under
    # its first name (the embedding), as save_pretrained writes it.
    seen: set[int] = set()
    for fqn, module in model.named_modules():
        if fqn in packed:
            continue
        for leaf, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if leaf in module._non_persistent_buffers_set or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            tensors[f"{fqn}.{leaf}" if fqn else leaf] = tensor.detach().contiguous()
    return tensors, groups, ignore


def _words(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes as unsigned values [N, K] (compressed-tensors' signed code + 2^(bits - 1)) -> its int32
    words [N, K * bits / 32], value i of a word in bits i*bits and up (``pack_to_int32``).

    For whole words on a little-endian host these are the bytes of memfit's plain nibble layout
    (4-bit) or the values themselves (8-bit), viewed as int32: no bit shuffling needed.
    """
    if sys.byteorder == "little" and unsigned.shape[1] * bits % 32 == 0:
        data = PLAIN.pack(unsigned) if bits == 4 else unsigned.to(torch.uint8)
        return data.contiguous().view(torch.int32)
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32((unsigned.to(torch.int16) - (1 << (bits - 1))).to(torch.int8), bits)


def _quantization_config(groups: dict[Scheme, list[str]], ignore: list[str], int4_strategy: Int4Strategy) -> Any:
    """compressed-tensors' QuantizationConfig for these groups, or None for a float model."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    if not groups:
        return None
    config_groups = {}
    for index, ((bits, group_size), fqns) in enumerate(sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] or 0))):
        if group_size is None:
            args = QuantizationArgs(num_bits=bits, symmetric=True, strategy="channel")
        elif int4_strategy is Int4Strategy.GROUP:
            args = QuantizationArgs(num_bits=bits, symmetric=False, strategy="group", group_size=group_size)
        else:
            args = QuantizationArgs(num_bits=bits, symmetric=False, strategy="block", block_structure=[1, group_size])
        # One scheme: target the class and ignore the float layers, as llm-compressor writes it.
        # Several: name each layer, so every layer gets exactly its own scheme.
        targets = ["Linear"] if len(groups) == 1 else fqns
        config_groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=args, format=FORMAT)
    return QuantizationConfig(
        config_groups=config_groups, format=FORMAT, quantization_status="compressed", ignore=ignore
    )
