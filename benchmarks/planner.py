"""The planner against an exhaustive evaluation of the same space, on the demo model.

For each weight budget (a share of the fp32 weights), `memfit.optimize` searches as `memfit
optimize` does (predicted bytes, predicted quality from per-block scores, the best 3 evaluated);
then every plan of the same space that fits the budget (`candidate_plans` and the mixed plan sized
to the budget, the structural plans the search skips included) is applied and evaluated on the
same tokens, each once over all budgets (those the search evaluated are not run again, and a
plan's leading strategies are applied once for every plan that starts with them). The table gives
the search's choice and the exhaustive best, their perplexities, and how much of the space the
search evaluated.

    .venv/bin/python benchmarks/planner.py                      # 15%, 20%, 30%, 50%
    .venv/bin/python benchmarks/planner.py --budgets 30% --tokens 4096
    .venv/bin/python benchmarks/planner.py --budgets 15% --tokens 8192 --search-only
    .venv/bin/python benchmarks/planner.py --mode generate --batch 1 --seq 2048 --budgets 220MB --tokens 8192

With ``--mode generate`` the budget covers the workload's whole predicted peak (weights, KV cache,
activations): the space is the generation workload's (KV-cache formats included) and a plan fits
when its predicted peak does. The chosen plan is then applied and the workload run with every
allocation tracked (`memfit.profile`), and the search is compared with a weights-only search at the
same budget, whose plan may not fit the workload.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import memfit
from memfit.data import calibration_windows
from memfit.evaluate import evaluate
from memfit.planner.search import optimize
from memfit.planner.space import budget_plans, candidate_plans
from memfit.units import parse_budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--budgets", default="15%,20%,30%,50%")
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens per plan")
    parser.add_argument("--search-only", action="store_true",
                        help="run only the searches (their choices, what they evaluated, their time)")
    parser.add_argument("--mode", choices=("generate",), help="budgets cover this workload's whole peak")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    workload = None if args.mode is None else memfit.Workload(
        mode=memfit.Mode.GENERATE, batch_size=args.batch, seq_len=args.seq, new_tokens=args.new_tokens)

    model, tokenizer = memfit.load(args.model)
    calibration = calibration_windows(tokenizer)
    original = memfit.weight_bytes(model)
    measured: dict[str, tuple[float, int]] = {}  # recipe -> (perplexity, weight bytes)
    applied: dict[tuple, torch.nn.Module] = {}  # a plan's leading strategies -> the model with them applied, kept

    def measure(plan: memfit.Plan) -> tuple[float, int]:
        if plan.recipe not in measured:
            # a plan applies strategy by strategy: each prefix (pruning, low-rank factors, GPTQ: minutes) is
            # applied once and copied for every plan that starts with it
            work = model
            for i in range(1, len(plan.strategies) + 1):
                prefix = plan.strategies[:i]
                if prefix not in applied:
                    applied[prefix] = memfit.apply(copy.deepcopy(work), memfit.Plan(prefix[-1:]),
                                                   memfit.Context(calibration=calibration))
                work = applied[prefix]
            # run settings (a KV-cache format) change no weight: perplexity is scored without the cache
            metrics = evaluate(work, tokenizer, num_tokens=args.tokens, measure_speed=False)
            measured[plan.recipe] = (metrics.perplexity, metrics.weight_bytes)
            print(f"  exhaustive: {plan.recipe}: {metrics.perplexity:.3f}", flush=True)
        return measured[plan.recipe]

    rows = []
    for budget in args.budgets.split(","):
        budget_bytes = parse_budget(budget, original)
        start = time.perf_counter()
        result = optimize(model, tokenizer, budget_bytes, calibration=calibration, num_tokens=args.tokens,
                          measure_speed=False, workload=workload)
        seconds = time.perf_counter() - start
        chosen = result.best
        if workload is not None:
            workload_check(model, tokenizer, result, budget_bytes, calibration, args.tokens)
        evaluated = sum(c.metrics is not None and bool(c.plan.strategies) for c in result.candidates)
        for c in result.candidates:  # the search's own evaluations are on the same tokens: not run twice
            if c.metrics is not None and c.plan.strategies:
                measured.setdefault(c.plan.recipe, (c.metrics.perplexity, c.metrics.weight_bytes))
        if args.search_only:
            print(f"| {budget} | {evaluated} | {chosen.plan.recipe} | {chosen.metrics.perplexity:.3f} | "
                  f"{chosen.metrics.weight_bytes <= budget_bytes} | {seconds:.0f} s |", flush=True)
            continue
        # the same space, every plan that fits evaluated (the mixed plan as the search resolved it)
        if workload is None:
            space = candidate_plans() + budget_plans(model, budget_bytes)
            fitting = [p for p in space if p.strategies and memfit.estimate(model, p).weight_bytes <= budget_bytes]
        else:
            overhead = memfit.estimate(model, memfit.Plan(), workload).peak_bytes - original
            space = candidate_plans(workload) + budget_plans(model, budget_bytes - overhead, workload)
            fitting = [p for p in space if p.strategies and memfit.estimate(model, p).weight_bytes <= budget_bytes
                       and memfit.estimate(model, p, workload).peak_bytes <= budget_bytes]
        scores = {p.recipe: measure(p) for p in fitting}
        best = min(scores, key=lambda r: scores[r][0])
        gap = chosen.metrics.perplexity / scores[best][0] - 1
        rows.append(f"| {budget} | {len(fitting)} | {evaluated} ({evaluated / len(fitting):.0%}) | "
                    f"{chosen.plan.recipe} | {chosen.metrics.perplexity:.3f} | {best} | {scores[best][0]:.3f} | "
                    f"{gap:+.2%} | {chosen.metrics.weight_bytes <= budget_bytes} | {seconds:.0f} s |")
        print(rows[-1], flush=True)

    if args.search_only:
        return
    print(f"\n{args.model}: fp32 weights {original:,} bytes; {args.tokens:,} evaluation tokens per plan\n")
    print("| budget | plans that fit | evaluated by the search | search's choice | perplexity | exhaustive best "
          "| perplexity | search vs best | within budget | search time |")
    print("|---|---:|---:|---|---:|---|---:|---:|---|---:|")
    print("\n".join(rows))


def workload_check(model, tokenizer, result, budget_bytes: int, calibration, tokens: int) -> None:
    """The chosen plan's tracked peak in the workload, and a weights-only search at the same budget."""
    from memfit.profile import profile
    from memfit.units import format_bytes

    work = copy.deepcopy(model)
    memfit.apply(work, result.best.plan, memfit.Context(calibration=calibration))
    tracked = profile(work, result.workload, result.best.plan.run).peak_bytes
    print(f"  workload search: {result.best.plan.recipe}, perplexity {result.best.metrics.perplexity:.3f}, "
          f"predicted peak {format_bytes(result.best.predicted_peak_bytes)}, tracked peak {format_bytes(tracked)} "
          f"({tracked:,} bytes; budget {budget_bytes:,}: {'within' if tracked <= budget_bytes else 'OVER'})",
          flush=True)
    weights_only = optimize(model, tokenizer, budget_bytes, calibration=calibration, num_tokens=tokens,
                            measure_speed=False)
    best = weights_only.best
    peak = memfit.estimate(model, best.plan, result.workload).peak_bytes
    print(f"  weights-only search: {best.plan.recipe}, perplexity {best.metrics.perplexity:.3f}, its workload peak "
          f"{format_bytes(peak)} ({'fits' if peak <= budget_bytes else 'over the budget'})", flush=True)
    for c in sorted((c for c in weights_only.candidates if c.metrics is not None and c.fits),
                    key=lambda c: c.metrics.perplexity):
        peak = memfit.estimate(model, c.plan, result.workload).peak_bytes
        if peak <= budget_bytes:
            print(f"  best weights-only plan that fits the workload: {c.plan.recipe}, perplexity "
                  f"{c.metrics.perplexity:.3f}", flush=True)
            break
    else:
        print("  no plan the weights-only search evaluated fits the workload", flush=True)


if __name__ == "__main__":
    main()
