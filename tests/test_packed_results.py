"""Per-query 0/1 vectors stored bit-packed beside a results JSON (tools/packed_results.py), and
the committed text guidance results in that form."""
import json
import os
import zipfile

import numpy as np
import pytest

from tools.packed_results import FIXED_ZIP_TIME, pack_bits, read_npz, unpack_bits, write_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELD = "hits"


def _results(rng: np.random.Generator) -> dict:
    return {"rows": {"a": {"0": {"full": {"subsets": {"all": {"num_texts": 13, FIELD: rng.integers(0, 2, 13).tolist()},
                                                      "none": {"num_texts": 0, FIELD: []}}}}},
                     "b": [{FIELD: [1, 0, 0, 1, 1, 1, 1, 1, 0]}]},
            "label": "kept as is"}


def test_pack_then_unpack_restores_the_lists(tmp_path):
    results = _results(np.random.default_rng(0))
    compact, arrays = pack_bits(results, FIELD)
    entry = compact["rows"]["a"]["0"]["full"]["subsets"]["all"][FIELD]
    assert entry == {"packed": "rows/a/0/full/subsets/all/hits", "count": 13}
    assert compact["rows"]["b"][0][FIELD] == {"packed": "rows/b/0/hits", "count": 9}
    assert arrays["rows/b/0/hits"].tolist() == [0b10011111, 0b00000000]  # 8 bits per byte
    assert results["rows"]["b"][0][FIELD] == [1, 0, 0, 1, 1, 1, 1, 1, 0]  # the input is not changed
    path = str(tmp_path / "hits.npz")
    write_npz(path, arrays)
    assert unpack_bits(json.loads(json.dumps(compact)), read_npz(path), FIELD) == results


def test_npz_bytes_do_not_depend_on_when_they_are_written(tmp_path):
    _, arrays = pack_bits(_results(np.random.default_rng(1)), FIELD)
    path = str(tmp_path / "hits.npz")
    write_npz(path, arrays)
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    assert [i.filename for i in infos] == sorted(f"{name}.npy" for name in arrays)
    assert all(i.date_time == FIXED_ZIP_TIME for i in infos)
    with np.load(path) as data:  # numpy's own reader
        assert set(data.files) == set(arrays)


def test_only_zero_one_lists_are_packed():
    with pytest.raises(ValueError, match="rows/x/hits must be a list of 0/1"):
        pack_bits({"rows": {"x": {FIELD: [0, 2, 1]}}}, FIELD)


def test_a_missing_array_is_named():
    compact, _ = pack_bits({"x": {FIELD: [1, 0]}}, FIELD)
    with pytest.raises(KeyError, match="x/hits is missing"):
        unpack_bits(compact, {}, FIELD)


@pytest.mark.parametrize("name", ["text_guidance", "text_guidance_previous_recipe"])
def test_committed_text_guidance_results_are_compact_and_complete(name):
    prefix = os.path.join(ROOT, "bench", "results", name)
    assert os.path.getsize(f"{prefix}.json") <= 1_000_000
    with open(f"{prefix}.json") as handle:
        compact = json.load(handle)
    arrays = read_npz(f"{prefix}_hits.npz")
    field = "t2v_hits_R@1"
    results = unpack_bits(compact, arrays, field)
    subsets = [subset for row in results["per_seed"].values() for seed in row.values()
               for protocol in seed.values() if isinstance(protocol, dict) and "subsets" in protocol
               for subset in protocol["subsets"].values()]
    assert subsets and len(arrays) == len(subsets)
    for subset in subsets:
        hits = np.asarray(subset[field])
        assert hits.size == subset["num_texts"]
        assert 100 * hits.mean() == pytest.approx(subset["t2v_R@1"])  # the hits are the R@1 reported
