"""Who a record is: the unit a privacy budget belongs to, and its side of a site's split.

A record's loss is the composition of every release computed from a data set that held
it, so the ledger must recognise the same record across runs, edits and re-encodings of a
file. A record's key is:

- its id, where the data gives one: ``sequence_id`` for numeric sequences (prefixed with
  ``client`` when the file has that column, since ids need only be unique per client), an
  ``id`` column for text;
- otherwise a hash of its content (text, or values and times, and label), with the
  occurrence number for exact duplicates, so that two copies of one message are two
  records, whatever the order of the file.

Reordering a file, re-encoding it (tokenizer, max-len) or adding records leaves every key
unchanged. Editing a record without an id (fixing a typo) makes it a new record: content
is all there is to recognise it by. Give ids where records are edited.

Which records a site holds out for evaluation is a keyed hash of the key, compared with
the evaluation fraction: stable per record (a record never moves because others were
added), and unpredictable to anyone without the key, which a deployed site keeps in its
ledger (``client.ledger``) and never sends.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import numpy as np

from fedrnn.shared.data.corpus import Corpus

KEY_BYTES = 16  # 128-bit content hashes: collisions are out of reach for any data set


def record_keys(corpus: Corpus) -> list[str]:
    """One key per record, in the corpus's order (see module docstring)."""
    if corpus.ids is not None:
        return [f"id:{i}" for i in corpus.ids]
    seen: dict[str, int] = {}
    keys = []
    for i in range(len(corpus)):
        digest = _content_hash(corpus, i)
        n = seen.get(digest, 0)
        seen[digest] = n + 1
        keys.append(f"h:{digest}" + (f"#{n}" if n else ""))
    return keys


def _content_hash(corpus: Corpus, i: int) -> str:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    if corpus.kind == "text":
        h.update(corpus.texts[i].encode("utf-8"))
    else:
        h.update(np.ascontiguousarray(corpus.values[i], dtype=np.float64).tobytes())
        h.update(b"\x1f")
        h.update(np.ascontiguousarray(corpus.times[i], dtype=np.float64).tobytes())
    if corpus.labels is not None:
        h.update(b"\x1e" + str(corpus.labels[i]).encode("utf-8"))
    return h.hexdigest()


def held_out(keys: Sequence[str], *, secret: bytes, eval_fraction: float) -> np.ndarray:
    """Boolean mask: which records evaluate rather than train.

    Record by record: HMAC-SHA256(secret, key) read as a number in [0, 1) below
    ``eval_fraction``. With two or more records and one side empty, the record nearest the
    threshold crosses, so a small site still trains and evaluates.
    """
    draws = np.array([int.from_bytes(hmac.new(secret, k.encode("utf-8"), hashlib.sha256)
                                     .digest()[:8], "big") / 2.0**64 for k in keys])
    mask = draws < eval_fraction
    if len(keys) >= 2 and mask.all():
        mask[int(np.argmax(draws))] = False
    elif len(keys) >= 2 and not mask.any():
        mask[int(np.argmin(draws))] = True
    return mask


def seeded_secret(seed: int) -> bytes:
    """A simulation's split key: from the run's seed, so a seeded run repeats exactly (the
    researcher holds every record there; a deployed site's key is random, in its ledger)."""
    return hashlib.sha256(f"fedrnn-split:{seed}".encode()).digest()
