import pytest

from memfit.errors import BudgetError
from memfit.units import format_bytes, parse_budget, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [("60MB", 60_000_000), ("1.5GiB", 1_610_612_736), ("123456", 123456), ("2 kib", 2048), ("0.5G", 500_000_000)],
)
def test_parse_bytes_reads_decimal_and_binary_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "12XB", "1.2.3GB", "-5MB"])
def test_parse_bytes_rejects_unreadable_sizes(text):
    with pytest.raises(BudgetError, match="cannot read size"):
        parse_bytes(text)


def test_parse_budget_takes_a_share_of_the_reference():
    assert parse_budget("25%", 1000) == 250
    assert parse_budget("60MB", 1) == 60_000_000


@pytest.mark.parametrize("text", ["0%", "0"])
def test_parse_budget_rejects_zero(text):
    with pytest.raises(BudgetError, match="not positive"):
        parse_budget(text, 1000)


def test_parse_budget_rejects_bad_percentage():
    with pytest.raises(BudgetError, match="cannot read budget"):
        parse_budget("abc%", 1000)


@pytest.mark.parametrize(
    ("num_bytes", "text"), [(999, "999 B"), (85_300_000, "85.3 MB"), (999_999, "1 MB"), (1_610_612_736, "1.61 GB")]
)
def test_format_bytes_uses_three_significant_digits(num_bytes, text):
    assert format_bytes(num_bytes) == text
