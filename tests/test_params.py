"""The params loader: every error names the key path and what was expected."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from conftest import REPO

from stages import params as P
from stages.params import Params, ParamsError, load_params, parse_params


def _flat_keys(cls, prefix=""):
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= _flat_keys(hints[f.name], key)
        else:
            keys.add(key)
    return keys


def _yaml_keys(node, prefix=""):
    keys = set()
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        # Mappings that are knob values (label_map, class_names) are leaves, not groups.
        keys |= _yaml_keys(v, key) if isinstance(v, dict) and v and key.count(".") < 2 and \
            key not in ("ingest.class_names", "ingest.local.label_map") else {key}
    return keys


def test_repo_params_load_and_cover_every_knob():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # params.yaml spells out every knob of the schema (the file is the reference users edit).
    assert _yaml_keys(raw) == _flat_keys(Params)


def test_repo_params_hold_the_schema_defaults():
    # params.yaml is the defaults written out: a value changed in one place and not the other fails
    assert load_params(REPO / "params.yaml") == Params()


def test_describe_documents_every_knob():
    lines = P.describe()
    assert len(lines) == len(_flat_keys(Params))
    assert all(": " in line and line.split(": ", 1)[1] for line in lines)


@pytest.mark.parametrize("raw, key, expected", [
    ({"shards": {"tile_sise": 64}}, "shards.tile_sise", "allowed keys in shards"),
    ({"ingest": {"synthetic": {"scenes": 3}}}, "ingest.synthetic.scenes", "allowed keys in ingest.synthetic"),
    ({"nonsense": {}}, "nonsense", "allowed keys in params.yaml"),
])
def test_unknown_keys_are_named(raw, key, expected):
    with pytest.raises(ParamsError, match="unknown key") as e:
        parse_params(raw)
    assert key in str(e.value) and expected in str(e.value)


@pytest.mark.parametrize("raw, key, expected", [
    ({"train": {"steps": "300"}}, "train.steps", "expected an integer"),
    ({"train": {"steps": 3.5}}, "train.steps", "expected an integer"),
    ({"aug": {"flip": 1}}, "aug.flip", "expected true or false"),
    ({"ingest": {"dataset": 3}}, "ingest.dataset", "expected a string"),
    ({"data": {"patch_sizes": 64}}, "data.patch_sizes", "expected a list"),
    ({"data": {"patch_sizes": [64, "x"]}}, "data.patch_sizes[1]", "expected an integer"),
    ({"ingest": {"local": {"label_map": [1, 2]}}}, "ingest.local.label_map", "expected a mapping"),
    ({"shards": 5}, "shards", "expected a mapping"),
])
def test_wrong_types_are_named(raw, key, expected):
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert str(e.value).startswith(key + ":") and expected in str(e.value)


@pytest.mark.parametrize("raw, key, expected", [
    ({"shards": {"tile_size": 8}}, "shards.tile_size", "[16, 8192]"),
    ({"shards": {"max_blank_fraction": 1.5}}, "shards.max_blank_fraction", "[0.0, 1.0]"),
    ({"ingest": {"synthetic": {"num_scenes": 0}}}, "ingest.synthetic.num_scenes", "[1, 100000]"),
    ({"ingest": {"local": {"bands": [0, 1, 2]}}}, "ingest.local.bands[0]", "[1, 64]"),
    ({"ingest": {"provider": "ftp"}}, "ingest.provider", "one of ['synthetic', 'local', 'remote']"),
    ({"export": {"fit_temperature": 0.0}}, "export.fit_temperature", "[0.001, 10.0]"),
])
def test_out_of_range_values_name_the_range(raw, key, expected):
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert str(e.value).startswith(key + ":") and expected in str(e.value)


def test_float_written_as_text_gets_a_hint(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string: the error must say so, not just "wrong type".
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  lr: 1e-3\n")
    with pytest.raises(ParamsError) as e:
        load_params(path)
    msg = str(e.value)
    assert str(path) in msg and "train.lr" in msg and "write 0.001" in msg
    path.write_text("train:\n  lr: 1.0e-3\n")
    assert load_params(path).train.lr == pytest.approx(0.001)


@pytest.mark.parametrize("raw, key", [
    ({"shards": {"group_regex": "t\\d+_"}}, "shards.group_regex"),          # no capture group
    ({"shards": {"group_regex": "t(\\d+"}}, "shards.group_regex"),          # does not compile
    ({"ingest": {"local": {"label_regex": "(["}}}, "ingest.local.label_regex"),
    ({"ingest": {"local": {"bands": [1, 2]}}}, "ingest.local.bands"),
    ({"ingest": {"local": {"label_map": {1: 300}}}}, "ingest.local.label_map"),
    ({"ingest": {"remote": {"urls": ["http://a/x.tif"], "windows": [[0, 0, 10]]}}}, "ingest.remote.windows[0]"),
    ({"ingest": {"remote": {"urls": ["http://a/x.tif"], "label_urls": ["a", "b"]}}}, "ingest.remote.label_urls"),
    ({"ingest": {"remote": {"urls": ["http://a/x.tif"], "bounds": [[1.0, 2.0, 0.5, 3.0]]}}}, "ingest.remote.bounds[0]"),
    ({"ingest": {"remote": {"urls": ["http://a/x.tif"], "bounds": [[0, 0, 1, 1]], "windows": [[0, 0, 1, 1]]}}},
     "ingest.remote.bounds"),
    ({"ingest": {"dataset": "../escape"}}, "ingest.dataset"),
    ({"ingest": {"class_names": {0: "void"}}}, "ingest.class_names"),
])
def test_cross_field_checks_name_the_key(raw, key):
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert str(e.value).startswith(key + ":")


def test_missing_and_invalid_files_name_the_file(tmp_path, capsys):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML") as e:
        load_params(bad)
    assert str(bad) in str(e.value)
    # The CLI check exits non-zero with the message on stderr.
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  steps: many\n")
    assert P.main([str(wrong)]) == 2
    assert "train.steps" in capsys.readouterr().err


def test_integer_mapping_keys_may_be_strings():
    # `dvc exp run -S '+ingest.class_names.1=building'` writes the key as the string '1'.
    params = parse_params({"ingest": {"class_names": {"1": "building", 2: "land"},
                                      "local": {"label_map": {"255": 0}}}})
    assert params.ingest.class_names == {1: "building", 2: "land"}
    assert params.ingest.local.label_map == {255: 0}
    with pytest.raises(ParamsError, match="ingest.class_names key 'one': expected an integer"):
        parse_params({"ingest": {"class_names": {"one": "building"}}})


def test_missing_keys_take_documented_defaults():
    params = parse_params({"train": {"steps": 7}})
    assert params.train.steps == 7
    assert params.shards == P.ShardsParams()
    assert parse_params(None) == Params()


@pytest.mark.parametrize("size", [2, 14, 1])
def test_cue_size_must_be_zero_or_odd(size):
    with pytest.raises(ParamsError, match=r"export\.cue_size: expected 0 \(no cue\) or an odd integer"):
        parse_params({"export": {"cue_size": size}})
