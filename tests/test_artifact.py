"""The artifact contract: what write_artifact writes, load_artifact accepts, and every way it refuses."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from runtime_fixtures import encoder_meta, random_encoder, write_encoder_artifact

from runtime.artifact import FORMAT_NAME, SUPPORTED_VERSIONS, build_meta, load_artifact, write_artifact
from runtime.errors import ArtifactError, OutputExistsError


@pytest.fixture(scope="module")
def encoder():
    return random_encoder(width=16, depth=1, embed_dim=8)


@pytest.fixture
def artifact(tmp_path, encoder):
    return write_encoder_artifact(tmp_path / "best", encoder)


def _rewrite_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (path / "meta.json").write_text(json.dumps(meta))


def _rewrite_arrays(path, mutate):
    with np.load(path / "model.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    mutate(arrays)
    np.savez(path / "model.npz", **arrays)


def test_round_trip_keeps_layers_arrays_meta_and_metrics(artifact, encoder):
    layers, arrays = encoder.export_layers()
    art = load_artifact(artifact)
    assert art.layers == layers
    assert set(art.arrays) == set(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(art.arrays[key], value)
        assert art.arrays[key].dtype == np.float32
    assert art.meta["format"] == FORMAT_NAME and art.meta["format_version"] in SUPPORTED_VERSIONS
    assert art.meta["receptive_field"] == encoder.receptive_field
    assert art.meta["provenance"] == {"git_commit": "test", "params_hash": "test",
                                      "created": "2026-01-01T00:00:00+00:00"}
    assert art.meta["source"] == "test"  # informational keys are kept
    assert art.metrics == {"note": "random weights"}
    assert load_artifact(artifact / "model.npz").meta == art.meta  # a file path inside works too


def test_same_inputs_give_byte_identical_files(tmp_path, encoder):
    a = write_encoder_artifact(tmp_path / "a", encoder)
    b = write_encoder_artifact(tmp_path / "b", encoder)
    for name in ("model.npz", "meta.json", "metrics.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_precomputed_centres_are_stored_and_validated(tmp_path, encoder):
    c = np.eye(3, 8, dtype=np.float32)
    art = load_artifact(write_encoder_artifact(tmp_path / "c", encoder, centres={3: c}))
    np.testing.assert_array_equal(art.centres(3), c)
    assert art.centres(4) is None
    with pytest.raises(ArtifactError, match=r"centres_k3.*shape"):
        write_encoder_artifact(tmp_path / "d", encoder, centres={3: np.eye(3, 7)})
    with pytest.raises(ArtifactError, match=r"centres_k9.*outside 2\.\.max_k=8"):
        write_encoder_artifact(tmp_path / "e", encoder, centres={9: np.eye(9, 8)})
    with pytest.raises(ArtifactError, match="unit vectors"):
        write_encoder_artifact(tmp_path / "f", encoder, centres={2: 2 * np.eye(2, 8)})


def test_write_refuses_existing_destination_and_leaves_no_temporaries(tmp_path, encoder):
    layers, arrays = encoder.export_layers()
    dst = write_encoder_artifact(tmp_path / "best", encoder)
    with pytest.raises(OutputExistsError, match="exists"):
        write_artifact(dst, layers=layers, arrays=arrays, meta=encoder_meta(encoder), metrics={})
    write_artifact(dst, layers=layers, arrays=arrays, meta=encoder_meta(encoder), metrics={"x": 1},
                   overwrite=True)
    assert load_artifact(dst).metrics == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_write_validates_before_touching_the_destination(tmp_path, encoder):
    layers, arrays = encoder.export_layers()
    arrays.pop("head.bias")
    with pytest.raises(ArtifactError, match="missing array 'head.bias'"):
        write_artifact(tmp_path / "best", layers=layers, arrays=arrays, meta=encoder_meta(encoder), metrics={})
    assert not any(tmp_path.iterdir())
    with pytest.raises(ArtifactError, match="clash"):
        build_meta(**{**_meta_kwargs(encoder), "stride": 4})


def _meta_kwargs(enc):
    meta = encoder_meta(enc)
    prov = meta.pop("provenance")
    meta.pop("stride")
    meta.pop("source")
    return {**meta, "git_commit": prov["git_commit"], "params_hash": prov["params_hash"]}


def test_truncated_npz_is_rejected(artifact):
    data = (artifact / "model.npz").read_bytes()
    (artifact / "model.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"model\.npz: truncated or not a valid npz"):
        load_artifact(artifact)


def test_npz_that_needs_pickle_is_rejected(artifact):
    with zipfile.ZipFile(artifact / "model.npz", "a") as zf:
        import io
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        zf.writestr("evil.npy", buf.getvalue())
    with pytest.raises(ArtifactError, match="model.npz"):
        load_artifact(artifact)


def test_missing_array_is_rejected(artifact):
    _rewrite_arrays(artifact, lambda a: a.pop("stem.1.weight"))
    with pytest.raises(ArtifactError, match=r"missing array 'stem\.1\.weight' of shape \(16, 8, 3, 3\)"):
        load_artifact(artifact)


def test_wrong_array_shape_is_rejected(artifact):
    def shrink(a):
        a["head.weight"] = a["head.weight"][:4]
    _rewrite_arrays(artifact, shrink)
    with pytest.raises(ArtifactError, match=r"'head\.weight' has shape \(4, 16, 1, 1\), expected \(8, 16, 1, 1\)"):
        load_artifact(artifact)


def test_wrong_dtype_and_unexpected_arrays_are_rejected(artifact):
    def to64(a):
        a["head.bias"] = a["head.bias"].astype(np.float64)
    _rewrite_arrays(artifact, to64)
    with pytest.raises(ArtifactError, match="'head.bias' must be a float32 array"):
        load_artifact(artifact)
    _rewrite_arrays(artifact, lambda a: a.update({"head.bias": a["head.bias"].astype(np.float32),
                                                  "stray": np.zeros(3, np.float32)}))
    with pytest.raises(ArtifactError, match="unexpected array 'stray'"):
        load_artifact(artifact)


def test_unknown_format_version_names_the_supported_ones(artifact):
    _rewrite_meta(artifact, format_version=99)
    with pytest.raises(ArtifactError, match=r"unknown format_version 99; this runtime supports version\(s\) 1"):
        load_artifact(artifact)
    _rewrite_meta(artifact, format_version=1, format="something-else")
    with pytest.raises(ArtifactError, match="'format' is 'something-else'"):
        load_artifact(artifact)


@pytest.mark.parametrize("key,value,message", [
    ("temperature", None, "missing key 'temperature'"),
    ("max_k", 1, r"'max_k' must be an integer in \[2, 254\]"),
    ("input_std", [1, 0, 1], "'input_std' must be a list of 3 numbers > 0"),
    ("embed_dim", 9, "layers output 8 channels but embed_dim is 9"),
    ("receptive_field", 3, "smaller than the layers'"),
    ("stride", 2, "'stride' must be the integer 4"),
    ("provenance", {"git_commit": "x"}, "'provenance' must be"),
    ("smooth_colour_sigma", -0.1, r"'smooth_colour_sigma' must be null or a number in \[0, 10\]"),
    ("smooth_colour_sigma", "0.1", r"'smooth_colour_sigma' must be null or a number"),
    ("smooth_colour_floor", 1.5, r"'smooth_colour_floor' must be null or a number in \[0, 1\]"),
    ("label_colour_sigma", -0.05, r"'label_colour_sigma' must be null or a number in \[0, 10\]"),
])
def test_bad_meta_values_are_rejected(artifact, key, value, message):
    _rewrite_meta(artifact, **{key: value})
    with pytest.raises(ArtifactError, match=message):
        load_artifact(artifact)


def test_inconsistent_layers_are_rejected(artifact):
    meta = json.loads((artifact / "meta.json").read_text())
    meta["layers"][1]["in"] = 5
    (artifact / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"stem\.1\): expects 5 input channels but receives 8"):
        load_artifact(artifact)
    meta["layers"][1]["in"] = 8
    meta["layers"].append({"op": "softmax"})
    (artifact / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="l2norm must be the last|unknown op"):
        load_artifact(artifact)


def test_missing_files_and_bad_json_are_rejected(tmp_path, artifact):
    with pytest.raises(ArtifactError, match="directory not found"):
        load_artifact(tmp_path / "nowhere")
    (artifact / "meta.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"meta\.json: not readable JSON"):
        load_artifact(artifact)
    (artifact / "metrics.json").unlink()
    with pytest.raises(ArtifactError, match="missing metrics.json"):
        load_artifact(artifact)
