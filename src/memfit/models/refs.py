"""`resolve(ref)`: the one place that decides what a ``--model`` string names.

A reference is one of the `RefKind` kinds below; every loader (`memfit.load`, `memfit.estimate`'s
meta skeletons, streamed calibration, `memfit train`'s early checks) asks `resolve` instead of
looking at the string itself, so a new kind of source is one branch here.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path

from memfit.errors import ModelNotFoundError
from memfit.models import tiny

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_DIR = Path(__file__).parent / "configs"


class RefKind(enum.Enum):
    """What a model reference names."""

    TINY = "tiny"  # a tiny random model built in-process (`memfit.models.tiny`)
    DEMO = "demo"  # SmolLM2-135M-Instruct (`memfit.models.demo`)
    SAVED = "saved"  # a directory written by `memfit.save` (it holds memfit.json)
    HF_DIR = "hf-dir"  # a Hugging Face model directory (config.json, weights)
    GGUF = "gguf"  # a llama.cpp .gguf file
    CONFIG_FILE = "config-file"  # a bare config.json: shapes only, no weights
    BUNDLED = "bundled"  # a config memfit ships (`bundled_configs`): shapes only, no weights
    HUB = "hub"  # a string shaped like a Hugging Face hub id


@dataclasses.dataclass(frozen=True)
class Ref:
    """A resolved model reference.

    Attributes:
        kind: what it names.
        text: the reference as given.
        path: the file or directory for local kinds (the config file for `RefKind.BUNDLED`).
    """

    kind: RefKind
    text: str
    path: Path | None = None

    @property
    def has_weights(self) -> bool:
        """False for config-only references, which can be estimated but not loaded."""
        return self.kind not in (RefKind.CONFIG_FILE, RefKind.BUNDLED)


def bundled_configs() -> list[str]:
    """Names of the configs memfit ships (public shapes, no weights), e.g. ``llama-3-70b``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve(ref: str | Path | Ref) -> Ref:
    """Decide what ``ref`` names, without loading anything.

    Args:
        ref: ``tiny-llama``/``tiny-qwen2``, ``demo``, a memfit output directory, a Hugging Face
            directory, a ``.gguf`` file, a ``config.json`` file, a bundled config name
            (``llama-3-70b``) or a hub id.

    Raises:
        ModelNotFoundError: nothing matches ``ref`` (the message lists what would).

    Example:
        >>> resolve("demo").kind
        <RefKind.DEMO: 'demo'>
    """
    if isinstance(ref, Ref):
        return ref
    text = str(ref)
    if text in tiny.CONFIGS:
        return Ref(RefKind.TINY, text)
    if text == "demo":
        return Ref(RefKind.DEMO, text)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "memfit.json").is_file():
            return Ref(RefKind.SAVED, text, path)
        if (path / "config.json").is_file():
            return Ref(RefKind.HF_DIR, text, path)
        raise ModelNotFoundError(f"{text!r} has no config.json", "pass a Hugging Face model directory")
    if path.is_file():
        if path.suffix == ".gguf":
            return Ref(RefKind.GGUF, text, path)
        if path.suffix == ".json":
            return Ref(RefKind.CONFIG_FILE, text, path)
        raise ModelNotFoundError(f"{text!r} is a file but not a .gguf", "pass a model directory or a .gguf file")
    if text.lower() in bundled_configs():
        return Ref(RefKind.BUNDLED, text, CONFIG_DIR / f"{text.lower()}.json")
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return Ref(RefKind.HUB, text)
    raise ModelNotFoundError(
        f"model {text!r} not found: no such directory or file",
        f"pass a Hugging Face directory, a .gguf file, a hub id, 'demo', or one of {', '.join(tiny.CONFIGS)} "
        f"(to estimate only: a config.json or a bundled config: {', '.join(bundled_configs())})",
    )


def resolve_loadable(ref: str | Path | Ref) -> Ref:
    """`resolve`, refusing references that name shapes only (a config file, a bundled config).

    Raises:
        ModelNotFoundError: nothing matches, or ``ref`` has no weights to load.
    """
    resolved = resolve(ref)
    if not resolved.has_weights:
        raise ModelNotFoundError(
            f"{resolved.text!r} is a config without weights",
            "memfit estimate accepts it; to load a model pass a model directory, a .gguf file or a hub id",
        )
    return resolved
