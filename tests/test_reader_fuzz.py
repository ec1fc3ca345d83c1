"""Random malformed GLUE files: the TSV reader either parses them correctly or raises errors.DataError."""

import math
import pathlib
import tempfile

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adapter_jax import errors, glue_data, tasks

# (task, split, the file's header; None for CoLA's header-less train/dev files)
LAYOUTS = [
    ("rte", "train", ("index", "sentence1", "sentence2", "label")),
    ("rte", "test", ("index", "sentence1", "sentence2")),
    ("cola", "train", None),
    ("cola", "test", ("index", "sentence")),
    ("stsb", "dev", ("index", "sentence1", "sentence2", "score")),
    ("mrpc", "dev", ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")),
]

# Values that are valid somewhere, nearly valid, or tricky for int()/float().
TRICKY = [
    "0", "1", "2", "-1", "2.5", "1e3", " 7", "nan", "inf", "-inf", "1_0", "\u0661", "", " ",
    "entailment", "not_entailment", "Entailment", "label", "index", "\ufeff", "\r", "\x00", "\u2028", '"',
]
field = st.one_of(
    st.sampled_from(TRICKY), st.text(st.characters(codec="utf-8", exclude_characters="\t\n"), max_size=6)
)


def _valid_field(task: tasks.Task, column: str) -> st.SearchStrategy[str]:
    if column == task.label_column:
        if task.is_regression:
            return st.floats(0.0, 5.0).map(str)
        return st.sampled_from(task.labels)
    if column == task.index_column:
        return st.integers(0, 10**6).map(str)
    return st.text(st.characters(codec="utf-8", exclude_characters="\t\n"), max_size=12)


@st.composite
def tsv_files(draw) -> tuple[tuple, bytes]:
    layout = draw(st.sampled_from(LAYOUTS))
    if draw(st.integers(0, 9)) == 0:  # now and then, any bytes at all
        return layout, draw(st.binary(max_size=200))
    name, _, header = layout
    columns = header or tasks.COLA_COLUMNS
    valid_row = st.tuples(*(_valid_field(tasks.get_task(name), column) for column in columns)).map(list)
    # Some files well-formed, so that what the reader makes of a good file is checked too.
    clean = draw(st.booleans())
    messy_row = st.one_of(
        valid_row,
        st.lists(field, min_size=len(columns), max_size=len(columns)),
        st.lists(field, max_size=len(columns) + 2),
    )
    row = valid_row if clean else messy_row
    rows = draw(st.lists(row, min_size=1 if clean else 0, max_size=6))
    if header is not None:
        header_row = st.one_of(st.just(list(header)), st.permutations(header))
        if not clean:
            header_row = st.one_of(header_row, st.lists(field, max_size=len(header) + 1))
        rows = [draw(header_row), *rows]
    text = "\n".join("\t".join(fields) for fields in rows)
    text += draw(st.sampled_from(["", "\n", "\n\n", "\r\n"]))
    data = draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + text.encode("utf-8")
    if not clean and draw(st.booleans()):  # damage a byte: often no longer UTF-8
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        data = data[:at] + bytes([draw(st.integers(0x80, 0xFF))]) + data[at + 1 :]
    return layout, data


def _check_parsed(task: tasks.Task, split: str, data: bytes, examples: list) -> None:
    """What a successful parse must satisfy: one example per data line, with that line's texts and label."""
    # The reader reads text with Python's universal newlines: "\r\n" and a lone "\r" end a line too.
    lines = data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    header = task.headerless_columns
    if task.headerless_columns is None or split.startswith("test"):
        header = tuple(lines.pop(0).split("\t"))
    assert len(examples) == len(lines) > 0
    for example, line in zip(examples, lines):
        fields = line.split("\t")
        texts = [fields[header.index(name)] for name in task.text_columns]
        assert [example.text_a, example.text_b] == texts + [None] * (2 - len(texts))
        if split.startswith("test"):
            assert example.label is None
            assert example.idx == int(fields[header.index(task.index_column)])
        elif task.is_regression:
            assert math.isfinite(example.label)
            assert example.label == float(fields[header.index(task.label_column)])
        else:
            assert task.labels[example.label] == fields[header.index(task.label_column)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tsv_files())
def test_reader_parses_or_raises_data_error(case):
    (name, split, _), data = case
    task = tasks.get_task(name)
    with tempfile.TemporaryDirectory() as glue_dir:
        path = pathlib.Path(glue_dir) / task.dir_name / task.splits[split]
        path.parent.mkdir()
        path.write_bytes(data)
        try:
            examples = glue_data.read_examples(task, split, glue_dir=glue_dir)
        except errors.DataError as e:
            assert str(path) in str(e)  # every refusal names the file
            event("refused")
            return
    event("parsed")
    _check_parsed(task, split, data, examples)
