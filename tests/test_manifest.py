import pytest

from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.data.manifest import (Manifest, fingerprint_file, fingerprint_tree, read_manifest, require,
                                   staging_name, write_manifest)


def test_roundtrip_and_require(tmp_path):
    art = tmp_path / "table"
    art.mkdir()
    write_manifest(art, Manifest(kind="mm_table", stage="mfm", dim=8,
                                 extra={"encoder_fingerprint": "abc"}))
    assert read_manifest(art).dim == 8
    require(art, kind="mm_table", dim=8, extra__encoder_fingerprint="abc")
    with pytest.raises(ManifestMismatch, match="encoder_fingerprint"):
        require(art, extra__encoder_fingerprint="other")


def test_missing_manifest_is_refused(tmp_path):
    with pytest.raises(ManifestMismatch, match="no manifest"):
        read_manifest(tmp_path)


def test_a_path_that_does_not_exist_is_named_as_such(tmp_path):
    """It read "no manifest at ABSENT/manifest.json; was it produced by mim_rec?", which sent a
    user with a typo in encoders= to wonder how the folder had been made."""
    with pytest.raises(ManifestMismatch, match=r"absent: no such file or folder$"):
        read_manifest(tmp_path / "absent")


def test_a_run_folder_given_for_its_artifact_names_the_artifacts_inside(tmp_path):
    """``encoders=RUN/pretrain`` for ``RUN/pretrain/encoders``: the refusal says which folder to give."""
    for name, kind in (("encoders", "encoders"), ("dda", "encoders")):
        write_manifest(tmp_path / "run" / name, Manifest(kind=kind, stage="pretrain"))
    (tmp_path / "run" / "checkpoints").mkdir()
    with pytest.raises(ManifestMismatch) as refused:
        require(tmp_path / "run", kind="encoders")
    assert str(refused.value).endswith(
        f"It holds the artifact(s) {tmp_path / 'run' / 'dda'} (kind 'encoders'), "
        f"{tmp_path / 'run' / 'encoders'} (kind 'encoders'): give the one meant.")


def test_fingerprint_changes_with_content(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    before = fingerprint_file(f)
    f.write_bytes(b"abd")
    assert fingerprint_file(f) != before


def test_data_error_names_location():
    err = DataError("events.parquet", "null id", row=7, field="user_id")
    assert str(err) == "events.parquet, row 7, field 'user_id': null id"


def test_a_file_a_killed_writer_left_is_not_part_of_a_folders_fingerprint(tmp_path):
    """A table build killed while writing a shard or its state left its staged file behind;
    mim train recorded the table's fingerprint with it, and refused to resume once it was
    deleted. A manifest was staged under a visible name."""
    (tmp_path / "part-0.parquet").write_bytes(b"rows")
    clean = fingerprint_tree(tmp_path)
    staging_name(tmp_path / "part-1.parquet").write_bytes(b"half a shard")
    staging_name(tmp_path / ".build.json").write_bytes(b"{")
    assert fingerprint_tree(tmp_path) == clean
    (tmp_path / "notes.tmp1").write_bytes(b"a user's file")  # not a staged name: content
    assert fingerprint_tree(tmp_path) != clean
    assert staging_name(tmp_path / "manifest.json").name.startswith(".")
