"""``memfit validate``: check a recipe without loading any weights, and print it as JSON or YAML."""

from __future__ import annotations

import argparse

from memfit.cli import console, options

EPILOG = """\
examples:
  memfit validate int4-g128,bf16
  memfit validate recipe.yaml --yaml"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "validate", help="check a recipe and print it in full",
        description=__doc__.split("``: ")[1], epilog=options.token_help() + "\n\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", metavar="RECIPE", help="comma-separated tokens or a .json/.yaml file")
    parser.add_argument("--yaml", action="store_true", help="print YAML instead of JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from memfit.plan import Plan

    plan = Plan.parse(args.recipe)
    console.stdout.out(plan.to_yaml() if args.yaml else plan.to_json(), highlight=False)
    return 0
