import pytest

from fedrnn.shared.data.readers import read_file
from fedrnn.simulations.fine_foods import main


def test_writes_every_review_as_a_records_file_data_reads(tmp_path):
    out = tmp_path / "reviews.jsonl"
    assert main([str(out)]) == 0
    corpus = read_file(out)
    assert corpus.kind == "text" and len(corpus) == 5000
    assert corpus.clients is None  # one review per product: no natural partition
    assert corpus.label_set == ["great", "other"]
    assert len(set(corpus.ids.tolist())) == 5000
    assert not any("<br" in t.lower() for t in corpus.texts)
    assert all(t.strip() for t in corpus.texts)


def test_refuses_a_file_data_would_not_read(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "reviews.txt")])
    assert exit_.value.code == 2
    assert "must end in .jsonl" in capsys.readouterr().err
    assert not (tmp_path / "reviews.txt").exists()
