"""Parsing: compressor options, --apply specs, sizes, and budget negotiation."""

from __future__ import annotations

import pytest

from edgepack.errors import UsageError
from edgepack.interfaces import Option
from edgepack.memory import format_size, parse_size
from edgepack.planner import Budget, parse_apply
from edgepack.plugins.precision import Precision

from conftest import Halve

# ---------------------------------------------------------------------------------------------
# Option.parse


@pytest.mark.parametrize("option, raw, expected", [
    (Option("n", int), "8", 8),
    (Option("n", int), 8, 8),
    (Option("r", float, minimum=0.0, maximum=1.0), "0.25", 0.25),
    (Option("r", float, minimum=0.0, maximum=1.0), "1", 1.0),
    (Option("b", bool), "yes", True),
    (Option("b", bool), "TRUE", True),
    (Option("b", bool), "0", False),
    (Option("b", bool), "no", False),
    (Option("s", str, ("int8", "int4")), "int4", "int4"),
    (Option("g", int, (32, 64, 128)), "64", 64),
])
def test_option_parse_converts(option, raw, expected):
    value = option.parse(raw, "plug")
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("option, raw, message", [
    (Option("n", int), "eight", "option plug:n=eight is not a valid int"),
    (Option("n", int), "1.5", "option plug:n=1.5 is not a valid int"),
    (Option("r", float), "half", "option plug:r=half is not a valid float"),
    (Option("b", bool), "maybe", "option plug:b=maybe is not a valid bool"),
    (Option("s", str, ("int8", "int4")), "int3", "option plug:s=int3 is not one of int8|int4"),
    (Option("g", int, (32, 64)), "48", "option plug:g=48 is not one of 32|64"),
    (Option("r", float, minimum=0.0, maximum=1.0), "-0.1", "option plug:r=-0.1 is below its minimum 0.0"),
    (Option("r", float, minimum=0.0, maximum=1.0), "1.5", "option plug:r=1.5 is above its maximum 1.0"),
    (Option("r", float, minimum=0.0, maximum=1.0), "inf", "above its maximum"),
])
def test_option_parse_errors_name_plugin_key_and_value(option, raw, message):
    with pytest.raises(UsageError) as info:
        option.parse(raw, "plug")
    assert message in str(info.value)


def test_option_parse_refuses_nan_for_a_bounded_number():
    with pytest.raises(UsageError):
        Option("r", float, minimum=0.0, maximum=1.0).parse("nan", "plug")


def test_option_describe():
    assert Option("dtype", str, ("bf16", "fp16"), "bf16").describe() == "dtype=bf16|fp16 (default bf16)"
    assert Option("n", int).describe() == "n=INT"


# ---------------------------------------------------------------------------------------------
# Compressor.parse_options


def test_parse_options_fills_defaults():
    assert Precision().parse_options({}) == {"dtype": "bf16"}
    assert Precision().parse_options({"dtype": "fp16"}) == {"dtype": "fp16"}
    assert Halve().parse_options({"ratio": "0.75"}) == {"ratio": 0.75, "mode": "fast"}


def test_parse_options_unknown_key_lists_valid_options():
    with pytest.raises(UsageError) as info:
        Precision().parse_options({"dtyp": "bf16"})
    message = str(info.value)
    assert "plugin 'precision' has no option 'dtyp'" in message
    assert "valid options: dtype=bf16|fp16" in message


def test_parse_options_unknown_key_lists_every_option():
    with pytest.raises(UsageError) as info:
        Halve().parse_options({"speed": "1"})
    message = str(info.value)
    assert "'speed'" in message
    assert "ratio=FLOAT (default 0.5)" in message and "mode=fast|slow (default fast)" in message


def test_parse_options_bad_value_names_the_key():
    with pytest.raises(UsageError, match=r"option precision:dtype=int3 is not one of bf16\|fp16"):
        Precision().parse_options({"dtype": "int3"})


# ---------------------------------------------------------------------------------------------
# parse_apply


@pytest.mark.parametrize("spec, expected", [
    ("precision", ("precision", {})),
    (" precision ", ("precision", {})),
    ("precision:", ("precision", {})),
    ("precision:dtype=bf16", ("precision", {"dtype": "bf16"})),
    ("quantize:scheme=int4,group_size=64", ("quantize", {"scheme": "int4", "group_size": "64"})),
    ("prune: heads = 0.25 , ffn=0.5 ,", ("prune", {"heads": "0.25", "ffn": "0.5"})),
])
def test_parse_apply(spec, expected):
    assert parse_apply(spec) == expected


@pytest.mark.parametrize("spec, fragment", [
    ("", "names no plugin"),
    (":dtype=bf16", "names no plugin"),
    ("  :dtype=bf16", "names no plugin"),
    ("precision:dtype", "'dtype' is not KEY=VALUE"),
    ("precision:=bf16", "'=bf16' is not KEY=VALUE"),
    ("precision:dtype=bf16,fast", "'fast' is not KEY=VALUE"),
])
def test_parse_apply_malformed(spec, fragment):
    with pytest.raises(UsageError) as info:
        parse_apply(spec)
    assert fragment in str(info.value)
    assert repr(spec) in str(info.value)


def test_parse_apply_refuses_a_repeated_key():
    with pytest.raises(UsageError):
        parse_apply("precision:dtype=bf16,dtype=fp16")


# ---------------------------------------------------------------------------------------------
# parse_size


@pytest.mark.parametrize("text, expected", [
    ("30MB", 30_000_000),
    ("30mb", 30_000_000),
    ("30 MB", 30_000_000),
    ("1.5GiB", 1_610_612_736),
    ("512MiB", 512 * 2**20),
    ("512kb", 512_000),
    ("2KiB", 2048),
    ("512", 512),
    ("512B", 512),
    ("1G", 10**9),
    (".5MB", 500_000),
    (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["30XB", "-1", "0", "0.5", "0MB", "", "MB", "30 M B", "1e6", "1,000", "abc", 0, -5])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError) as info:
        parse_size(text, "--budget")
    assert str(info.value).startswith("--budget ")


def test_parse_size_message_shows_examples():
    with pytest.raises(UsageError, match=r"'30XB' is not a size; use bytes or a unit, e.g. 30MB"):
        parse_size("30XB", "--budget")


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(30_000_000) == "30.0 MB"
    assert format_size(None) == "-"


# ---------------------------------------------------------------------------------------------
# Budget negotiation


def test_budget_takes_the_smaller_and_says_which_binds():
    assert Budget(100, 50).bytes_per_device == 50 and Budget(100, 50).source == "target"
    assert Budget(30, 50).bytes_per_device == 30 and Budget(30, 50).source == "user"
    assert Budget(30, None).bytes_per_device == 30 and Budget(30, None).source == "user"
    assert Budget(None, 50).bytes_per_device == 50 and Budget(None, 50).source == "target"
    assert Budget(30, 50).to_json() == {"bytes_per_device": 30, "source": "user",
                                        "user_bytes": 30, "capacity_bytes": 50}
