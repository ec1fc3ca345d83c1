"""scripts.download_glue against a local HTTP server serving archives built here: the layout written, MRPC's
split, checksums refusing a corrupt download without leaving anything behind, skipping, and the command line."""

import functools
import hashlib
import http.server
import io
import pathlib
import tempfile
import threading
import zipfile

import pytest

from adapter_jax import glue_data, tasks
from adapter_jax.errors import DataError
from scripts import download_glue

RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
RTE_FILES = {
    "RTE/train.tsv": RTE_HEADER + "0\tA cat sat.\tA cat is here.\tentailment\n1\tA dog ran.\tNo bird.\tnot_entailment\n",
    "RTE/dev.tsv": RTE_HEADER + "0\tA cow ate.\tA cow is here.\tentailment\n",
    "RTE/test.tsv": "index\tsentence1\tsentence2\n0\tA fish swam.\tA fish is here.\n",
}
MSR_HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
# CRLF line ends, as the SentEval copies have: the files written have LF.
MSR_TRAIN = MSR_HEADER + "1\t11\t12\tFirst a.\tFirst b.\r\n0\t21\t22\tSecond a.\tSecond b.\r\n1\t31\t32\tThird a.\tThird b.\r\n"
MSR_TEST = MSR_HEADER + "1\t41\t42\tTest a.\tTest b.\r\n0\t51\t52\tOther a.\tOther b.\r\n"
MRPC_DEV_IDS = "21\t22\n"
AX = "index\tsentence1\tsentence2\n0\tAll cats sleep.\tSome cats sleep.\n"


def _checksum(data: bytes) -> download_glue.Checksum:
    return download_glue.Checksum(len(data), hashlib.sha256(data).hexdigest())


class GlueServer:
    """A real HTTP server (in a thread) over a folder laid out like dl.fbaipublicfiles.com; counts requests."""

    def __init__(self, root: pathlib.Path):
        self.root, self.requests = root, []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep the test output clean
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def put(self, key: str, data: bytes) -> None:
        (self.root / key).parent.mkdir(parents=True, exist_ok=True)
        (self.root / key).write_bytes(data)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _zip(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buffer.getvalue()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """The server, with RTE's zip (plus a file the trainer does not read), MRPC's sources and AX, and the
    checksum table of what it serves and of RTE's files; temporary files go to a folder the test can see."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    server = GlueServer(tmp_path / "www")
    sources = {
        "glue/data/RTE.zip": _zip({**RTE_FILES, "RTE/original/notes.txt": "not read"}),
        download_glue.MRPC_TRAIN: MSR_TRAIN.encode(),
        download_glue.MRPC_TEST: MSR_TEST.encode(),
        download_glue.MRPC_DEV_IDS: MRPC_DEV_IDS.encode(),
        download_glue.AX_FILE: AX.encode(),
    }
    for key, data in sources.items():
        server.put(key, data)
    checksums = {key: _checksum(data) for key, data in sources.items()}
    checksums.update({name: _checksum(text.encode()) for name, text in RTE_FILES.items()})
    yield server, checksums
    server.close()


def test_writes_the_glue_layout_the_reader_reads(served, tmp_path):
    server, checksums = served
    out = tmp_path / "glue"
    assert download_glue.download(["rte", "mrpc", "ax"], out, base_url=server.url, checksums=checksums) == [
        "rte", "mrpc", "ax"]
    for name, text in RTE_FILES.items():
        assert (out / name).read_text() == text
    assert not (out / "RTE" / "original").exists()  # only what the trainer reads
    assert (out / "diagnostic" / "diagnostic.tsv").read_text() == AX
    # MRPC as download_glue_data.py writes it: dev is the train file's rows named by the dev ids.
    assert (out / "MRPC" / "train.tsv").read_text() == (
        MSR_HEADER + "1\t11\t12\tFirst a.\tFirst b.\n1\t31\t32\tThird a.\tThird b.\n")
    assert (out / "MRPC" / "dev.tsv").read_text() == MSR_HEADER + "0\t21\t22\tSecond a.\tSecond b.\n"
    assert (out / "MRPC" / "test.tsv").read_text() == (
        download_glue.MRPC_TEST_HEADER + "0\t41\t42\tTest a.\tTest b.\n1\t51\t52\tOther a.\tOther b.\n")
    dev = glue_data.read_examples(tasks.get_task("mrpc"), "dev", glue_dir=out)
    assert [(e.text_a, e.text_b, e.label) for e in dev] == [("Second a.", "Second b.", 0)]
    test = glue_data.read_examples(tasks.get_task("mrpc"), "test", glue_dir=out)
    assert [e.idx for e in test] == [0, 1]
    assert len(glue_data.read_examples(tasks.get_task("rte"), "train", glue_dir=out)) == 2
    assert not list((tmp_path / "tmp").iterdir())  # the downloads are gone

    # A second run finds every file and asks the server for nothing.
    requests = len(server.requests)
    assert download_glue.download(["rte", "mrpc"], out, base_url=server.url, checksums=checksums) == []
    assert len(server.requests) == requests


def _nothing_left(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "glue"
    assert not out.exists() or not list(out.rglob("*"))
    assert not list((tmp_path / "tmp").iterdir())


def test_a_corrupt_download_is_refused_and_nothing_is_left(served, tmp_path):
    server, checksums = served
    archive = server.root / "glue/data/RTE.zip"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped: same size, another sha256
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"glue/data/RTE\.zip: got \d+ bytes with sha256 [0-9a-f]{64}, expected"):
        download_glue.download(["rte"], tmp_path / "glue", base_url=server.url, checksums=checksums)
    _nothing_left(tmp_path)


def test_a_written_file_unlike_the_official_one_is_refused(served, tmp_path):
    server, checksums = served
    checksums["RTE/dev.tsv"] = _checksum(b"the official dev file")
    with pytest.raises(DataError, match=r"RTE/dev\.tsv: got \d+ bytes"):
        download_glue.download(["rte"], tmp_path / "glue", base_url=server.url, checksums=checksums)
    _nothing_left(tmp_path)


def test_a_download_without_a_checksum_is_refused(served, tmp_path):
    server, checksums = served
    del checksums[download_glue.MRPC_DEV_IDS]
    with pytest.raises(DataError, match="glue/data/mrpc_dev_ids.tsv: no checksum listed"):
        download_glue.download(["mrpc"], tmp_path / "glue", base_url=server.url, checksums=checksums)
    _nothing_left(tmp_path)


def test_an_archive_without_a_task_file_is_refused(served, tmp_path):
    server, checksums = served
    broken = _zip({"RTE/train.tsv": RTE_FILES["RTE/train.tsv"], "RTE/dev.tsv": RTE_FILES["RTE/dev.tsv"]})
    server.put("glue/data/RTE.zip", broken)
    checksums["glue/data/RTE.zip"] = _checksum(broken)
    with pytest.raises(DataError, match=r"glue/data/RTE\.zip: the archive has no RTE/test\.tsv"):
        download_glue.download(["rte"], tmp_path / "glue", base_url=server.url, checksums=checksums)
    _nothing_left(tmp_path)


def test_command_line(served, tmp_path, capsys):
    server, _ = served
    out = tmp_path / "glue"
    # With the project's own table: the test's RTE archive is not the official one, so it is refused.
    assert download_glue.main(["--tasks=RTE", f"--out={out}", f"--base_url={server.url}"]) == 1
    assert "error: glue/data/RTE.zip: got" in capsys.readouterr().err
    _nothing_left(tmp_path)
    # WNLI is not served: the error names the URL and the HTTP status.
    assert download_glue.main(["--tasks=wnli", f"--out={out}", f"--base_url={server.url}"]) == 1
    assert f"error: cannot download {server.url}/glue/data/WNLI.zip: HTTP 404" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        download_glue.main(["--tasks=rte,squad", f"--out={out}"])
    assert "unknown tasks ['squad']" in capsys.readouterr().err


def test_the_table_holds_every_download_and_the_official_files(glue_dir):
    """Every source has a checksum; the written files' checksums are those of the real GLUE files here."""
    keys = [*download_glue.ARCHIVES.values(), download_glue.AX_FILE, download_glue.MRPC_TRAIN,
            download_glue.MRPC_TEST, download_glue.MRPC_DEV_IDS]
    assert set(download_glue.ARCHIVES) | {"mrpc", "ax"} == set(download_glue.ALL_TASKS)
    assert all(key in download_glue.CHECKSUMS for key in keys)
    listed = [name for name in download_glue.CHECKSUMS if not name.startswith(("glue/", "senteval/"))]
    assert len(listed) == 15  # CoLA, SST-2, RTE, WNLI: train, dev, test; QNLI: dev, test; AX
    for name in listed:
        download_glue.check(name, glue_dir / name, download_glue.CHECKSUMS)
