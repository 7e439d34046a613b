"""memfit's decode runtime: a static KV cache, a compiled decode step, sampling, streaming.

- `Engine` (engine.py): prefill and decode over a `KVCache`, the decode step compiled;
- `Decoder` (decoder.py): the forward it runs, through the model's own modules;
- `KVCache` (kvcache.py): the static cache, in the model's dtype or quantized (`KVFormat`);
- `Sampling` (sampling.py): greedy, temperature, top-k, top-p, repetition penalty, seed;
- `generate()` / `stream()` (generate.py): text in, text out.
"""

from memfit.runtime.decoder import Decoder, runs_on_runtime
from memfit.runtime.engine import Engine
from memfit.runtime.generate import Generation, generate, stream
from memfit.runtime.kvcache import KVCache, KVFormat
from memfit.runtime.sampling import Sampling

__all__ = ["Decoder", "Engine", "Generation", "KVCache", "KVFormat", "Sampling", "generate", "runs_on_runtime",
           "stream"]
