r"""Downloads GLUE in its original layout (<out>/RTE/train.tsv, ...), every file checked against its sha256.

    python -m scripts.download_glue --tasks=rte,mrpc --out=glue_data
    python -m scripts.download_glue --tasks=all --out=gs://my-bucket/glue_data

The files come from where GLUE's own download script (download_glue_data.py) takes them: each task's zip on
dl.fbaipublicfiles.com, and for MRPC the SentEval copies of the MSR paraphrase corpus, split into train and dev
by GLUE's list of dev ids exactly as that script does. Every download must match the size and sha256 in CHECKSUMS,
and so must every file written whose official checksum is known, before anything of the task is written: a
mismatch stops with an error naming the file, and nothing of that task is left in --out or in the temporary
folder. Only the files the trainer reads are written (train, dev and test of each task). A task whose files are
all in --out already is skipped; delete its folder to fetch it again.
"""

import argparse
import dataclasses
import hashlib
import http.client
import pathlib
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence

from etils import epath

from adapter_jax import cli, tasks
from adapter_jax.errors import DataError, WriteFailed
from adapter_jax.workdir import write_atomic, writing

BASE_URL = "https://dl.fbaipublicfiles.com"


@dataclasses.dataclass(frozen=True)
class Checksum:
    size: int  # bytes
    sha256: str


# Keys are paths under the base URL (what is downloaded) or paths under --out (what is written).
# Downloads: as recorded by tensorflow_datasets (url_checksums/glue.txt) and Hugging Face datasets for the same
# files; QQP-clean.zip, which download_glue_data.py fetches, is byte-identical to the QQP.zip TFDS fetches.
# Written files: ../shared/data/glue/README.md, where each was cross-checked against independent copies
# (MRPC, STS-B, QQP, MNLI and QNLI's train file have no entry there; their downloads are checked).
CHECKSUMS: dict[str, Checksum] = {
    "glue/data/CoLA.zip": Checksum(376971, "f212fcd832b8f7b435fb991f101abf89f96b933ab400603bf198960dfc32cbff"),
    "glue/data/SST-2.zip": Checksum(7439277, "d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa"),
    "glue/data/QQP-clean.zip": Checksum(
        41696084, "40e7c862c04eb26ee04b67fd900e76c45c6ba8e6d8fab4f8f1f8072a1a3fbae0"),
    "glue/data/STS-B.zip": Checksum(802872, "e60a6393de5a8b5b9bac5020a1554b54e3691f9d600b775bd131e613ac179c85"),
    "glue/data/MNLI.zip": Checksum(312783507, "e7c1d896d26ed6caf700110645df426cc2d8ebf02a5ab743d5a5c68ac1c83633"),
    "glue/data/QNLIv2.zip": Checksum(10627589, "e634e78627a29adaecd4f955359b22bf5e70f2cbd93b493f2d624138a0c0e5f5"),
    "glue/data/RTE.zip": Checksum(697150, "6bf86de103ecd335f3441bd43574d23fef87ecc695977a63b82d5efb206556ee"),
    "glue/data/WNLI.zip": Checksum(28999, "ae0e8e4d16f4d46d4a0a566ec7ecceccfd3fbfaa4a7a4b4e02848c0f2561ac46"),
    # The diagnostic set is one file, written as diagnostic/diagnostic.tsv (its checksum is below too).
    "glue/data/AX.tsv": Checksum(222257, "0e13510b1bb14436ff7e2ee82338f0efb0133ecf2e73507a697dc210db3f05fd"),
    "glue/data/mrpc_dev_ids.tsv": Checksum(6222, "971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7"),
    "senteval/senteval_data/msr_paraphrase_train.txt": Checksum(
        1047044, "60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89"),
    "senteval/senteval_data/msr_paraphrase_test.txt": Checksum(
        441275, "a04e271090879aaba6423d65b94950c089298587d9c084bf9cd7439bd785f784"),
    "CoLA/train.tsv": Checksum(428590, "cb368ebeb9f27d7ad03720d27ddc95687a311bdb100781a2fe59a5f5b1bc0624"),
    "CoLA/dev.tsv": Checksum(53717, "8c013e21dc39957cac37378d87bebe225b694a0d5fe13eded66c2856628833fd"),
    "CoLA/test.tsv": Checksum(48788, "3b4df85f7a9a0633574b38d181e18090ac961a24b18fb6bcd74999ddea8ad0b8"),
    "SST-2/train.tsv": Checksum(3806081, "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1"),
    "SST-2/dev.tsv": Checksum(94931, "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"),
    "SST-2/test.tsv": Checksum(197335, "69a938605609b3e6663b4487918fe1565eb293734e6e520d0366d1d412fd2a13"),
    "RTE/train.tsv": Checksum(846226, "41e3a9b063433392343fad9e962cf2f58b681c78d8f71592f4186f0837246c5c"),
    "RTE/dev.tsv": Checksum(90343, "80230dfa1347282e7b532b06a1004a76a710087541189bf874223ddf0e3819fb"),
    "RTE/test.tsv": Checksum(933969, "6e33f09b5c2bfd5fd5fde217070f3dd49e484e33b9752b5864cf36fc421a213f"),
    "WNLI/train.tsv": Checksum(99411, "9a88e9d54b6861cc796a088e9acf4f5f65064a9ef65ae6fa7a688b28391e5c9a"),
    "WNLI/dev.tsv": Checksum(11261, "cba00490596dd14be8cf53b4f53bb744abe3a7b89f81ab210528d80225338ed5"),
    "WNLI/test.tsv": Checksum(35761, "ff0296817e235bf6f7a230c5f6781bd6ee228a45445f6510831fdef6f2a04766"),
    "QNLI/dev.tsv": Checksum(1367342, "ac19409dcb04631eaaa094bdebdcf621086bc352503dfb6a1a648b614986f4fd"),
    "QNLI/test.tsv": Checksum(1300988, "6d856264e292fa7a7bc7b8e182efa1454ffd9532733c12ad813017dd5b377a5a"),
    "diagnostic/diagnostic.tsv": Checksum(
        222257, "0e13510b1bb14436ff7e2ee82338f0efb0133ecf2e73507a697dc210db3f05fd"),
}

# Each task's zip, as download_glue_data.py names them; each holds <dir_name>/<split file> (and more, unused).
ARCHIVES = {
    "cola": "glue/data/CoLA.zip",
    "sst2": "glue/data/SST-2.zip",
    "qqp": "glue/data/QQP-clean.zip",
    "stsb": "glue/data/STS-B.zip",
    "mnli": "glue/data/MNLI.zip",
    "qnli": "glue/data/QNLIv2.zip",
    "rte": "glue/data/RTE.zip",
    "wnli": "glue/data/WNLI.zip",
}
AX_FILE = "glue/data/AX.tsv"
MRPC_TRAIN = "senteval/senteval_data/msr_paraphrase_train.txt"
MRPC_TEST = "senteval/senteval_data/msr_paraphrase_test.txt"
MRPC_DEV_IDS = "glue/data/mrpc_dev_ids.tsv"
# What the test file's header becomes (the MSR test file's own header names a label column it drops).
MRPC_TEST_HEADER = "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
ALL_TASKS = (*tasks.GLUE_TASKS, "ax")


def check(key: str, path: pathlib.Path, checksums: Mapping[str, Checksum]) -> None:
    """Raises DataError unless the file at `path` has the size and sha256 of `checksums[key]` (if listed)."""
    expected = checksums.get(key)
    if expected is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    size = path.stat().st_size
    if (size, digest.hexdigest()) != (expected.size, expected.sha256):
        raise DataError(f"{key}: got {size} bytes with sha256 {digest.hexdigest()}, expected {expected.size} bytes "
                        f"with sha256 {expected.sha256}; the download is corrupt or not the official file")


def fetch(base_url: str, key: str, folder: pathlib.Path, checksums: Mapping[str, Checksum], timeout: float) -> pathlib.Path:
    """Downloads base_url/key into `folder` and checks it; a download without a listed checksum is refused."""
    if key not in checksums:
        raise DataError(f"{key}: no checksum listed for this download, so it cannot be verified")
    url = f"{base_url.rstrip('/')}/{key}"
    path = folder / pathlib.PurePosixPath(key).name
    print(f"downloading {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, path.open("wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except urllib.error.HTTPError as e:
        raise DataError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, cut short
        raise DataError(f"cannot download {url}: {getattr(e, 'reason', e)}") from e
    check(key, path, checksums)
    return path


def _extract(archive: pathlib.Path, key: str, members: Sequence[str], out: pathlib.Path) -> None:
    """Copies the named members (e.g. RTE/train.tsv) of a zip to the same relative paths under `out`."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for member in members:
                if member not in names:
                    raise DataError(f"{key}: the archive has no {member}")
                (out / member).parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, (out / member).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:  # CRC errors in a member raise BadZipFile too
        raise DataError(f"{key}: not a readable zip archive ({e})") from e


def _mrpc_rows(path: pathlib.Path, key: str) -> tuple[str, list[list[str]]]:
    """The header line and the rows (label, id1, id2, string1, string2) of an MSR paraphrase file."""
    # Read as download_glue_data.py reads it (utf-8, universal newlines, each row stripped), so that the
    # files written are the ones it writes; its header keeps the byte-order mark, which the reader drops.
    with path.open(encoding="utf-8") as f:
        header, *lines = f.readlines()
    rows = []
    for number, line in enumerate(lines, start=2):
        fields = line.strip().split("\t")
        if len(fields) != 5:
            raise DataError(f"{key}:{number}: expected 5 tab-separated fields, found {len(fields)}")
        rows.append(fields)
    return header, rows


def _format_mrpc(train: pathlib.Path, test: pathlib.Path, dev_ids: pathlib.Path, out: pathlib.Path) -> None:
    """GLUE's MRPC: the MSR train file split into train and dev by the dev ids, and the test file re-indexed."""
    with dev_ids.open(encoding="utf-8") as f:
        dev_pairs = {tuple(line.strip().split("\t")) for line in f}
    header, rows = _mrpc_rows(train, MRPC_TRAIN)
    folder = out / "MRPC"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "train.tsv").open("w", encoding="utf-8") as train_f, \
            (folder / "dev.tsv").open("w", encoding="utf-8") as dev_f:
        train_f.write(header)
        dev_f.write(header)
        for label, id1, id2, s1, s2 in rows:
            target = dev_f if (id1, id2) in dev_pairs else train_f
            target.write(f"{label}\t{id1}\t{id2}\t{s1}\t{s2}\n")
    _, test_rows = _mrpc_rows(test, MRPC_TEST)
    with (folder / "test.tsv").open("w", encoding="utf-8") as test_f:
        test_f.write(MRPC_TEST_HEADER)
        for index, (_, id1, id2, s1, s2) in enumerate(test_rows):
            test_f.write(f"{index}\t{id1}\t{id2}\t{s1}\t{s2}\n")


def task_files(task_name: str) -> list[str]:
    """The files of a task under the GLUE folder, e.g. ['RTE/train.tsv', 'RTE/dev.tsv', 'RTE/test.tsv']."""
    task = tasks.get_task(task_name)
    return [f"{task.dir_name}/{name}" for name in task.splits.values()]


def _build(task_name: str, base_url: str, downloads: pathlib.Path, staged: pathlib.Path,
           checksums: Mapping[str, Checksum], timeout: float) -> None:
    """Downloads a task's sources and writes its files under `staged`, every one checked."""
    files = task_files(task_name)
    if task_name == "mrpc":
        train, test, dev_ids = (fetch(base_url, key, downloads, checksums, timeout)
                                for key in (MRPC_TRAIN, MRPC_TEST, MRPC_DEV_IDS))
        _format_mrpc(train, test, dev_ids, staged)
    elif task_name == "ax":
        (staged / files[0]).parent.mkdir(parents=True)
        shutil.move(fetch(base_url, AX_FILE, downloads, checksums, timeout), staged / files[0])
    else:
        key = ARCHIVES[task_name]
        _extract(fetch(base_url, key, downloads, checksums, timeout), key, files, staged)
    for name in files:
        check(name, staged / name, checksums)


def download(task_names: Sequence[str], out: epath.PathLike, *, base_url: str = BASE_URL,
             checksums: Mapping[str, Checksum] = CHECKSUMS, timeout: float = 60.0) -> list[str]:
    """Fetches each task into `out` (local or gs://) in the GLUE layout; returns the tasks fetched (not skipped).

    Each task is downloaded and built in a temporary folder and checked there; only then are its files
    written to `out`, each whole or not at all, so a failure leaves nothing of that task behind.
    """
    out = epath.Path(out)
    fetched = []
    for name in task_names:
        files = task_files(name)
        if all((out / f).exists() for f in files):
            print(f"{name}: already in {out}, skipped")
            continue
        with tempfile.TemporaryDirectory(prefix=f"glue-{name}-") as tmp:
            downloads, staged = pathlib.Path(tmp, "downloads"), pathlib.Path(tmp, "staged")
            downloads.mkdir()
            _build(name, base_url, downloads, staged, checksums, timeout)
            for f in files:
                with writing(out / f):
                    (out / f).parent.mkdir(parents=True, exist_ok=True)
                write_atomic(out / f, (staged / f).read_bytes())
        print(f"{name}: wrote {', '.join(str(out / f) for f in files)}", flush=True)
        fetched.append(name)
    return fetched


def _task_list(value: str) -> list[str]:
    names = [t.strip().lower() for t in value.split(",") if t.strip()]
    if names == ["all"]:
        return list(ALL_TASKS)
    unknown = [t for t in names if t not in ALL_TASKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown tasks {unknown or value!r}; choose from all,{','.join(ALL_TASKS)}")
    return list(dict.fromkeys(names))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", required=True, type=_task_list,
                        help=f"comma-separated tasks ({','.join(ALL_TASKS)}), or all")
    parser.add_argument("--out", required=True, type=cli.absolute_path,
                        help="the GLUE folder to write (local or gs://); what the config's glue_dir names")
    parser.add_argument("--base_url", default=BASE_URL, help="where the files are served (a mirror)")
    parser.add_argument("--timeout", default=60.0, type=float, help="seconds a connection may stall")
    flags = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        download(flags.tasks, flags.out, base_url=flags.base_url, timeout=flags.timeout)
    except (DataError, WriteFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
