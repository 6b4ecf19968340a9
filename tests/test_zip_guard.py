"""Uploads from a browser: hostile zips are refused whole, limits hold, names cannot pick a location."""

from __future__ import annotations

import io
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from soar_lite.errors import UserError
from soar_lite.uploads import (
    MiB,
    UploadLimits,
    dataset_report,
    import_uploads,
    new_dataset_dir,
    safe_extract_zip,
    safe_filename,
    write_captions,
)

PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415478da63f8cf"
    "c0f00003010100c9fe92ef0000000049454e44ae426082"
)


def make_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def symlink_zip(path: Path, name: str, target: str) -> Path:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ok.png", PNG_1PX)
        z.writestr(info, target)
    return path


def nothing_written(dest: Path) -> bool:
    return not dest.exists() or not any(p.is_file() for p in dest.rglob("*"))


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("/etc/cron.d/evil.txt", "absolute path"),
        ("C:/Windows/evil.txt", "absolute path"),
        ("\\\\server\\share\\evil.txt", "absolute path"),
        ("../evil.txt", "outside the archive"),
        ("images/../../evil.txt", "outside the archive"),
        ("..\\..\\evil.txt", "outside the archive"),
    ],
)
def test_members_that_escape_the_folder_refuse_the_whole_archive(tmp_path, name, why):
    archive = make_zip(tmp_path / "evil.zip", {"a.png": PNG_1PX, "a.txt": b"a red circle", name: b"x"})
    dest = tmp_path / "data" / "set"
    with pytest.raises(UserError, match=why):
        safe_extract_zip(archive, dest)
    assert nothing_written(dest)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "evil.txt").exists()


def test_symlink_members_are_refused(tmp_path):
    archive = symlink_zip(tmp_path / "link.zip", "passwd.txt", "/etc/passwd")
    with pytest.raises(UserError, match="symbolic link"):
        safe_extract_zip(archive, tmp_path / "set")
    assert nothing_written(tmp_path / "set")


def test_a_zip_bomb_is_refused_by_its_ratio_before_inflating(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", {"bomb.png": bytes(8 * MiB)})
    assert archive.stat().st_size < 100_000  # ~1000x
    with pytest.raises(UserError, match="zip bomb"):
        safe_extract_zip(archive, tmp_path / "set")
    assert nothing_written(tmp_path / "set")


def test_total_size_file_size_and_count_limits(tmp_path):
    members = {f"{i}.txt": bytes(1000) for i in range(5)}
    archive = make_zip(tmp_path / "many.zip", members, zipfile.ZIP_STORED)
    with pytest.raises(UserError, match="upload limit"):
        safe_extract_zip(archive, tmp_path / "a", UploadLimits(max_total_bytes=4000))
    with pytest.raises(UserError, match="per-file limit"):
        safe_extract_zip(archive, tmp_path / "b", UploadLimits(max_file_bytes=999))
    with pytest.raises(UserError, match="more than 3 files"):
        safe_extract_zip(archive, tmp_path / "c", UploadLimits(max_files=3))
    assert all(nothing_written(tmp_path / d) for d in "abc")


def _lie_about_size(data: bytes, name: bytes, size: int) -> bytes:
    """Rewrite the uncompressed size in the local and central headers of member ``name``."""
    out = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = out.find(signature)
        while start >= 0:
            out[start + offset : start + offset + 4] = struct.pack("<I", size)
            start = out.find(signature, start + 4)
    assert name in out
    return bytes(out)


def test_a_member_that_inflates_past_its_declared_size_is_refused_and_removed(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.png", bytes(3 * MiB))
    archive = tmp_path / "liar.zip"
    archive.write_bytes(_lie_about_size(buffer.getvalue(), b"big.png", 100))
    with pytest.raises(UserError, match="refused archive"):
        safe_extract_zip(archive, tmp_path / "set")
    assert nothing_written(tmp_path / "set")


def test_duplicates_and_non_zips_are_clear_errors(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z, pytest.warns(UserWarning):
        z.writestr("a.png", PNG_1PX)
        z.writestr("a.png", PNG_1PX)
    (tmp_path / "dup.zip").write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="twice"):
        safe_extract_zip(tmp_path / "dup.zip", tmp_path / "set")
    (tmp_path / "fake.zip").write_bytes(b"not a zip at all")
    with pytest.raises(UserError, match="not a readable zip"):
        safe_extract_zip(tmp_path / "fake.zip", tmp_path / "set2")


def test_a_good_zip_extracts_nested_and_reports_what_it_left_out(tmp_path):
    members = {
        "set/red.png": PNG_1PX,
        "set/red.txt": b"a red circle",
        "set/sub/blue.png": PNG_1PX,
        "set/sub/blue.txt": b"a blue square",
        "set/nocaption.png": PNG_1PX,
        "__MACOSX/set/._red.png": b"fork",
        "set/.DS_Store": b"junk",
        "set/notes.md": b"# notes",
        "set/empty/": b"",
    }
    report = safe_extract_zip(make_zip(tmp_path / "ok.zip", members), tmp_path / "data")
    assert sorted(p.relative_to(tmp_path / "data").as_posix() for p in report.written) == [
        "set/nocaption.png",
        "set/red.png",
        "set/red.txt",
        "set/sub/blue.png",
        "set/sub/blue.txt",
    ]
    assert len(report.ignored) == 3 and any("notes.md" in r for r in report.ignored)
    seen = dataset_report(tmp_path / "data")
    assert len(seen.items) == 2 and seen.error is None
    assert list(seen.skipped) == ["no caption"] and seen.skipped["no caption"] == ["set/nocaption.png"]


def test_loose_uploads_keep_only_base_names_and_respect_limits(tmp_path):
    src = tmp_path / "incoming"
    src.mkdir()
    (src / "1").write_bytes(PNG_1PX)
    (src / "2").write_bytes(b"a red circle")
    (src / "3").write_bytes(b"#!/bin/sh")
    dest = tmp_path / "set"
    names = ["../../x.png", "..\\..\\x.txt", "run.sh"]
    report = import_uploads([src / "1", src / "2", src / "3"], dest, names)
    assert sorted(p.name for p in dest.iterdir()) == ["x.png", "x.txt"]
    assert report.ignored == ["run.sh: not an image, caption, metadata file or .zip"]
    with pytest.raises(UserError, match="too many files"):
        import_uploads(
            [src / "1"] * 3, tmp_path / "b", ["a.png", "b.png", "c.png"], UploadLimits(max_files=2)
        )
    with pytest.raises(UserError, match="over the upload limits"):
        import_uploads([src / "1"], tmp_path / "c", ["a.png"], UploadLimits(max_file_bytes=10))
    assert safe_filename("a b;$(rm -rf).png") == "a b_rm -rf_.png"
    with pytest.raises(UserError):
        safe_filename("../..")


def test_a_zip_among_loose_files_is_guarded_too(tmp_path):
    archive = make_zip(tmp_path / "in.zip", {"../evil.png": PNG_1PX})
    with pytest.raises(UserError, match="outside the archive"):
        import_uploads([archive], tmp_path / "set", ["in.zip"])
    assert not (tmp_path / "evil.png").exists()


def test_captions_are_written_next_to_images_of_the_dataset_only(tmp_path):
    dest = new_dataset_dir(tmp_path)
    assert dest.parent == tmp_path / "datasets"
    (dest / "a.png").write_bytes(PNG_1PX)
    assert write_captions(dest, {"a.png": "  a red\n circle "}) == 1
    assert (dest / "a.txt").read_text(encoding="utf-8") == "a red circle\n"
    (tmp_path / "outside.png").write_bytes(PNG_1PX)
    for bad in ("../../outside.png", "missing.png", "/etc/hostname"):
        with pytest.raises(UserError, match="not an image of this dataset"):
            write_captions(dest, {bad: "x"})
    assert not (tmp_path / "outside.txt").exists()
