from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klora_ext.args import FIELD_NAMES, FIELDS, KLoraArgs, infotext_labels
from klora_ext.errors import KLoraError


def test_fields_table_matches_the_model() -> None:
    # The table drives UI order, API positional order and infotext: it must list exactly the model's fields.
    assert [f.name for f in dataclasses.fields(KLoraArgs)] == list(FIELD_NAMES)
    defaults = KLoraArgs()
    for field in FIELDS:
        assert getattr(defaults, field.name) == field.default, field.name


def test_spec_defaults() -> None:
    a = KLoraArgs()
    assert (a.alpha, a.beta, a.method, a.schedule, a.clock, a.gamma_mode, a.scope) == (
        1.5,
        0.5,
        "k-lora",
        "linear",
        "step",
        "auto-mean",
        "all",
    )
    assert a.k_multiplier == 1.0
    assert a.enabled is False


def test_positional_in_ui_order_and_short_lists_keep_defaults() -> None:
    a = KLoraArgs.from_positional([True, "dog", 0.8, "ink", 1.2, 2.0])
    assert (a.enabled, a.content, a.content_weight, a.style, a.style_weight, a.alpha) == (
        True,
        "dog",
        0.8,
        "ink",
        1.2,
        2.0,
    )
    assert a.beta == 0.5


def test_script_args_dict_form() -> None:
    a = KLoraArgs.from_script_args([{"enabled": True, "content": "dog", "style": "ink", "beta": "0.7"}, False, "x"])
    assert a.enabled and a.content == "dog" and a.style == "ink" and a.beta == 0.7


def test_dict_with_unknown_key_names_it_and_lists_valid_names() -> None:
    with pytest.raises(KLoraError, match=r"\[K-LoRA\] unknown argument\(s\) 'alhpa'.*valid names: enabled"):
        KLoraArgs.from_dict({"alhpa": 1.0})


def test_too_many_positional_values() -> None:
    with pytest.raises(KLoraError, match="got 18 positional arguments, at most 17"):
        KLoraArgs.from_positional([False] + [""] * 17)


def test_dict_not_first_is_rejected() -> None:
    with pytest.raises(KLoraError, match="dict argument must be the only"):
        KLoraArgs.from_script_args([True, {"content": "a"}])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("alpha", -0.1, r"'alpha' must be in \[0.0, 10.0\], got -0.1"),
        ("alpha", "abc", r"'alpha' must be a number from 0.0 to 10.0, got 'abc'"),
        ("alpha", True, r"'alpha' must be a number"),
        ("beta", float("nan"), r"'beta' must be in"),
        ("k_multiplier", 0, r"'k_multiplier' must be in \(0.0, 64.0\]"),
        ("method", "best", r"'method' must be one of k-lora, fixed, random, content-only, style-only, merge"),
        ("schedule", 3, r"'schedule' must be one of linear, s\*"),
        ("enabled", "maybe", r"'enabled' must be true or false"),
        ("content", 12, r"'content' must be a LoRA name"),
        ("content_weight", 5, r"'content_weight' must be in \[-4.0, 4.0\]"),
    ],
)
def test_bad_values_name_the_field_and_range(field: str, value: object, message: str) -> None:
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\] " + message):
        KLoraArgs(**{field: value})


def test_gamma_is_checked_in_manual_mode_only() -> None:
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\] 'gamma' must be in \(0.0, 1000000.0\]"):
        KLoraArgs(gamma_mode="manual", gamma=0.0)
    for junk in (None, 0, -3, "", 10**400):  # the Gamma box emptied or left at 0 while another mode is chosen
        assert KLoraArgs(gamma_mode="auto-mean", gamma=junk).gamma == 1.0
    assert KLoraArgs(gamma_mode="auto-sum", gamma=2.5).gamma == 2.5


def test_enabled_is_read_alone() -> None:
    assert KLoraArgs.enabled_in([False, "", "junk", None]) is False
    assert KLoraArgs.enabled_in([{"enabled": "true", "alpha": "fast"}]) is True
    assert KLoraArgs.enabled_in([]) is False and KLoraArgs.enabled_in([{}]) is False
    with pytest.raises(KLoraError, match="'enabled'"):
        KLoraArgs.enabled_in(["maybe"])


def test_huge_integers_are_a_clear_error() -> None:
    with pytest.raises(KLoraError, match=r"'alpha' must be a number"):
        KLoraArgs(alpha=10**400)


def test_string_coercion_and_aliases() -> None:
    a = KLoraArgs(enabled="true", alpha="2", scope="All shared layers", method="KLoRA", hires="keep final choices")
    assert a.enabled is True and a.alpha == 2.0 and a.scope == "all" and a.method == "k-lora" and a.hires == "keep"


def test_s_star_needs_positive_alpha() -> None:
    with pytest.raises(KLoraError, match="modulo alpha"):
        KLoraArgs(schedule="s*", alpha=0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no LoRAs chosen"),
        ({"content": "a"}, "only one LoRA chosen: pick a style LoRA"),
        ({"style": "b"}, "only one LoRA chosen: pick a content LoRA"),
        ({"content": "a", "style": "a"}, "the same LoRA 'a' is chosen as content and style"),
    ],
)
def test_check_runnable_messages(kwargs: dict, message: str) -> None:
    with pytest.raises(KLoraError, match=message):
        KLoraArgs(enabled=True, **kwargs).check_runnable()


def test_infotext_is_short_and_round_trips() -> None:
    a = KLoraArgs(enabled=True, content="dog, v2", style="ink", alpha=2.25, method="fixed")
    info = a.to_infotext("abc123", "def456")
    # Defaults are omitted; names and hashes always written.
    assert info == {
        "K-LoRA": "v1",
        "K-LoRA content": "dog, v2",
        "K-LoRA style": "ink",
        "K-LoRA alpha": "2.25",
        "K-LoRA method": "fixed",
        "K-LoRA content hash": "abc123",
        "K-LoRA style hash": "def456",
    }
    assert KLoraArgs.from_infotext(info) == a
    assert KLoraArgs.from_infotext({"Steps": "20"}) is None
    assert KLoraArgs(enabled=False, content="x").to_infotext() == {}


def test_manual_gamma_written_only_in_manual_mode() -> None:
    assert "K-LoRA gamma" not in KLoraArgs(enabled=True, content="a", style="b", gamma=2.0).to_infotext()
    info = KLoraArgs(enabled=True, content="a", style="b", gamma_mode="manual", gamma=2.0).to_infotext()
    assert info["K-LoRA gamma"] == "2" and info["K-LoRA gamma mode"] == "manual"


def test_infotext_labels_are_unique() -> None:
    labels = list(infotext_labels().values())
    assert len(labels) == len(set(labels))


_finite = st.floats(allow_nan=False, allow_infinity=False)


@given(
    alpha=st.floats(0.0, 10.0),
    beta=st.floats(-10.0, 10.0),
    k=st.floats(1e-3, 64.0),
    weight=st.floats(-4.0, 4.0),
    method=st.sampled_from(["k-lora", "fixed", "random", "content-only", "style-only", "merge"]),
    hires=st.sampled_from(["restart", "continue", "keep"]),
)
def test_infotext_round_trip_property(
    alpha: float, beta: float, k: float, weight: float, method: str, hires: str
) -> None:
    a = KLoraArgs(
        enabled=True,
        content="c",
        style="s",
        alpha=alpha,
        beta=beta,
        k_multiplier=k,
        style_weight=weight,
        method=method,
        hires=hires,
    )
    # infotext values are strings after a PNG round trip
    parsed = KLoraArgs.from_infotext({k2: str(v) for k2, v in a.to_infotext().items()})
    assert parsed == a


def test_replace_validates() -> None:
    a = KLoraArgs()
    assert a.replace(alpha="3").alpha == 3.0
    with pytest.raises(KLoraError, match="'beta' must be in"):
        a.replace(beta=99)
    with pytest.raises(KLoraError, match="unknown argument"):
        a.replace(bogus=1)
