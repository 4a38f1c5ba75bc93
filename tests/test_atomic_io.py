"""The one atomic file writer (atomic_io.py): all or nothing, old file kept on failure."""
import json
import os

import numpy as np
import pytest
import torch

from atomic_io import TEMP_MARKER, atomic_path, save_torch, temp_path, write_json, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(str(target), {"R@1": 1.0})
    with pytest.raises(TypeError):
        write_json(str(target), {"R@1": object()}, default=None)  # fails halfway through json.dump
    assert json.loads(target.read_text()) == {"R@1": 1.0}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_temporary_name_is_hidden_beside_the_target_with_its_extension(tmp_path):
    tmp = temp_path(str(tmp_path / "sim_matrix.npy"))
    assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".")
    assert tmp.endswith(".npy") and TEMP_MARKER in tmp
    # np.save would append ".npy" to a name without it; the temporary keeps it, so the rename finds the file.
    with atomic_path(str(tmp_path / "sub" / "sim_matrix.npy")) as path:
        np.save(path, np.arange(3))
    assert np.load(tmp_path / "sub" / "sim_matrix.npy").tolist() == [0, 1, 2]
    assert os.listdir(tmp_path / "sub") == ["sim_matrix.npy"]


def test_writers_round_trip(tmp_path):
    write_text(str(tmp_path / "page.md"), "# results\n")
    assert (tmp_path / "page.md").read_text() == "# results\n"
    write_json(str(tmp_path / "a.json"), {"path": tmp_path}, indent=None)  # default=str encodes the path
    assert (tmp_path / "a.json").read_text() == json.dumps({"path": str(tmp_path)})
    save_torch({"w": torch.ones(2)}, str(tmp_path / "state.pt"))
    assert torch.equal(torch.load(tmp_path / "state.pt")["w"], torch.ones(2))
