"""The planner's fast path against a TPE search over the same per-block space, on the demo model.

The space: every attention and MLP block of the decoder holds one of the per-block options the
strategies declare (int4 in groups of 32, 64 or 128, int8, float; rounded to nearest), and the
blocks together may hold at most ``--bits`` bits per weight (scales counted), as `mixed-bits-B`
sizes them.

- Fast path: each block's score in each option measured once (`block_scores`: the KL divergence
  when that block alone is rounded, 512 calibration tokens), then the exact allocation under the
  cap (`allocate`), and one evaluation.
- TPE: Optuna's TPE sampler (seeded) proposes a choice for every block; a proposal over the cap is
  told a penalty (how far over, without computing anything); each one that fits is applied and
  evaluated, until ``--trials`` have been evaluated.

Both are scored by perplexity on the same evaluation tokens (the embedding and head stay fp32 on
both sides). The table gives each one's perplexity, bytes and evaluations.

    .venv/bin/python benchmarks/fastpath.py                      # 5 bits, 30 TPE trials, 4,096 tokens
    .venv/bin/python benchmarks/fastpath.py --bits 4.6 --trials 30 --tokens 8192
"""

from __future__ import annotations

import argparse
import copy
import time

import optuna

import memfit
from memfit.data import calibration_windows
from memfit.evaluate import evaluate
from memfit.strategies.quantize.mixed import allocate, block_options, block_scores, units_of
from memfit.strategies.targets import Targets
from memfit.workload import Context

PENALTY = 1e3  # a proposal over the cap: this plus its overshoot in bits per weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--bits", type=float, default=5.0, help="bits per weight the decoder blocks may hold")
    parser.add_argument("--trials", type=int, default=30, help="TPE proposals evaluated (those that fit)")
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per plan")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tokenizer = memfit.load(args.model)
    units = units_of(model, Targets())
    options = block_options()
    tokens = list(options)
    costs = [{t: sum(o.nbytes(m) for _, m in unit) for t, o in options.items()} for _, unit in units]
    params = sum(m.weight.numel() for _, unit in units for _, m in unit)
    cap = int(args.bits * params / 8)
    bits = lambda choices: 8 * sum(c[t] for c, t in zip(costs, choices, strict=True)) / params

    def perplexity(choices: list[str]) -> float:
        work = copy.deepcopy(model)
        named = dict(work.named_modules())
        for (_, unit), token in zip(units, choices, strict=True):
            for fqn, _ in unit:
                if options[token].fake is not None:
                    linear = named[fqn]
                    linear.weight.data = options[token].fake(linear.weight.data).to(linear.weight.dtype)
        return evaluate(work, tokenizer, text=None, num_tokens=args.tokens, measure_speed=False).perplexity

    start = time.perf_counter()
    ctx = Context(calibration=calibration_windows(tokenizer), memo={})
    scores = block_scores(model, units, options, ctx, "scores")
    fast = allocate(costs, scores, cap)
    fast_ppl = perplexity(fast)
    fast_s = time.perf_counter() - start
    print(f"fast path: {bits(fast):.3f} bits, perplexity {fast_ppl:.3f}, {fast_s:.0f} s", flush=True)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=args.seed))
    start, evaluated, proposed = time.perf_counter(), [], 0
    while len(evaluated) < args.trials:
        trial = study.ask()
        choices = [trial.suggest_categorical(f"block{i}", tokens) for i in range(len(units))]
        proposed += 1
        over = bits(choices) - args.bits
        if over > 0:
            study.tell(trial, PENALTY + over)
            continue
        value = perplexity(choices)
        study.tell(trial, value)
        evaluated.append((value, bits(choices)))
        print(f"  TPE trial {len(evaluated)} (proposal {proposed}): {bits(choices):.3f} bits, perplexity {value:.3f}",
              flush=True)
    tpe_s = time.perf_counter() - start
    best = min(evaluated)

    print(f"\n{args.model}: at most {args.bits:g} bits per weight over the decoder blocks ({cap:,} bytes); "
          f"{args.tokens:,} evaluation tokens; TPE seed {args.seed}\n")
    print("| search | evaluations | bits per weight | perplexity | time |")
    print("|---|---:|---:|---:|---:|")
    print(f"| fast path (scores + exact allocation) | 1 | {bits(fast):.3f} | {fast_ppl:.3f} | {fast_s:.0f} s |")
    print(f"| TPE, best of {args.trials} evaluated ({proposed} proposed) | {args.trials} | {best[1]:.3f} | "
          f"{best[0]:.3f} | {tpe_s:.0f} s |")
    print(f"\nfast path vs TPE: {fast_ppl / best[0] - 1:+.2%}")


if __name__ == "__main__":
    main()
