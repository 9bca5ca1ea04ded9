import pytest

from dae import io


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    io.write_json(target, {"a": 1})
    io.write_json(target, {"a": 2})
    assert target.read_text() == '{\n  "a": 2\n}\n'
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    io.write_text(target, "old")

    def broken_writer(tmp):
        tmp.write_text("half of the new cont")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        io.write_with(target, broken_writer)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_interrupt_during_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.pt"
    io.write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_outputs_get_the_usual_permissions(tmp_path):
    target = tmp_path / "x.txt"
    io.write_text(target, "x")
    assert target.stat().st_mode & 0o044  # readable by group/others (mkstemp alone gives 0600)


def test_saved_checkpoints_are_byte_identical(tmp_path):
    import torch

    state = {"w": torch.arange(12.0).reshape(3, 4)}
    io.save_torch(tmp_path / "a.pt", state)
    io.save_torch(tmp_path / "b.pt", state)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt")["w"], state["w"])
