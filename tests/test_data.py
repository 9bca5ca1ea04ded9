import gzip
import shutil
import struct

import numpy as np
import pytest

from dae.data import DATASETS, DataError, download, read_idx, read_idx_split, split_indices


def write_idx(path, array: np.ndarray, magic: int | None = None) -> None:
    magic = magic if magic is not None else 0x0800 | array.ndim
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "x", images)
    assert np.array_equal(read_idx(tmp_path / "x"), images)


def test_read_idx_rejects_wrong_magic(tmp_path):
    write_idx(tmp_path / "x", np.zeros((2, 3), np.uint8), magic=0x0D02)
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "x")


def test_read_idx_rejects_size_mismatch(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 28, 28), np.uint8))
    data = (tmp_path / "x").read_bytes()
    (tmp_path / "x").write_bytes(data[:-10])
    with pytest.raises(DataError, match="header says"):
        read_idx(tmp_path / "x")


def test_real_mnist_downloads_and_loads(mnist_raw):
    images, labels = read_idx_split(mnist_raw, "train")
    assert images.shape == (60000, 784) and labels.shape == (60000,)
    assert set(np.unique(labels)) == set(range(10))
    test_images, _ = read_idx_split(mnist_raw, "test")
    assert test_images.shape == (10000, 784)


def _mirror_copy(mnist_mirror, tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(mnist_mirror, mirror)
    for f in mirror.iterdir():
        f.chmod(0o644)
    return mirror


def test_checksum_mismatch_names_the_file_and_leaves_nothing(mnist_mirror, tmp_path):
    mirror = _mirror_copy(mnist_mirror, tmp_path)
    target = mirror / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(target.read_bytes()))
    content[100] ^= 1  # a valid file with one flipped label
    target.write_bytes(gzip.compress(bytes(content)))
    out = tmp_path / "raw"
    with pytest.raises(DataError, match="checksum mismatch for t10k-labels-idx1-ubyte"):
        download("mnist", out, mirrors=[str(mirror)])
    assert list(out.iterdir()) == []


def test_missing_file_falls_back_to_next_mirror(mnist_mirror, tmp_path):
    broken = _mirror_copy(mnist_mirror, tmp_path)
    (broken / "train-labels-idx1-ubyte.gz").unlink()
    sources = download("mnist", tmp_path / "raw", mirrors=[str(broken), str(mnist_mirror)])
    assert sources["train-labels-idx1-ubyte"].startswith(str(mnist_mirror))
    assert sources["t10k-images-idx3-ubyte"].startswith(str(broken))


def test_unreachable_mirrors_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        download("mnist", tmp_path / "raw", mirrors=[str(tmp_path / "nowhere"), "http://127.0.0.1:9/"],
                 timeout=2)
    assert list((tmp_path / "raw").iterdir()) == []


def test_truncated_gzip_is_reported(mnist_mirror, tmp_path):
    mirror = _mirror_copy(mnist_mirror, tmp_path)
    target = mirror / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated or corrupt"):
        download("mnist", tmp_path / "raw", mirrors=[str(mirror)])


def test_a_file_missing_from_the_only_mirror_is_named(mnist_mirror, tmp_path):
    mirror = _mirror_copy(mnist_mirror, tmp_path)
    (mirror / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is missing from mirror"):
        download("mnist", tmp_path / "raw", mirrors=[str(mirror)])
    assert list((tmp_path / "raw").iterdir()) == []  # no partial set of files


def test_an_empty_mirror_names_the_first_missing_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte is missing"):
        download("mnist", tmp_path / "raw", mirrors=[str(tmp_path / "empty")])


def test_a_split_with_one_image_short_is_refused(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:-784])  # one image short of what the header says
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: header says \(3, 28, 28\)"):
        read_idx_split(tmp_path, "test")


def test_images_that_are_not_28x28_are_refused(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 14, 56), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="expected 28x28 images"):
        read_idx_split(tmp_path, "test")


def test_known_checksums_are_the_published_ones():
    assert DATASETS["mnist"].sha256["train-images-idx3-ubyte"].startswith("ba891046")


def test_split_is_disjoint_and_deterministic():
    train, val = split_indices(100, 10, seed=0)
    assert len(train) == 90 and len(val) == 10 and not set(train) & set(val)
    assert np.array_equal(split_indices(100, 10, seed=0)[1], val)
    assert not np.array_equal(split_indices(100, 10, seed=1)[1], val)


@pytest.mark.skipif(not (__import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir()),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.delenv("DAE_DATA_MIRROR", raising=False)
    sources = download("fashion-mnist", tmp_path, mirrors=["/usr/share/datasets/fashion-mnist"])
    assert len(sources) == 4
    images, labels = read_idx_split(tmp_path, "test")
    assert images.shape == (10000, 784) and sorted(set(labels.tolist())) == list(range(10))
