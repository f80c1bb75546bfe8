"""The typed-config mechanism shared by the serving and training configs (gadget/data/typed_config.py):
one conversion from raw values to annotated types, choices declared beside their fields, one YAML loader."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from gadget.data.typed_config import (check_choice, choice, choices_of, convert, convert_field, load_yaml_mapping,
                                      presets_folder, yaml_stems)


class Bad(ValueError):
    pass


def conv(value, annotation, **kw):
    return convert(value, annotation, name="x", source="test", error=Bad, **kw)


@pytest.mark.parametrize("raw, out", [(True, True), (False, False), ("true", True), ("Yes", True), ("on", True),
                                      ("1", True), (1, True), ("false", False), ("NO", False), ("off", False),
                                      ("0", False), (0, False), (" true ", True)])
def test_bool(raw, out):
    assert conv(raw, bool) is out


@pytest.mark.parametrize("raw", ["maybe", "2", 2, None, [True], {}])
def test_bool_rejects(raw):
    with pytest.raises(Bad, match=r"test: setting 'x' = .* is not a valid bool"):
        conv(raw, bool)


@pytest.mark.parametrize("raw, out", [(3, 3), ("3", 3), (" 7 ", 7), (4.0, 4), ("-2", -2)])
def test_int(raw, out):
    got = conv(raw, int)
    assert got == out and type(got) is int


@pytest.mark.parametrize("raw", [True, False, 2.5, "2.5", "many", None, [1], ""])
def test_int_rejects_bools_fractions_and_words(raw):
    with pytest.raises(Bad, match="is not a valid int"):
        conv(raw, int)


@pytest.mark.parametrize("raw, out", [(3, 3.0), ("1e-3", 1e-3), (2.5, 2.5), ("inf", float("inf"))])
def test_float(raw, out):
    got = conv(raw, float)
    assert got == out and type(got) is float


@pytest.mark.parametrize("raw", [True, "fast", None, [1.0], {"a": 1}])
def test_float_rejects(raw):
    with pytest.raises(Bad, match="is not a valid float"):
        conv(raw, float)


def test_str_takes_scalars_and_refuses_containers_and_null():
    assert conv("abc", str) == "abc" and conv(12, str) == "12"
    for raw in (None, ["a"], {"a": 1}):
        with pytest.raises(Bad, match="is not a valid str"):
            conv(raw, str)


def test_optional_takes_none_null_and_empty_as_none():
    for raw in (None, "none", "NULL", "", " null "):
        assert conv(raw, Optional[int]) is None
    assert conv("5", Optional[int]) == 5 and conv("a.pt", Optional[str]) == "a.pt"
    with pytest.raises(Bad, match="is not a valid int"):
        conv("five", Optional[int])


def test_lists_take_yaml_lists_comma_strings_and_single_values():
    assert conv([4, "8"], list[float]) == [4.0, 8.0]
    assert conv("a, b,,c", list[str]) == ["a", "b", "c"]
    assert conv("0.08", list[float]) == [0.08]
    assert conv(3, list[int]) == [3]
    assert conv((1, 2), list[int]) == [1, 2]
    with pytest.raises(Bad, match=r"setting 'x' = 'b' is not a valid int"):
        conv("1,b", list[int])


def test_choices_are_checked_after_conversion_and_named_in_the_message():
    assert conv("fast", str, choices=("fast", "slow")) == "fast"
    with pytest.raises(Bad, match=r"^test: setting 'x' = 'medium' must be one of fast, slow$"):
        conv("medium", str, choices=("fast", "slow"))
    assert conv("a,b", list[str], choices=("a", "b")) == ["a", "b"]
    with pytest.raises(Bad, match="'c' must be one of a, b"):
        conv("a,c", list[str], choices=("a", "b"))


def test_joined_choices_accept_several_values_joined_by_commas():
    assert check_choice("a, b", ("a", "b"), name="m", source="s", joined=",") == "a, b"
    with pytest.raises(ValueError, match=r"s: setting 'm' = 'a,z' must be one of a, b, or several joined by commas"):
        check_choice("a,z", ("a", "b"), name="m", source="s", joined=",")
    with pytest.raises(ValueError, match="must be one of a, b$"):
        check_choice("a,b", ("a", "b"), name="m", source="s")


@dataclass(frozen=True)
class Example:
    speed: str = choice("fast", ("fast", "slow"))  # a choice field
    kinds: str = choice("a", ("a", "b"), joined=",")
    count: int = 1
    names: list[str] = field(default_factory=list)
    path: Optional[str] = None


def test_choices_live_in_the_field_metadata_and_read_back_per_class():
    assert choices_of(Example) == {"speed": ("fast", "slow"), "kinds": ("a", "b")}
    assert choices_of(Example()) == choices_of(Example)
    assert Example().speed == "fast"


def test_convert_field_uses_the_annotation_and_the_declared_choices():
    assert convert_field(Example, "count", "4", source="s") == 4
    assert convert_field(Example, "names", "p,q", source="s") == ["p", "q"]
    assert convert_field(Example, "path", "null", source="s") is None
    assert convert_field(Example, "kinds", "a,b", source="s") == "a,b"
    with pytest.raises(Bad, match=r"cfg: setting 'sec.speed' = 'warp' must be one of fast, slow"):
        convert_field(Example, "speed", "warp", source="cfg", error=Bad, name="sec.speed")


def test_yaml_loader_reads_text_and_files(tmp_path):
    assert load_yaml_mapping("a: 1\nb: [2, 3]\n", "t") == {"a": 1, "b": [2, 3]}
    assert load_yaml_mapping("", "t") == {} and load_yaml_mapping("# nothing\n", "t") == {}
    f = tmp_path / "c.yaml"
    f.write_text("x: y\n")
    assert load_yaml_mapping(f) == {"x": "y"}


def test_yaml_loader_errors_name_the_source(tmp_path):
    with pytest.raises(Bad, match=r"^preset p: not valid YAML \("):
        load_yaml_mapping("mode: [unclosed", "preset p", error=Bad)
    with pytest.raises(Bad, match=r"^preset p: expected a mapping of settings, got list$"):
        load_yaml_mapping("- a\n- b\n", "preset p", error=Bad)
    f = tmp_path / "list.yaml"
    f.write_text("3\n")
    with pytest.raises(Bad, match=rf"^{f}: expected a mapping of sections, got int$"):
        load_yaml_mapping(f, error=Bad, what="sections")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(Bad, match=rf"cannot read {missing}"):
        load_yaml_mapping(missing, error=Bad)


def test_presets_folder_is_the_pipelines_package():
    import gadget.pipelines

    assert presets_folder() == Path(gadget.pipelines.__file__).resolve().parent
    assert presets_folder("train") == presets_folder() / "train"
    assert yaml_stems(presets_folder()) == sorted(p.stem for p in presets_folder().glob("*.yaml"))


def test_both_configs_use_it_and_reject_an_unknown_choice_naming_the_field():
    from gadget.recon.config import CHOICES, ConfigError, ReconConfig
    from gadget.train.config import MASK_KINDS, TrainConfigError, build_config

    assert CHOICES == choices_of(ReconConfig)
    assert set(CHOICES) == {"mode", "image_dtype", "acs_source", "precision", "fallback", "also_send",
                            "noise_units", "refine", "adapt"}
    with pytest.raises(ConfigError, match=r"preset q: setting 'image_dtype' = 'int16' must be one of float32, uint16"):
        ReconConfig().merged({"image_dtype": "int16"}, "preset q")
    assert ReconConfig().merged({"prewhiten": "off", "batch_size": "2"}, "s").batch_size == 2
    with pytest.raises(TrainConfigError, match=r"setting 'loss\.kind' = 'l2' must be one of ssim, l1"):
        build_config({"loss": {"kind": "l2"}})
    with pytest.raises(TrainConfigError, match=r"setting 'run\.amp' = 'fp8' must be one of off, bf16, fp16"):
        build_config({}, ["run.amp=fp8"])
    with pytest.raises(TrainConfigError, match=r"setting 'model\.variant' = 'vnx' must be one of e2e, vnu-k"):
        build_config({}, ["model.variant=vnx"])
    with pytest.raises(TrainConfigError, match=r"setting 'data\.mask' = 'random,radial' must be one of "
                                               + ", ".join(MASK_KINDS) + ", or several joined by commas"):
        build_config({}, ["data.mask=random,radial"])
    assert build_config({}, ["data.mask=random, equispaced"]).data.mask == "random, equispaced"
