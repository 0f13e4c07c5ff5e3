"""The user's CSV/JSONL files (``--data``): read exactly as written, or refused by line.

The oracle of the generated files is Python's own ``csv`` and ``json`` writers plus, for labels,
``fractions.Fraction``: two number labels are one class exactly when their values are equal,
two name labels when their stripped text is equal. The file either loads with every text and
label as written, or, where the oracle predicts a fault, raises :class:`DataFileError` and
nothing else.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from peftlab.core.errors import ConfigError
from peftlab.lab.data import DataFileError, Example, Pair, read_records
from peftlab.lab.tasks import FileTask, get_task

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SPLIT_SPELLINGS = {"train": "train", "TRAIN": "train", " training ": "train", "val": "validation",
                   "dev": "validation", "Validation": "validation", "test": "test"}


def write_csv(path: Path, rows: list[list[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def write_jsonl(path: Path, rows: list[dict[str, Any]], *, ensure_ascii: bool = True) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows), encoding="utf-8")


def line_breaks(text: str) -> int:
    """Line breaks as a reader of universal newlines counts them: \\r\\n, \\r or \\n."""
    return len(re.findall(r"\r\n|\r|\n", text))


# --------------------------------------------------------------------------- the review's findings


def test_a_field_far_above_the_csv_field_limit_loads(tmp_path):
    limit = csv.field_size_limit()
    long = "word, " * 40_000  # 240 KB, with commas, in one quoted field
    path = tmp_path / "long.csv"
    write_csv(path, [["text", "label", "split"], [long, "a", "train"], ["short", "b", "train"], ["x", "a", "val"]])
    task = FileTask(path)
    assert task.examples("train")[0] == Example(long.strip(), 0)
    assert csv.field_size_limit() == limit  # the process-wide limit is left as it was
    jsonl = tmp_path / "long.jsonl"
    write_jsonl(jsonl, [{"prompt": long, "response": "r" * 300_000, "split": "train"},
                        {"prompt": "q", "response": "a", "split": "val"}])
    assert FileTask(jsonl).examples("train") == [Pair(long.strip(), "r" * 300_000)]


def test_an_unquoted_comma_is_an_error_with_its_line(tmp_path):
    path = tmp_path / "reviews.csv"
    # row 2 spans lines 3-4 (a quoted newline), so the bad row 3 is on line 5
    path.write_text('text,label\ngood,pos\n"two\nlines",neg\ngreat, loved it,pos\nbad,neg\n', encoding="utf-8")
    with pytest.raises(DataFileError) as info:
        FileTask(path)
    message = str(info.value)
    assert str(path) in message and "row 3 (line 5) has 3 fields but the header has 2" in message
    assert "Quote a value that contains a comma" in message
    assert isinstance(info.value, ConfigError)  # callers that catch peftlab's config errors catch it too
    path.write_text("text,label,split\na,x,train\nb\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"row 2 \(line 3\) has 1 field but the header has 3"):
        FileTask(path)


def test_a_record_spanning_lines_is_named_by_its_lines(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('text,label\n"one\ntwo\nthree",\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"row 1 \(lines 2-4\) has an empty 'label'"):
        FileTask(path)


@pytest.mark.parametrize("labels", [[1, 1.0, "1", " 1 ", "1.00", "1e0", 2, "2.0"], ["1", "1.0", "01", "2", "2.00"]])
def test_number_labels_of_any_spelling_are_one_class(tmp_path, labels):
    path = tmp_path / "n.jsonl"
    rows = [{"text": f"t{i}", "label": v, "split": "train"} for i, v in enumerate(labels)]
    write_jsonl(path, rows + [{"text": "v", "label": 2, "split": "val"}])
    task = FileTask(path)
    assert task.labels == ("1", "2")
    assert [e.label for e in task.examples("train")] == [int(Fraction(str(v).strip())) - 1 for v in labels]
    assert task.examples("validation") == [Example("v", 1)]
    csv_path = tmp_path / "n.csv"
    write_csv(csv_path, [["text", "label", "split"]] + [[r["text"], r["label"], r["split"]] for r in rows]
              + [["v", "2", "val"]])
    assert FileTask(csv_path).examples("train") == task.examples("train")


def test_number_labels_sort_by_value_and_keep_a_canonical_spelling(tmp_path):
    path = tmp_path / "n.jsonl"
    values = [10, -2.5, "0.5", 3, "1e3", 0.1, "-0.0", "12345678901234567890123"]
    write_jsonl(path, [{"text": f"t{i}", "label": v, "split": "train"} for i, v in enumerate(values)]
                + [{"text": "v", "label": 0, "split": "val"}])
    task = FileTask(path)
    assert task.labels == ("-2.5", "0", "0.1", "0.5", "3", "10", "1000", "12345678901234567890123")


def test_labels_that_mix_numbers_and_names_are_refused(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, [{"text": "a", "label": 1, "split": "train"}, {"text": "b", "label": 2, "split": "train"},
                       {"text": "c", "label": "one", "split": "val"}])
    with pytest.raises(DataFileError) as info:
        FileTask(path)
    assert str(path) in str(info.value)
    assert "mix numbers and names: row 1 (line 1) has 1, row 3 (line 3) has 'one'" in str(info.value)


@pytest.mark.parametrize(("line", "shown"), [
    ('{"text": "b", "label": null}', "null or absent"), ('{"text": "b"}', "null or absent"),
    ('{"text": "b", "label": NaN}', "NaN"), ('{"text": "b", "label": ""}', "''"),
    ('{"text": "b", "label": "  "}', "'  '"), ('{"text": "b", "label": "NaN"}', "'NaN'"),
])
def test_missing_labels_are_refused_with_the_line(tmp_path, line, shown):
    path = tmp_path / "m.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataFileError) as info:
        FileTask(path)
    assert f"{path}: row 2 (line 3) has an empty 'label' ({shown})" in str(info.value)


def test_a_missing_label_in_csv_and_an_infinite_one_are_refused(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("text,label\na,x\nb,nan\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"row 2 \(line 3\) has an empty 'label' \('nan'\)"):
        FileTask(path)
    path = tmp_path / "inf.jsonl"
    path.write_text('{"text": "a", "label": Infinity}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"row 1 \(line 1\) has the label inf"):
        FileTask(path)
    path.write_text('{"text": "a", "label": [1]}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"JSON list as 'label'; a label is a string or a number"):
        FileTask(path)


def test_a_decode_error_names_the_file_the_line_and_the_encoding_option(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("text,label,split\nfine,a,train\ncafé crème,b,train\nx,a,val\n".encode("cp1252"))
    with pytest.raises(DataFileError) as info:
        FileTask(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 3 is not valid utf-8 (byte 0xe9")
    assert "encoding='cp1252'" in message
    task = get_task(None, data=path, encoding="cp1252")
    assert task.examples("train") == [Example("fine", 0), Example("café crème", 1)]
    assert FileTask(path, encoding="cp1252").encoding == "cp1252"
    jsonl = tmp_path / "l.jsonl"
    jsonl.write_bytes(b'{"text": "a", "label": "x"}\r\n{"text": "\xe9t\xe9", "label": "y"}\r\n')
    with pytest.raises(DataFileError, match=r"l\.jsonl: line 2 is not valid utf-8"):
        FileTask(jsonl)
    with pytest.raises(DataFileError, match="unknown encoding 'utf-9'.*'cp1252'"):
        FileTask(path, encoding="utf-9")


def test_utf8_byte_order_mark_and_other_encodings(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"text": "é", "label": 1}\n{"text": "b", "label": 2}\n'.encode())
    records, columns = read_records(path)
    assert columns == ["text", "label"] and records[0].values == {"text": "é", "label": 1}
    utf16 = tmp_path / "u.csv"
    utf16.write_text("text,label,split\n日本,a,train\nb,c,train\nd,a,val\n", encoding="utf-16")
    assert FileTask(utf16, encoding="utf-16").examples("train")[0] == Example("日本", 0)


def test_jsonl_lines_end_at_newline_only(tmp_path):
    path = tmp_path / "u.jsonl"
    texts = ["line\u2028separator", "form\x0cfeed", "next\x85line", "para\u2029graph"]
    write_jsonl(path, [{"prompt": t, "response": t, "split": "train"} for t in texts]
                + [{"prompt": "q", "response": "a", "split": "val"}], ensure_ascii=False)
    assert [p.prompt for p in FileTask(path).examples("train")] == texts


def test_malformed_structure_is_refused_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1, "label": 2}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"line 2 gives the key 'label' twice"):
        FileTask(path)
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1' + "9" * 5000 + "}\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"line 2 cannot be read as JSON"):
        FileTask(path)
    header = tmp_path / "h.csv"
    header.write_text("text,label,text\na,b,c\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"header \(line 1\) names the column 'text' twice"):
        FileTask(header)
    quoted = tmp_path / "q.csv"
    quoted.write_text('text,label\na,x\n"b"c,y\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"record that starts at line 3 is not valid CSV"):
        FileTask(quoted)
    semi = tmp_path / "s.csv"
    semi.write_text("text;label\na;b\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"';'-separated"):
        FileTask(semi)
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"prompt": "2+2?", "response": 4}\n{"prompt": "half", "response": 0.5}\n'
                     '{"prompt": "x", "response": true}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"row 3 \(line 3\) has a JSON boolean as 'response'; give a string"):
        FileTask(texts)


# --------------------------------------------------------------------------- generated files

# Texts: commas, quotes, every line break Python knows (only \n ends a JSONL line), NUL, unicode
# from every plane. A list of one_of keeps the special characters frequent (an alphabet would
# dilute them among a million code points).
SPECIAL = list(',"\'\n\r\t ;|\\\x00\x0b\x0c\x1c\x85\u2028\u2029\u00e9\u65e5\U0001f600') + ["\r\n", '""', ", "]
TEXTS = st.lists(st.one_of(st.sampled_from(SPECIAL), st.characters(codec="utf-8")), max_size=30).map("".join)
NUMBER_VALUES = [0, 1, 2, 10, -3, Fraction(1, 2), Fraction(9, 4), 10**20]
NAMES = ["pos", "neg", "Pos", "neutral", "très bien", "a,b", 'say "hi"', "multi\nline", "true", "false", "nan-ish"]


@st.composite
def label_spelling(draw, kind: str, fmt: str, pool: dict[str, list[Any]]) -> tuple[Any, Any]:
    """``(value written, oracle key)`` of a label of ``kind`` drawn from the file's ``pool`` of
    classes; the key is ``None`` where the label is missing."""
    if kind == "missing":
        return draw(st.sampled_from([None, math.nan, "", "   ", "nan", "NaN"])), None
    if kind == "name":
        name = draw(st.sampled_from(pool["name"]))
        pad = draw(st.sampled_from(["", " ", "\t"]))
        if name in ("true", "false") and draw(st.booleans()):
            value = name == "true"  # a JSON boolean; Python's csv writer spells it True/False
            return value, ("name", name if fmt == "jsonl" else str(value))
        return pad + name + pad, ("name", name)
    value = draw(st.sampled_from(pool["number"]))
    spellings: list[Any] = [str(float(value)), f" {float(value)} ", f"{float(value):e}", float(value)]
    if Fraction(value).denominator == 1:
        spellings += [int(value), str(int(value)), f"{int(value)}.00"]
    return draw(st.sampled_from(spellings)), ("number", Fraction(value))


@st.composite
def data_files(draw) -> dict[str, Any]:
    """Rows with 2-3 classes, their labels in random spellings, in random order, and now and then
    one fault the oracle predicts: a blank text, a missing label, a name among numbers (or the
    reverse), a class seen only outside training (from the random splits)."""
    fmt = draw(st.sampled_from(["csv", "jsonl"]))
    kind = draw(st.sampled_from(["number", "name"]))
    pool = {"number": draw(st.lists(st.sampled_from(NUMBER_VALUES), min_size=2, max_size=3, unique=True)),
            "name": draw(st.lists(st.sampled_from(NAMES), min_size=2, max_size=3, unique=True))}
    splits = list(SPLIT_SPELLINGS)
    rows = []
    for i in range(draw(st.integers(3, 10))):
        # the first rows give training two classes and a validation row; the rest are random
        value, key = draw(label_spelling(kind, fmt, {k: v[i:i + 1] or v for k, v in pool.items()} if i < 2 else pool))
        text = draw(TEXTS)
        if not text.strip():
            text += draw(st.sampled_from(["x", "é", "日本", "😀"]))
        split = draw(st.sampled_from(splits[:3] if i < 2 else splits[3:6] if i == 2 else splits))
        rows.append({"text": text, "label": value, "split": split, "key": key})
    rows = draw(st.permutations(rows))
    fault = draw(st.sampled_from([None] * 6 + ["blank", "missing", "mixed"]))
    if fault is not None:
        row = rows[draw(st.integers(0, len(rows) - 1))]
        if fault == "blank":
            row["text"] = draw(st.sampled_from(["", " ", "\n", "\t\r\n", "\u2028"]))
        else:
            other = {"missing": "missing", "mixed": "name" if kind == "number" else "number"}[fault]
            row["label"], row["key"] = draw(label_spelling(other, fmt, pool))
    return {"rows": rows, "format": fmt, "ascii": draw(st.booleans()), "blank_lines": draw(st.booleans())}


def expected_outcome(rows: list[dict[str, Any]]) -> dict[str, list[Example]] | None:
    """What the file should load as, from the rows as written; None where it must be refused."""
    if any(not r["text"].strip() or r["key"] is None for r in rows):
        return None
    if len({r["key"][0] for r in rows}) > 1:
        return None  # numbers and names mixed
    by_split: dict[str, list[tuple[str, Any]]] = {"train": [], "validation": [], "test": []}
    for r in rows:
        by_split[SPLIT_SPELLINGS[r["split"]]].append((r["text"].strip(), r["key"]))
    classes = sorted({k for _, k in by_split["train"]})
    if not by_split["validation"] or len(classes) < 2:
        return None
    if any(k not in classes for split in ("validation", "test") for _, k in by_split[split]):
        return None
    return {s: [Example(t, classes.index(k)) for t, k in items] for s, items in by_split.items()}


def write_generated(folder: Path, spec: dict[str, Any]) -> Path:
    rows = spec["rows"]
    if spec["format"] == "csv":
        path = folder / "data.csv"
        buf = io.StringIO(newline="")
        writer = csv.writer(buf)
        writer.writerow(["text", "label", "split"])
        for r in rows:
            label = r["label"]
            writer.writerow([r["text"], "" if label is None else label, r["split"]])
            if spec["blank_lines"]:
                buf.write("\r\n")
        path.write_bytes(buf.getvalue().encode("utf-8"))
    else:
        path = folder / "data.jsonl"
        lines = [json.dumps({k: r[k] for k in ("text", "label", "split") if r[k] is not None},
                            ensure_ascii=spec["ascii"]) for r in rows]
        path.write_bytes(("\n\n" if spec["blank_lines"] else "\n").join(lines).encode("utf-8"))
    return path


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data_files())
def test_generated_files_load_exactly_or_raise_the_data_error(spec):
    expected = expected_outcome(spec["rows"])
    with tempfile.TemporaryDirectory() as folder:
        path = write_generated(Path(folder), spec)
        if expected is None:
            with pytest.raises(DataFileError):
                FileTask(path)
            return
        task = FileTask(path)
        for split, examples in expected.items():
            assert task.examples(split) == examples, split
        train_keys = sorted({r["key"] for r in spec["rows"] if SPLIT_SPELLINGS[r["split"]] == "train"})
        for name, (kind, key) in zip(task.labels, train_keys):  # the class names spell the classes
            assert (Fraction(name) if kind == "number" else name) == key


@st.composite
def csv_with_one_bad_row(draw) -> tuple[str, int, int]:
    """A CSV written by Python's writer with one row of the wrong width: (text, row, first line)."""
    n = draw(st.integers(1, 6))
    bad = draw(st.integers(0, n - 1))
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["text", "label"])
    line = None
    for i in range(n):
        if i == bad:
            line = line_breaks(buf.getvalue()) + 1
            fields = [draw(TEXTS), "x", draw(TEXTS)] if draw(st.booleans()) else [draw(TEXTS)]
            writer.writerow(fields)
        else:
            writer.writerow([draw(TEXTS), draw(st.sampled_from(NAMES))])
    assert line is not None
    return buf.getvalue(), bad + 1, line


@settings(max_examples=150, deadline=None)
@given(csv_with_one_bad_row())
def test_a_row_of_the_wrong_width_is_named_by_row_and_line(case):
    text, row, line = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bad.csv"
        path.write_bytes(text.encode("utf-8"))
        with pytest.raises(DataFileError) as info:
            FileTask(path)
    message = str(info.value)
    assert str(path) in message
    assert re.search(rf"row {row} \(lines? {line}(-\d+)?\) has \d+ fields? but the header has 2", message), message


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["csv", "jsonl"]), st.sampled_from(["utf-8", "latin-1", "utf-16"]))
def test_arbitrary_bytes_load_or_raise_only_the_data_error(raw, suffix, encoding):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"x.{suffix}"
        path.write_bytes(b"text,label,split\n" + raw if suffix == "csv" and raw[:1] != b"{" else raw)
        try:
            task = FileTask(path, encoding=encoding)
        except DataFileError:
            return
        assert task.examples("train") and task.examples("validation")
