"""A record is the unit of a budget: its identity survives reordering, re-encoding and
additions to its file, and its spent budget follows it into the next run."""

from __future__ import annotations

import json
import random

import pytest
from conftest import releases_by_site

from fedrnn.shared.cli import main
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data.identity import held_out, record_keys, seeded_secret
from fedrnn.shared.data.readers import read_file


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path, rows):
    import csv

    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_keys_survive_reordering_re_encoding_and_additions(tmp_path, series_csv):
    rows = [{"client": f"c{i % 2}", "text": f"message {i % 7}", "label": "a" if i % 3 else "b"}
            for i in range(20)]  # with exact duplicates: two copies are two records
    keys = record_keys(read_file(_jsonl(tmp_path / "m.jsonl", rows)))
    assert len(set(keys)) == 20
    shuffled = random.Random(1).sample(rows, len(rows))
    assert sorted(record_keys(read_file(_jsonl(tmp_path / "s.jsonl", shuffled)))) == sorted(keys)
    assert sorted(record_keys(read_file(_csv(tmp_path / "m.csv", shuffled)))) == sorted(keys)
    grown = record_keys(read_file(_jsonl(tmp_path / "g.jsonl", [*rows, {
        "client": "c0", "text": "a new one", "label": "a"}])))
    assert set(keys) < set(grown) and len(grown) == 21
    # given ids are the identity: an edited text keeps its budget
    with_ids = [{**r, "id": f"r{i}"} for i, r in enumerate(rows)]
    edited = [{**r, "text": r["text"] + "!"} for r in with_ids]
    assert record_keys(read_file(_jsonl(tmp_path / "i.jsonl", with_ids))) == record_keys(
        read_file(_jsonl(tmp_path / "e.jsonl", edited)))
    # numeric sequences: client and sequence id
    assert record_keys(read_file(series_csv))[:2] == ["id:ward-0/p0", "id:ward-1/p1"]


def test_duplicate_ids_are_refused(tmp_path, capsys):
    path = _jsonl(tmp_path / "d.jsonl", [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}])
    assert main(["simulate", "--data", str(path), "--task", "lm", "--out",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "id 'x' is given to more than one record" in err and "Traceback" not in err


def test_the_split_is_per_record_and_stable(tmp_path):
    keys = [f"id:{i}" for i in range(1000)]
    secret = b"s" * 32
    mask = held_out(keys, secret=secret, eval_fraction=0.2)
    assert 150 < mask.sum() < 250
    # adding records moves no existing record across the split
    more = held_out([*keys, *(f"id:new{i}" for i in range(50))], secret=secret,
                    eval_fraction=0.2)
    assert (more[:1000] == mask).all()
    # another key, another split: who evaluates is unpredictable without the key
    assert (held_out(keys, secret=b"t" * 32, eval_fraction=0.2) != mask).any()


@pytest.mark.e2e
def test_spent_records_are_not_trained_again_after_an_edit_in_a_simulation(tmp_path):
    rows = [{"client": f"clinic-{i % 2}", "text": f"visit {i} was {'good' if i % 2 else 'bad'}",
             "label": "pos" if i % 2 else "neg"} for i in range(24)]
    ledgers = tmp_path / "ledgers"
    common = ["simulate", "--task", "classify", "--rounds", "2", "--hidden-size", "8",
              "--epsilon", "3", "--ledger-dir", str(ledgers), "--batch-size", "8"]
    assert main([*common, "--data", str(_jsonl(tmp_path / "a.jsonl", rows)),
                 "--out", str(tmp_path / "first")]) == 0
    before = releases_by_site(ledgers)
    assert sorted(before) == ["clinic-0", "clinic-1"]
    # the file reordered, and one new record that trains (not one the split holds out)
    candidates = ({"client": "clinic-0", "text": f"a new visit {j}", "label": "neg"}
                  for j in range(100))
    secret = seeded_secret(RunConfig().seed)
    new = next(r for r in candidates if not held_out(
        record_keys(read_file(_jsonl(tmp_path / "one.jsonl", [r]))), secret=secret,
        eval_fraction=0.2)[0])
    edited = _jsonl(tmp_path / "b.jsonl", [*reversed(rows), new])
    assert main([*common, "--data", str(edited), "--out", str(tmp_path / "second")]) == 0
    after = releases_by_site(ledgers)
    fresh = {site: after[site][len(before[site]):] for site in after}
    assert fresh["clinic-1"] == []  # every record of it spent: it declined
    assert [r.records for r in fresh["clinic-0"]] == [1, 1]  # the new record alone trained
