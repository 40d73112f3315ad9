"""Files are written whole or not at all."""
import pytest
import torch

from pdiff.files import atomic_save, atomic_write, atomic_write_bytes, atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    atomic_write_text("old ≤ text\n", path)

    def half(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise KeyboardInterrupt  # a kill in the middle

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    assert path.read_text(encoding="utf-8") == "old ≤ text\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_writers_replace_the_file_whole(tmp_path):
    atomic_write_bytes(b"\x00\x01", tmp_path / "a.bin")
    atomic_write_bytes(b"\x02", tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == b"\x02"
    state = {"w": torch.arange(5.0)}
    atomic_save(state, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt")["w"], state["w"])
    seen = []
    atomic_write(tmp_path / "x.npy", seen.append, suffix=".npy")  # writers that need the suffix
    assert seen[0].endswith(".npy") and (tmp_path / "x.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "c.pt", "x.npy"]


def test_missing_directory_refused_unless_asked_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_text("x", tmp_path / "new" / "r.md")
    atomic_write_text("x", tmp_path / "new" / "deeper" / "r.md", make_parents=True)
    assert (tmp_path / "new" / "deeper" / "r.md").read_text() == "x"
