"""The served app under hostile requests: real HTTP against ``soar-lite app`` on loopback, through
Gradio's own API (what any client can send, whatever the page shows): folders outside the runs
dir and ``--allow-folder`` refused in every path-taking callback, path settings refused, uploads
gone from the temp folder once stored and at exit, and login attempts rate-limited."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.test_app import running_app
from tests.test_zip_guard import PNG_1PX

pytestmark = pytest.mark.slow
USER, PASSWORD = "alice", "s3cret-pass"


def _login(url: str, password: str) -> int:
    body = urllib.parse.urlencode({"username": USER, "password": password}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "login", data=body), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _refused(client, *args, api_name: str) -> str:
    with pytest.raises(Exception) as info:
        client.predict(*args, api_name=api_name)
    return str(info.value)


def test_the_served_app_touches_only_its_folders_cleans_uploads_and_throttles_logins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from gradio_client import Client, handle_file

    runs, shared, outside, temp = (tmp_path / n for n in ("runs", "shared", "outside", "tmp"))
    for folder in (shared, outside, temp):
        folder.mkdir()
    (outside / "important.txt").write_text("keep me")
    (outside / "notes.yaml").write_text("x: 1")
    (outside / "a.png").write_bytes(PNG_1PX)
    (shared / "a.png").write_bytes(PNG_1PX)
    (shared / "a.txt").write_text("a red pixel")
    monkeypatch.setenv("TMPDIR", str(temp))  # where the app's private upload folder lands
    app = running_app(runs, "--auth", f"{USER}:{PASSWORD}", "--allow-folder", str(shared))
    with app as (url, _):
        client = Client(url, auth=(USER, PASSWORD), verbose=False)
        table = {"headers": ["image", "caption"], "data": [["important.png", "x"], ["notes.yaml", "x"]]}
        for args, api in [
            ((str(outside), table), "/save_captions"),
            ((str(runs / ".." / "outside"), table), "/save_captions"),
            ((str(outside),), "/use_server_folder"),
            ((str(outside), "Salesforce/blip-image-captioning-base"), "/caption_missing"),
        ]:
            assert "outside the folders this app may use" in _refused(client, *args, api_name=api), api
        assert (outside / "important.txt").read_text() == "keep me" and not (outside / "notes.txt").exists()
        shown = client.predict(str(shared), api_name="/use_server_folder")[0]  # an allowed folder
        assert f"data: 1 items from {shared.resolve()}" in shown

        form = ["cpu-tiny", "builtin", "builtin", "sft", 2, 4, 1e-3, 1.0, 2]
        for extra in (f"cache_dir={outside}", f"data.image_dir={outside}"):
            message = _refused(client, *form, extra, "", api_name="/start")
            assert "outside the folders this app may use" in message, extra
        message = _refused(client, "/etc/passwd.yaml", *form[1:], "", "", api_name="/start")
        assert "not in the list of choices" in message or "pick one of the shipped presets" in message

        archive = tmp_path / "set.zip"
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("set/a.png", PNG_1PX)
            z.writestr("set/a.txt", "a red pixel")
        (uploads_dir,) = temp.glob("soar-lite-uploads-*")
        result = client.predict([handle_file(str(archive))], api_name="/import_upload")
        assert "data: 1 items" in str(result[0])
        assert not [p for p in uploads_dir.rglob("*.zip")], "the uploaded zip stayed in the temp folder"
        hostile = tmp_path / "hostile.zip"
        with zipfile.ZipFile(hostile, "w") as z:
            z.writestr("../evil.png", PNG_1PX)
        message = _refused(client, [handle_file(str(hostile))], api_name="/import_upload")
        assert "points outside the archive" in message
        assert not list(uploads_dir.rglob("*.zip")), "the refused zip stayed in the temp folder"

        codes = [_login(url, "wrong") for _ in range(30)]
        assert codes[:5] == [400] * 5 and set(codes[5:]) == {429}
        assert _login(url, PASSWORD) == 429  # guessing cannot go on, not even with the right one
    assert not uploads_dir.exists(), "the upload folder outlived the app"
