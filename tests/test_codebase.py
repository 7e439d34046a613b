"""Codebase rules from STYLE.md that a test can hold: module size cap, no grab-bag modules."""

from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "memfit"
MAX_LINES = 600


def test_no_module_exceeds_the_line_cap():
    too_long = {p.name: n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"split these modules by concept: {too_long}"


def test_no_grab_bag_modules():
    banned = {"utils.py", "helpers.py", "common.py"}
    assert not [p for p in SRC.rglob("*.py") if p.name in banned]
