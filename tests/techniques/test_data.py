import numpy as np
import pandas as pd
import pytest

from tasks.techniques.data import DataConfig, fingerprint, load_arrays, load_splits, save_splits, split


def _splits(cfg=DataConfig()):
    X, y, shape = load_arrays(cfg)
    return split(X, y, shape, cfg)


def test_digits_split_is_deterministic_and_disjoint():
    a, b = _splits(), _splits()
    assert a.num_features == 64 and a.num_classes == 10 and a.image_shape == (1, 8, 8)
    assert len(a.y_train) + len(a.y_val) + len(a.y_test) == 1797
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(_splits(DataConfig(seed=1)))
    # Standardised with train statistics: train columns have ~zero mean.
    assert np.abs(a.X_train.mean(axis=0)).max() < 1e-4


def test_splits_round_trip(tmp_path):
    s = _splits()
    loaded = load_splits(save_splits(s, tmp_path / "s.npz"))
    assert fingerprint(loaded) == fingerprint(s)
    assert loaded.image_shape == (1, 8, 8) and loaded.num_classes == 10


def test_user_files(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 3)), rng.integers(0, 3, 50)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    Xn, yn, shape = load_arrays(DataConfig(source=str(tmp_path / "d.npz")))
    assert Xn.shape == (50, 3) and Xn.dtype == np.float32 and shape is None
    frame = pd.DataFrame(X, columns=["a", "b", "c"]).assign(target=y)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        Xc, yc, _ = load_arrays(DataConfig(source=str(tmp_path / name), label_column="target"))
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
        load_arrays(DataConfig(source=str(path)))
    assert "data.source" in str(err.value)


def test_csv_without_label_column(tmp_path):
    pd.DataFrame({"a": [1, 2], "b": [0, 1]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ValueError, match=r"data.label_column: column 'label' not in .*d.csv"):
        load_arrays(DataConfig(source=str(tmp_path / "d.csv")))


def test_labels_beyond_num_classes(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((4, 2)), y=np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"data.num_classes: labels must be in 0..2, found 3"):
        load_arrays(DataConfig(source=str(tmp_path / "d.npz"), num_classes=3))


def test_image_shape_must_match_features():
    with pytest.raises(ValueError, match="data.image_shape"):
        load_arrays(DataConfig(image_shape=(1, 4, 4)))


def _new_npz(tmp_path, X, y):
    path = tmp_path / "new.npz"
    np.savez(path, X=X, y=y)
    return str(path)


def test_new_source_is_split_scaled_with_old_statistics_and_round_trips(tmp_path):
    from tasks.techniques.data import load_new_arrays

    old = DataConfig()
    X, y, shape = load_arrays(old)
    rng = np.random.default_rng(1)
    Xn, yn = (X[:100] * 16.0 + rng.normal(size=X[:100].shape)) / 16.0, y[:100]
    cfg = DataConfig(new_source=_new_npz(tmp_path, Xn, yn))
    plain = split(X, y, shape, old)
    mixed = split(X, y, shape, cfg, load_new_arrays(cfg, X.shape[1]))
    assert len(mixed.y_new) == 70 and len(mixed.y_val) == len(plain.y_val) + 15
    assert np.array_equal(mixed.X_train, plain.X_train)  # old data scaled as before: same statistics
    assert fingerprint(mixed) != fingerprint(plain)
    back = load_splits(save_splits(mixed, tmp_path / "s.npz"))
    assert np.array_equal(back.X_new, mixed.X_new) and np.array_equal(back.y_new, mixed.y_new)
    assert len(load_splits(save_splits(plain, tmp_path / "p.npz")).y_new) == 0


def test_new_source_must_match_the_old_data(tmp_path):
    from tasks.techniques.data import load_new_arrays

    X, y, shape = load_arrays(DataConfig())
    cfg = DataConfig(new_source=_new_npz(tmp_path, X[:50, :10], y[:50]))
    with pytest.raises(ValueError, match="data.new_source: .* has 10 features per sample, but data.source has 64"):
        load_new_arrays(cfg, 64)
    cfg = DataConfig(new_source=_new_npz(tmp_path, X[:50], y[:50] + 10))
    with pytest.raises(ValueError, match=r"data.new_source: labels must be in 0..9"):
        split(X, y, shape, cfg, load_new_arrays(cfg, 64))
    with pytest.raises(FileNotFoundError, match="data.new_source: file not found"):
        load_new_arrays(DataConfig(new_source=str(tmp_path / "missing.npz")), 64)
