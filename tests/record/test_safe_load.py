"""Records load with weights_only=True; anything beyond the numpy allow-list is refused by name."""
import io
import os
import zipfile

import numpy as np
import pytest
import torch

from backdoor_lens.errors import UserError
from backdoor_lens.record.safe_load import safe_torch_load


class Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "attack_result.pt"
    torch.save({"model": {}, "evil": Malicious(marker)}, path)
    with pytest.raises(UserError, match=r"needs the global (posix|os|nt)\.system.*--trust_record"):
        safe_torch_load(path)
    assert not marker.exists()


def test_numpy_arrays_and_int64_keys_load(tmp_path):
    path = tmp_path / "r.pt"
    torch.save({"a": np.arange(3, dtype=np.int64), "f": np.zeros(2), np.int64(4): "x"}, path)
    loaded = safe_torch_load(path)
    assert loaded["a"].tolist() == [0, 1, 2] and loaded[np.int64(4)] == "x"


def test_numpy1_global_names_load(tmp_path):
    """Files written under numpy 1 name numpy.core.multiarray; rewrite a numpy-2 file to that spelling."""
    path = tmp_path / "new.pt"
    torch.save({"a": np.arange(4, dtype=np.int64), "k": {np.int64(2): 1}}, path)
    old = tmp_path / "old.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(item, data)
    loaded = safe_torch_load(old)
    assert loaded["a"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("content", [b"", b"not a torch file at all", None])
def test_unreadable_files_are_user_errors(tmp_path, content):
    path = tmp_path / "attack_result.pt"
    if content is None:
        buffer = io.BytesIO()
        torch.save({"model": {"w": torch.zeros(1000)}}, buffer)
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a readable torch file"):
        safe_torch_load(path)


def test_trust_record_allows_other_globals(tmp_path):
    path = tmp_path / "r.pt"
    torch.save({"model": {}, "when": __import__("datetime").date(2024, 1, 2)}, path)
    with pytest.raises(UserError, match="datetime"):
        safe_torch_load(path)
    assert safe_torch_load(path, trust_record=True)["when"].year == 2024


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        safe_torch_load(tmp_path / "nope.pt")
