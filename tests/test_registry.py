"""The recipe grammars: every documented token is accepted by exactly one strategy or run setting,
and the help texts and the README's recipe table are the registry's."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

import memfit
from memfit.errors import RecipeError
from memfit.settings import SETTINGS, RunSettings
from memfit.strategies.registry import claims, parse_token, strategy_classes

README = Path(__file__).resolve().parents[1] / "README.md"

# values tried for each placeholder of a documented form (the first that parses is enough; every
# one must be claimed by at most one strategy)
PLACEHOLDERS = {
    "NofM": ["2of4"],
    "METHOD": ["magnitude", "wanda", "sparsegpt"],
    "N": ["128", "2"],
    "P": ["50"],
    "S": ["mlp", "attn", "all"],
    "E": ["90"],
    "B": ["6"],
    "K": ["2"],
    "R": ["8"],
    "A": ["0.6", "16"],
}


def _optional_parts(form: str) -> list[str]:
    """Every spelling of ``form`` with its bracketed parts (nested too) present or absent."""
    match = re.search(r"\[([^\[\]]*)\]", form)
    if match is None:
        return [form]
    before, after = form[: match.start()], form[match.end() :]
    return _optional_parts(before + match.group(1) + after) + _optional_parts(before + after)


def concrete_tokens(form: str) -> list[str]:
    """Concrete tokens for one documented form such as ``int4-gN[-awq][-gptq]``."""
    tokens = []
    for spelling in (s for alternative in form.split("|") for s in _optional_parts(alternative)):
        names = [name for name in PLACEHOLDERS if name in spelling]
        for values in itertools.product(*(PLACEHOLDERS[name] for name in names)):
            token = spelling
            for name, value in zip(names, values, strict=True):
                token = token.replace(name, value)
            tokens.append(token)
    return tokens


def _parses(token: str) -> bool:
    try:
        memfit.Plan.parse(token)
    except RecipeError:
        return False
    return True


def _claimants(token: str) -> list[str]:
    """Names of every strategy class and run setting that claims ``token``."""
    names = [cls.__name__ for cls, _ in claims(token)]
    for setting in SETTINGS:
        try:
            if setting.parse(token) is not None:
                names.append(f"setting {setting.name}")
        except RecipeError:
            names.append(f"setting {setting.name}")
    return names


def _readme_forms() -> list[str]:
    rows = [line.split("|")[1] for line in README.read_text().splitlines() if line.startswith("| `")]
    return [form for row in rows for form in re.findall(r"`([^`]+)`", row) if not form.startswith("...")]


@pytest.mark.parametrize("cls", strategy_classes(), ids=lambda cls: cls.__name__)
def test_every_declared_form_is_accepted_by_exactly_its_strategy(cls):
    for form in cls.forms.split("|"):
        tokens = concrete_tokens(form)
        for token in tokens:
            claimers = _claimants(token)
            assert claimers in ([cls.__name__], []), f"{token!r} is claimed by {claimers}"
        parsed = [parse_token(t) for t in tokens if _parses(t)]
        assert parsed, f"no spelling of {form!r} parses: {tokens}"
        assert all(type(s) is cls for s in parsed)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_run_setting_form_is_accepted_by_exactly_that_setting(setting):
    for form in setting.forms.split("|"):
        tokens = concrete_tokens(form)
        for token in tokens:
            assert _claimants(token) in ([f"setting {setting.name}"], []), token
        parsed = [memfit.Plan.parse(t) for t in tokens if _parses(t)]
        assert parsed and all(p.strategies == () and getattr(p.settings, setting.field) is not None for p in parsed)
        assert all(memfit.Plan.parse(p.recipe) == p for p in parsed)  # tokens round-trip


@pytest.mark.parametrize("form", _readme_forms())
def test_every_readme_token_is_accepted_by_exactly_one_strategy_or_setting(form):
    tokens = concrete_tokens(form)
    for token in tokens:
        assert len(_claimants(token)) <= 1, f"{token!r} is claimed by {_claimants(token)}"
    assert any(_parses(t) for t in tokens), f"README token {form!r} does not parse: {tokens}"


def test_every_strategy_and_setting_has_a_row_in_the_readme_table():
    tokens = [t for form in _readme_forms() for t in concrete_tokens(form) if _parses(t)]
    assert {type(s) for t in tokens for s in memfit.Plan.parse(t).strategies} == set(strategy_classes())
    set_fields = {s.field for t in tokens for s in SETTINGS if getattr(memfit.Plan.parse(t).settings, s.field)}
    assert set_fields == {s.field for s in SETTINGS}


def test_run_settings_are_typed_and_their_files_fail_on_unknown_keys():
    plan = memfit.Plan.parse("int4-g128,lora-8,adamw-8bit,grad-accum-2,bf16-autocast")
    assert plan.recipe == "int4-g128,lora-8,bf16-autocast,adamw-8bit,grad-accum-2"
    assert plan.settings == RunSettings(optimizer=memfit.OptimizerKind.ADAMW_8BIT, micro_batches=2,
                                        autocast=memfit.Precision.BF16)
    assert memfit.Plan.from_dict(plan.to_dict()) == plan
    assert memfit.Plan.parse("bf16-master").run.master_weights
    with pytest.raises(RecipeError, match=r"unknown run setting\(s\) \['optimiser'\]"):
        memfit.Plan.from_dict({"settings": {"optimiser": "sgd"}})
    with pytest.raises(RecipeError, match=r"recipe uses 'optimizer' twice \('adafactor'\)"):
        memfit.Plan.parse("sgd,adafactor")


def test_recipe_files_written_with_settings_as_strategies_still_load():
    legacy = {"strategies": [{"strategy": "int8", "version": 1}, {"strategy": "optimizer", "version": 1, "kind": "sgd"},
                             {"strategy": "grad-accum", "version": 1, "steps": 4}]}
    assert memfit.Plan.from_dict(legacy) == memfit.Plan.parse("int8,sgd,grad-accum-4")


def test_every_example_token_round_trips_through_its_own_class():
    for cls in strategy_classes():
        for example in cls.examples():
            assert [c for c, _ in claims(example.token)] == [cls]
            assert parse_token(example.token) == example


def test_a_token_claimed_twice_is_a_bug_not_a_recipe_error(monkeypatch):
    from memfit.strategies import registry

    class Greedy(memfit.Cast):
        name = "greedy"

        @classmethod
        def from_token(cls, token):
            return cls() if token == "bf16" else None

    monkeypatch.setitem(registry._REGISTRY, "greedy", Greedy)
    with pytest.raises(AssertionError, match=r"'bf16' is claimed by \['Cast', 'Greedy'\]"):
        parse_token("bf16")


def test_a_strategy_without_a_grammar_cannot_register():
    from memfit.strategies.registry import register

    class Bare(memfit.Cast):
        name = "bare"
        forms = None

    with pytest.raises(ValueError, match="Bare declares no forms"):
        register(Bare)


def test_compress_and_validate_help_list_every_token_family(capsys):
    from memfit.cli.main import main

    for command in ("compress", "validate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for forms in [cls.forms for cls in strategy_classes()] + [s.forms for s in SETTINGS]:
            assert ", ".join(forms.split("|")) in text, f"memfit {command} --help lacks {forms}"


def test_train_help_tokens_parse():
    from memfit.cli.train import EPILOG

    block = EPILOG.split("\n\n")[0].splitlines()[1:]
    listed = [t.strip() for line in block if line.startswith("  ") and not line.startswith("   ")
              for t in re.split(r"\s{2,}", line.strip())[0].split(",")]
    tokens = [t.replace(" (default)", "") for t in listed]
    assert len(tokens) >= 12
    for token in tokens:
        assert any(_parses(t) for t in concrete_tokens(token)), token


def test_memfit_exports_every_strategy_class():
    exported = {getattr(memfit, name) for name in memfit.__all__}
    missing = [cls.__name__ for cls in strategy_classes() if cls not in exported]
    assert not missing, f"add to memfit.__all__: {missing}"
