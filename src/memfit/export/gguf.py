"""Export to GGUF: one llama.cpp file (Q8_0, Q4_0, F16 or F32) for llama and qwen2 models.

Tensor names and metadata follow llama.cpp's ``convert_hf_to_gguf.py``: names from gguf's own
tensor map (``blk.N.attn_q.weight`` ...), llama's q/k rows permuted from the Hugging Face rotary
layout (two halves per head) to llama.cpp's (interleaved pairs), which transformers' GGUF loader
undoes; a tied output head is not written. The tokenizer goes in as ``gpt2`` (byte-level BPE:
tokens, token types, merges, special ids), the only tokenizer kind this exporter writes.

memfit's packed weights are dequantized to fp32 and re-quantized into llama.cpp's blocks of 32:
Q8_0 (8-bit, one fp16 scale per block) stays within about half an int8 step of memfit's int8
weights; Q4_0 (4-bit symmetric, one fp16 scale per block) puts a memfit int4 model on another
grid, which costs quality again (SmolLM2 int4-g128: perplexity 19.9, as Q4_0 22.7, as Q8_0 19.9).
In Q4_0 files the token embedding and output head are Q8_0, as llama.cpp's 4-bit files keep them
at higher precision; norms and biases are F32; a row whose length is not a multiple of 32 falls
back to F16, as the converter does.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from memfit.errors import OutputError
from memfit.models.arch import LAYOUTS, Layout
from memfit.strategies.quantize.packed import PackedModule

log = logging.getLogger(__name__)

BLOCK = 32  # values per Q8_0 / Q4_0 block: rows must be a multiple of it


class GgufKind(enum.Enum):
    """The file's weight type (llama.cpp's ``general.file_type``): Q8_0 about 8.5 bits per weight,
    Q4_0 about 4.5 (embedding at Q8_0), F16 16 and F32 32."""

    Q8_0 = "Q8_0"
    Q4_0 = "Q4_0"
    F16 = "F16"
    F32 = "F32"


# kind -> (2-D weights, token embedding and untied output head, general.file_type), as gguf names
_TYPES = {
    GgufKind.Q8_0: ("Q8_0", "Q8_0", "MOSTLY_Q8_0"),
    GgufKind.Q4_0: ("Q4_0", "Q8_0", "MOSTLY_Q4_0"),
    GgufKind.F16: ("F16", "F16", "MOSTLY_F16"),
    GgufKind.F32: ("F32", "F32", "ALL_F32"),
}


@dataclasses.dataclass(frozen=True)
class _Arch:
    name: str  # llama.cpp's architecture name: general.architecture and the metadata key prefix
    layout: Layout  # layer names, and whether llama.cpp's rotary pairs adjacent rows (q/k permuted)


_ARCHS = {name: _Arch(name, LAYOUTS[name]) for name in ("llama", "qwen2")}

# The Hugging Face pre-tokenizer's shape -> llama.cpp's tokenizer.ggml.pre (how text is split before BPE).
_PRE_TOKENIZERS = {
    (("ByteLevel", True, None),): "gpt-2",
    (("Digits", None, True), ("ByteLevel", True, None)): "smollm",
}


def export_gguf(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_path: str | Path, kind: GgufKind | str
) -> Path:
    """Write ``model`` (quantized by memfit, or float) as a llama.cpp GGUF file, atomically.

    Args:
        model: a llama or qwen2 causal LM, float or after `memfit.apply` (int4/int8 layers are
            dequantized, then re-quantized to ``kind``).
        tokenizer: its tokenizer; it must be a fast byte-level BPE tokenizer.
        out_path: the ``.gguf`` file to create or replace (an existing file is replaced only if it
            is a GGUF file).
        kind: ``"Q8_0"``, ``"Q4_0"``, ``"F16"`` or ``"F32"`` (or a `GgufKind`).

    Returns:
        The output path.

    Raises:
        OutputError: an unknown kind, an architecture or tokenizer the exporter does not cover,
            or a path that cannot be written without losing data.

    Example:
        >>> export_gguf(model, tokenizer, "smollm2-q8_0.gguf", "Q8_0")
        >>> memfit.load("smollm2-q8_0.gguf")  # or llama.cpp: llama-cli -m smollm2-q8_0.gguf
    """
    gguf = _import_gguf()
    kind = _parse_kind(kind)
    out = Path(out_path)
    _check_output_file(out)
    config = model.config
    arch = _ARCHS.get(config.model_type)
    if arch is None:
        raise OutputError(
            f"GGUF export covers {', '.join(_ARCHS)} models; this model is {config.model_type!r}",
            "export it with memfit.export.export_compressed_tensors instead",
        )
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch.name, use_temp_file=True)  # stages tensors in a file, not in memory
        _add_hparams(writer, config, kind, gguf)
        _add_tokenizer(writer, tokenizer, config.vocab_size, gguf)
        weight_type, embed_type = (gguf.GGMLQuantizationType[name] for name in _TYPES[kind][:2])
        floats = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        names = gguf.get_tensor_name_map(_arch_enum(arch.name, gguf), config.num_hidden_layers)
        for hf_name, tensor in _float_tensors(model, arch, config):
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise OutputError(f"tensor {hf_name!r} has no llama.cpp name", "only standard decoder layers export")
            qtype = gguf.GGMLQuantizationType.F32
            if tensor.ndim == 2:
                qtype = embed_type if name in ("token_embd.weight", "output.weight") else weight_type
                if tensor.shape[1] % BLOCK and qtype not in floats:
                    log.info("%s: rows of %d are not blocks of %d; writing F16", name, tensor.shape[1], BLOCK)
                    qtype = gguf.GGMLQuantizationType.F16
            writer.add_tensor(name, gguf.quants.quantize(tensor.numpy(), qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def check_target(out_path: str | Path) -> None:
    """Raise `OutputError` now if an export to ``out_path`` would fail for want of the package or
    of a writable path."""
    _import_gguf()
    _check_output_file(Path(out_path))


def _import_gguf() -> Any:
    try:
        import gguf
        import gguf.quants
    except ImportError:
        raise OutputError(
            "exporting to GGUF needs the 'gguf' package, which is not installed", "pip install 'memfit[export]'"
        ) from None
    return gguf


def _parse_kind(kind: GgufKind | str) -> GgufKind:
    if isinstance(kind, GgufKind):
        return kind
    try:
        return GgufKind(str(kind).upper())
    except ValueError:
        raise OutputError(
            f"GGUF kind {kind!r} is not supported", f"use one of {', '.join(k.value for k in GgufKind)}"
        ) from None


def _check_output_file(out: Path) -> None:
    if out.suffix != ".gguf":
        raise OutputError(f"output {str(out)!r} does not end in .gguf", "name the file *.gguf (memfit.load needs it)")
    if out.is_dir():
        raise OutputError(f"output {str(out)!r} is a directory", "choose a file path ending in .gguf")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise OutputError(f"output {str(out)!r} exists and is not a GGUF file", "choose a new path")
    if not out.parent.is_dir():
        raise OutputError(f"directory {str(out.parent)!r} does not exist", "create it first")


def _arch_enum(name: str, gguf: Any) -> Any:
    return next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == name)


def _add_hparams(writer: Any, config: Any, kind: GgufKind, gguf: Any) -> None:
    """The model metadata llama.cpp's converter writes for LlamaForCausalLM / Qwen2ForCausalLM."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise OutputError(f"rope scaling {rope_type!r} is not exported to GGUF yet", "export to compressed-tensors")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[_TYPES[kind][2]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _float_tensors(model: torch.nn.Module, arch: _Arch, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(Hugging Face name, fp32 tensor)`` for every weight, packed ones dequantized, the tied head left out."""
    head = model.get_output_embeddings() if config.tie_word_embeddings else None
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for fqn, module in model.named_modules():
        if module is head and head is not None:
            continue
        if isinstance(module, PackedModule):  # llama.cpp re-quantizes weights; only their values matter
            tensors = [("weight", module.dequantize(torch.float32))]
            if getattr(module, "bias", None) is not None:
                tensors.append(("bias", module.bias))
        else:
            tensors = list(module.named_parameters(recurse=False))
        for leaf, tensor in tensors:
            tensor = tensor.detach().float()
            if arch.layout.rotary_pairs and fqn.endswith(arch.layout.q):
                tensor = _permute_rows(tensor, heads)
            elif arch.layout.rotary_pairs and fqn.endswith(arch.layout.k):
                tensor = _permute_rows(tensor, kv_heads)
            yield f"{fqn}.{leaf}", tensor.contiguous()


def _permute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    # Each head's rows [first half | second half] -> pairs (0, D/2), (1, D/2 + 1), ...: llama.cpp's
    # rotary rotates adjacent pairs, Hugging Face's rotates halves (LlamaModel.permute in the converter).
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(writer: Any, tokenizer: PreTrainedTokenizerBase, vocab_size: int, gguf: Any) -> None:
    """tokenizer.ggml.*: a ``gpt2`` (byte-level BPE) vocabulary padded to the model's rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    if spec.get("model", {}).get("type") != "BPE" or not any(step.get("type") == "ByteLevel" for step in steps):
        raise OutputError(
            f"GGUF export writes byte-level BPE tokenizers; {type(tokenizer).__name__} is not one",
            "export to compressed-tensors, or convert with llama.cpp's convert_hf_to_gguf.py",
        )
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    if max(vocab.values()) >= vocab_size:
        raise OutputError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} embedding rows",
            "resize the token embeddings to the tokenizer",
        )
    # Rows without a token (padding to a round size) get placeholders, as the converter writes them.
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    for token, index in vocab.items():
        tokens[index] = token
        if index not in added:
            types[index] = gguf.TokenType.NORMAL
        else:
            types[index] = gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED
    shape = tuple((s.get("type"), s.get("use_regex"), s.get("individual_digits")) for s in steps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_PRE_TOKENIZERS.get(shape, "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    else:  # GGUF cannot hold an empty array; with scores, transformers derives the (no) merges itself
        writer.add_token_scores([0.0] * vocab_size)
    for key, token_id in [("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)]:
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
