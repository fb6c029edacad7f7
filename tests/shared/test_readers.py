import json

import numpy as np
import pytest

from fedrnn.shared.data.readers import read_file
from fedrnn.shared.errors import DataError


def test_jsonl_text(text_jsonl):
    corpus = read_file(text_jsonl)
    assert corpus.kind == "text" and len(corpus) == 30
    assert set(corpus.clients) == {"clinic-0", "clinic-1", "clinic-2"}
    assert corpus.label_set == ["neg", "pos"]


def test_csv_text_without_client(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text,label\n"hello, world",a\nsecond message,b\n')
    corpus = read_file(path)
    assert corpus.texts == ["hello, world", "second message"] and corpus.clients is None


def test_long_csv_groups_sorts_and_keeps_missing(series_csv, tmp_path):
    corpus = read_file(series_csv)
    assert corpus.kind == "series" and len(corpus) == 24
    assert corpus.feature_names == ("hr", "temp")
    assert all(np.all(np.diff(t) >= 0) for t in corpus.times)
    assert any(np.isnan(v).any() for v in corpus.values)  # missing stays missing
    # rows out of time order and dates as times
    path = tmp_path / "dates.csv"
    path.write_text("sequence_id,time,x\na,2024-01-03,3\na,2024-01-01,1\nb,2024-02-01,5\n")
    corpus = read_file(path)
    assert corpus.values[0][:, 0].tolist() == [1.0, 3.0]
    assert corpus.times[0][1] - corpus.times[0][0] == pytest.approx(2.0)


@pytest.mark.parametrize("name,content,expected", [
    ("empty.jsonl", "", "file is empty"),
    ("broken.jsonl", '{"text": "ok"}\n{"text": "no end\n', r"line 2: broken JSON"),
    ("notext.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"line 2: missing 'text'"),
    ("partial.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n',
     r"line 2: 'label' is given on some lines"),
    ("empty.csv", "", "file is empty"),
    ("header.csv", "sequence_id,time,x\n", "only a header"),
    ("nocol.csv", "sequence_id,x\n1,2\n", "missing column 'time'"),
    ("nofeat.csv", "sequence_id,time\n1,2\n", "no numeric feature columns"),
    ("text.csv", "sequence_id,time,x\n1,0,1.5\n1,1,high\n", r"line 3, column 'x': non-numeric"),
    ("inf.csv", "sequence_id,time,x\n1,0,inf\n", r"line 2, column 'x': infinite"),
    ("badtime.csv", "sequence_id,time,x\n1,yesterday,1\n", r"line 2, column 'time'"),
    ("label.csv", "sequence_id,time,x,label\n1,0,1,a\n1,1,2,b\n", "2 different labels"),
    ("what.csv", "a,b\n1,2\n", "needs a 'text' column"),
    ("data.parquet", "x", "unsupported file type"),
])
def test_bad_files_name_file_and_place(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=expected) as info:
        read_file(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_file(tmp_path / "nope.jsonl")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps({"text": "x"}).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_file(path)
