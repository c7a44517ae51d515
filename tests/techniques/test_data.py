import numpy as np
import pandas as pd
import pytest

from optforge.tasks.techniques.data.data import DataConfig, Part, fingerprint, load_splits, save_splits
from optforge.tasks.techniques.data.sources import prepare
from optforge.tasks.techniques.data.split import split_indices
from optforge.tasks.techniques.data.tables import read_table


def _splits(root, cfg=None):
    """Prepare ``cfg``'s (default: digits) split folder under ``root`` and open it (memory-mapped)."""
    folder = prepare(cfg or DataConfig(), root)
    return folder, load_splits(folder)


def test_digits_split_is_deterministic_and_disjoint(tmp_path):
    folder_a, a = _splits(tmp_path / "a")
    folder_b, _ = _splits(tmp_path / "b")
    assert a.contract.num_features == 64 and a.num_classes == 10 and a.contract.image_shape == (1, 8, 8)
    assert a.contract.kind == "table" and a.contract.names == ("input",)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert fingerprint(folder_a) == fingerprint(folder_b) == folder_a.name  # the folder is named by its content
    assert prepare(DataConfig(), tmp_path / "a") == folder_a  # preparing again finds the same folder
    other, _ = _splits(tmp_path / "a", DataConfig(seed=1))
    assert fingerprint(other) != fingerprint(folder_a) and other != folder_a
    # Standardised with train statistics: train columns have ~zero mean.
    assert np.abs(np.asarray(a.train.inputs["input"]).mean(axis=0)).max() < 1e-4
    # Disjoint and complete: the split indices every source uses cover each sample exactly once.
    train, val, test = split_indices(1797, DataConfig())
    assert (len(train), len(val), len(test)) == (len(a.train), len(a.val), len(a.test))
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(1797))


def test_splits_round_trip(tmp_path):
    _, s = _splits(tmp_path / "prepared")
    assert isinstance(s.train.inputs["input"], np.memmap)  # opened memory-mapped, not read whole
    saved = save_splits(s, tmp_path / "copy")
    loaded = load_splits(saved)
    assert loaded.contract == s.contract
    assert loaded.contract.image_shape == (1, 8, 8) and loaded.num_classes == 10
    for name in ("train", "val", "test", "new"):
        a, b = loaded.part(name), s.part(name)
        assert np.array_equal(a.inputs["input"], b.inputs["input"]) and np.array_equal(a.labels, b.labels)
    # save_splits always writes the (here empty) new part, which prepare leaves out without data.new_source,
    # so the copy's fingerprint is that of its own re-save rather than of the prepared folder.
    assert fingerprint(save_splits(loaded, tmp_path / "again")) == fingerprint(saved)


def test_part_reads_rows_batches_and_cycled_indices():
    X, y = np.arange(10, dtype=np.float32).reshape(5, 2), np.arange(5)
    part = Part({"input": X}, y)
    assert len(part) == 5 and np.array_equal(part.rows(1, 3)["input"], X[1:3])
    assert np.array_equal(part.take([4, 5, 6])["input"], X[[4, 0, 1]])  # indices past the end cycle
    assert len(part.head(2)) == 2 and np.array_equal(part.head(2).inputs["input"], X[:2])
    batches = list(part.batches(2))
    assert [len(b["input"]) for b, _ in batches] == [2, 2, 1] and [list(lbl) for _, lbl in batches] == [[0, 1], [2, 3], [4]]
    both = Part.concat(part, part.head(1))
    assert len(both) == 6 and np.array_equal(both.inputs["input"][-1], X[0])


def test_user_files(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 3)), rng.integers(0, 3, 50)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    Xn, yn = read_table(str(tmp_path / "d.npz"), "label")
    assert Xn.shape == (50, 3) and Xn.dtype == np.float32 and yn.dtype == np.int64
    _, s = _splits(tmp_path / "splits", DataConfig(source=str(tmp_path / "d.npz")))
    assert s.contract.image_shape is None and s.contract.num_features == 3
    frame = pd.DataFrame(X, columns=["a", "b", "c"]).assign(target=y)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        Xc, yc = read_table(str(tmp_path / name), "target")
        np.testing.assert_array_equal(yc, y)
        np.testing.assert_allclose(Xc, X.astype(np.float32))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "file not found"),
        (lambda p: p.write_text("not a zip"), "not a readable .npz"),
        (lambda p: np.savez(p, X=np.ones((3, 2)), y=np.array([0, 1])), "X has 3 rows but y has 2"),
        (lambda p: np.savez(p, X=np.array([[np.nan, 1.0], [0, 1]]), y=np.array([0, 1])), "NaN or infinite"),
        (lambda p: np.savez(p, X=np.ones((2, 2)), y=np.array([0, -1])), "labels must be in"),
        (lambda p: np.savez(p, X=np.ones((0, 2)), y=np.array([], dtype=int)), "empty"),
        (lambda p: np.savez(p, features=np.ones((2, 2))), "expected arrays 'X' and 'y'"),
    ],
)
def test_bad_npz(tmp_path, make, match):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        prepare(DataConfig(source=str(path)), tmp_path / "splits")
    assert "data.source" in str(err.value)
    assert not list((tmp_path / "splits").iterdir())  # no half-written split folder is left behind


def test_csv_without_label_column(tmp_path):
    pd.DataFrame({"a": [1, 2], "b": [0, 1]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ValueError, match=r"data.label_column: column 'label' not in .*d.csv"):
        prepare(DataConfig(source=str(tmp_path / "d.csv")), tmp_path / "splits")


def test_labels_beyond_num_classes(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((4, 2)), y=np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"data.num_classes: labels must be in 0..2, found 3"):
        prepare(DataConfig(source=str(tmp_path / "d.npz"), num_classes=3), tmp_path / "splits")


def test_image_shape_must_match_features(tmp_path):
    with pytest.raises(ValueError, match="data.image_shape"):
        prepare(DataConfig(image_shape=(1, 4, 4)), tmp_path / "splits")


def _new_npz(tmp_path, X, y):
    path = tmp_path / "new.npz"
    np.savez(path, X=X, y=y)
    return str(path)


def test_new_source_is_split_scaled_with_old_statistics_and_round_trips(tmp_path):
    X, y = read_table("digits", "label")
    rng = np.random.default_rng(1)
    Xn, yn = (X[:100] * 16.0 + rng.normal(size=X[:100].shape)) / 16.0, y[:100]
    cfg = DataConfig(new_source=_new_npz(tmp_path, Xn, yn))
    plain_folder, plain = _splits(tmp_path / "splits")
    mixed_folder, mixed = _splits(tmp_path / "splits", cfg)
    assert len(mixed.new) == 70 and len(mixed.val) == len(plain.val) + 15
    assert np.array_equal(mixed.train.inputs["input"], plain.train.inputs["input"])  # same statistics
    assert fingerprint(mixed_folder) != fingerprint(plain_folder)
    assert len(mixed.fit) == len(mixed.train) + 70  # training iterates over the old train part, then the new one
    by_source = mixed.test_by_source()  # the old test rows, then the new ones: scored apart after fine-tuning
    assert np.array_equal(by_source["old"].labels, plain.test.labels) and len(by_source["new"]) == 15
    assert plain.test_by_source() == {}
    back = load_splits(save_splits(mixed, tmp_path / "s"))
    assert np.array_equal(back.new.inputs["input"], mixed.new.inputs["input"])
    assert np.array_equal(back.new.labels, mixed.new.labels)
    assert len(load_splits(save_splits(plain, tmp_path / "p")).new) == 0


def test_new_source_must_match_the_old_data(tmp_path):
    X, y = read_table("digits", "label")
    cfg = DataConfig(new_source=_new_npz(tmp_path, X[:50, :10], y[:50]))
    with pytest.raises(ValueError, match="data.new_source: .* has 10 features per sample, but data.source has 64"):
        prepare(cfg, tmp_path / "splits")
    cfg = DataConfig(new_source=_new_npz(tmp_path, X[:50], y[:50] + 10))
    with pytest.raises(ValueError, match=r"data.new_source: labels must be in 0..9"):
        prepare(cfg, tmp_path / "splits")
    with pytest.raises(FileNotFoundError, match="data.new_source: file not found"):
        prepare(DataConfig(new_source=str(tmp_path / "missing.npz")), tmp_path / "splits")
