"""Downloads with a fake network: retries, checksum manifest, atomic placement, no re-download."""

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from mmke.download import Download, DownloadError, extract_archive, fetch

PAYLOAD = b"checkpoint bytes\n"
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FakeTransport:
    """Writes given bytes per relative path; fails the first ``failures`` calls like a flaky network."""

    def __init__(self, files: dict[str, bytes], failures: int = 0, nest: str | None = None):
        self.files, self.failures, self.nest, self.calls = files, failures, nest, 0

    def fetch(self, download: Download, out: Path) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            if download.directory:
                (out / "partial.json").write_text("{")  # a half download the retry must not keep
            raise ConnectionError(f"simulated outage {self.calls}")
        if not download.directory:
            out.write_bytes(self.files[""])
            return
        root = out / self.nest if self.nest else out
        for name, data in self.files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)


def no_sleep(seconds):
    no_sleep.waits.append(seconds)


def file_download(tmp_path, **extra):
    return Download.from_config("ckpt", {"url": "https://example.org/ckpt.pth", "dest": str(tmp_path / "ckpt.pth"), **extra})


def test_file_lands_verified_and_is_not_fetched_twice(tmp_path, capsys):
    download = file_download(tmp_path)
    transport = FakeTransport({"": PAYLOAD})
    manifest = {str(download.dest): SHA}
    assert fetch(download, manifest, transport, sleep=no_sleep) == [download.dest]
    assert download.dest.read_bytes() == PAYLOAD
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no staging leftovers
    fetch(download, manifest, transport, sleep=no_sleep)
    assert transport.calls == 1
    assert "not downloading again" in capsys.readouterr().out


def test_retries_with_backoff_then_succeeds(tmp_path):
    no_sleep.waits = []
    download = Download.from_config("data", {"gdrive_folder": "FOLDER", "dest": str(tmp_path / "data"),
                                             "files": ["vqa/vqa_eval.json"]})
    transport = FakeTransport({"vqa/vqa_eval.json": b"[]"}, failures=2)
    fetch(download, {}, transport, retries=3, backoff_s=5, sleep=no_sleep)
    assert transport.calls == 3 and no_sleep.waits == [5, 10]
    assert (tmp_path / "data/vqa/vqa_eval.json").read_bytes() == b"[]"
    assert not (tmp_path / "data/partial.json").exists()


def test_offline_error_says_what_to_place_where(tmp_path):
    no_sleep.waits = []
    download = Download.from_config("images", {"gdrive": "FILEID", "dest": str(tmp_path / "images.zip")})
    with pytest.raises(DownloadError) as err:
        fetch(download, {}, FakeTransport({}, failures=5), retries=2, sleep=no_sleep)
    message = str(err.value)
    assert "failed after 2 attempt(s): simulated outage 2" in message
    assert f"https://drive.google.com/file/d/FILEID/view and place it at {tmp_path / 'images.zip'}" in message
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_is_an_error_and_leaves_no_file(tmp_path):
    download = file_download(tmp_path)
    with pytest.raises(DownloadError, match=f"ckpt: {download.dest}: sha256 mismatch: expected {'0' * 64}, got {SHA}"):
        fetch(download, {str(download.dest): "0" * 64}, FakeTransport({"": PAYLOAD}), sleep=no_sleep)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_existing_file_is_replaced(tmp_path):
    download = file_download(tmp_path)
    download.dest.write_bytes(b"truncated")
    transport = FakeTransport({"": PAYLOAD})
    fetch(download, {str(download.dest): SHA}, transport, sleep=no_sleep)
    assert transport.calls == 1 and download.dest.read_bytes() == PAYLOAD


def test_unpinned_file_prints_its_digest(tmp_path, capsys):
    fetch(file_download(tmp_path), {}, FakeTransport({"": PAYLOAD}), sleep=no_sleep)
    assert f"sha256 {SHA} (not pinned" in capsys.readouterr().out


def test_folder_missing_a_listed_file_names_what_it_got(tmp_path):
    download = Download.from_config("data", {"gdrive_folder": "F", "dest": str(tmp_path / "d"),
                                             "files": ["vqa/vqa_eval.json"]})
    with pytest.raises(DownloadError, match=r"data: the download lacks \['vqa/vqa_eval.json'\]; it holds \['other.json'\]"):
        fetch(download, {}, FakeTransport({"other.json": b"{}"}), sleep=no_sleep)
    assert not (tmp_path / "d").exists()


def test_folder_nested_one_level_by_gdown_is_found(tmp_path):
    download = Download.from_config("data", {"gdrive_folder": "F", "dest": str(tmp_path / "d"),
                                             "files": ["vqa/vqa_eval.json"]})
    fetch(download, {str(tmp_path / "d/vqa/vqa_eval.json"): hashlib.sha256(b"[]").hexdigest()},
          FakeTransport({"vqa/vqa_eval.json": b"[]"}, nest="editing-data"), sleep=no_sleep)
    assert (tmp_path / "d/vqa/vqa_eval.json").read_bytes() == b"[]"


def test_manual_download_explains_and_never_calls_the_network(tmp_path):
    download = Download.from_config("vicuna", {"manual": "Apply the delta.", "dest": str(tmp_path / "v"), "directory": True})
    transport = FakeTransport({})
    with pytest.raises(DownloadError, match=f"vicuna: no public download. Apply the delta. Place it at {tmp_path / 'v'}"):
        fetch(download, {}, transport)
    assert transport.calls == 0
    (tmp_path / "v").mkdir()
    (tmp_path / "v/config.json").write_text("{}")
    assert fetch(download, {}, transport) == [tmp_path / "v"]  # placed by hand: accepted


@pytest.mark.parametrize("entry, message", [
    ({"dest": "x"}, "exactly one source"),
    ({"url": "u", "gdrive": "g", "dest": "x"}, "exactly one source"),
    ({"url": "u"}, "field 'dest' is missing"),
    ({"gdrive_folder": "f", "dest": "x"}, "needs 'files'"),
])
def test_bad_entries_are_named(entry, message):
    with pytest.raises(ValueError, match=f"downloads.bad: .*{message}"):
        Download.from_config("bad", entry)


def test_archives_are_extracted_once(tmp_path):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("val2014/a.jpg", b"jpg")
    out = extract_archive(archive, tmp_path / "images")
    assert (out / "val2014/a.jpg").read_bytes() == b"jpg"
    (out / "val2014/a.jpg").write_bytes(b"kept")
    extract_archive(archive, tmp_path / "images")  # already there: untouched
    assert (out / "val2014/a.jpg").read_bytes() == b"kept"


def test_archive_members_may_not_escape(tmp_path):
    zipped = tmp_path / "evil.zip"
    with zipfile.ZipFile(zipped, "w") as handle:
        handle.writestr("../escape.txt", b"x")
    with pytest.raises(DownloadError, match="would be written outside"):
        extract_archive(zipped, tmp_path / "out")
    tarred = tmp_path / "evil.tar"
    with tarfile.open(tarred, "w") as handle:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        handle.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(tarfile.OutsideDestinationError):
        extract_archive(tarred, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()


def test_not_an_archive(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"plain")
    with pytest.raises(DownloadError, match=r"x\.zip: not a zip or tar archive"):
        extract_archive(tmp_path / "x.zip", tmp_path / "out")


def test_gdown_transport_calls(monkeypatch, tmp_path):
    """The real transport's mapping of source kinds onto gdown / huggingface_hub calls."""
    import gdown
    import huggingface_hub

    from mmke.download import HF_IGNORE, GdownTransport

    calls = []
    monkeypatch.setattr(gdown, "download", lambda **kw: calls.append(("download", kw)) or kw["output"])
    monkeypatch.setattr(gdown, "download_folder", lambda **kw: calls.append(("folder", kw)) or None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append(("hf", repo, kw)) or kw["local_dir"])
    transport = GdownTransport()
    transport.fetch(Download.from_config("a", {"gdrive": "ID", "dest": "x"}), tmp_path / "a")
    transport.fetch(Download.from_config("b", {"url": "https://h/f.pth", "dest": "x"}), tmp_path / "b")
    transport.fetch(Download.from_config("c", {"hf": "org/m", "revision": "abc", "dest": "x"}), tmp_path / "c")
    with pytest.raises(OSError, match="gdrive_folder F: nothing was downloaded"):
        transport.fetch(Download.from_config("d", {"gdrive_folder": "F", "dest": "x", "files": ["f"]}), tmp_path / "d")
    assert calls[0] == ("download", {"id": "ID", "output": str(tmp_path / "a"), "quiet": False})
    assert calls[1] == ("download", {"url": "https://h/f.pth", "output": str(tmp_path / "b"), "quiet": False})
    assert calls[2] == ("hf", "org/m", {"revision": "abc", "local_dir": str(tmp_path / "c"), "ignore_patterns": list(HF_IGNORE)})
    assert calls[3][0] == "folder" and calls[3][1]["id"] == "F"
