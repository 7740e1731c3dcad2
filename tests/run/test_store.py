"""The run directory's SQLite store: round trips, transactions, resumption bookkeeping, refusal."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from pbrf.experiment.config import ConfigError, load_preset
from pbrf.experiment.run.rundir import check_run_dir
from pbrf.experiment.run.store import (
    ChunkResult,
    Store,
    atomic_write_text,
    from_blob,
    to_blob,
)


def _result(kind="pbrf", chunk=0, k=3, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    return ChunkResult(kind, chunk, rng.normal(size=(n_test, k)),
                       rng.normal(size=(k, n_test, 10)).astype(np.float32),
                       [{"steps": 5, "diverged": False, "objective": float(i)} for i in range(k)],
                           0.25)


def test_blob_roundtrip_keeps_dtype_shape_and_values():
    for arr in (np.arange(12, dtype=np.int64).reshape(3, 4),
                np.random.default_rng(0).normal(size=(2, 3, 4)),
                np.array([np.nan, np.inf, -1.0], dtype=np.float32)):
        back = from_blob(to_blob(arr))
        assert back.dtype == arr.dtype and back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)


def test_chunk_roundtrip_and_done(tmp_path):
    with Store(tmp_path) as store:
        assert store.done() == set()
        res = _result()
        store.put_chunk(res)
        assert store.done() == {("pbrf", 0)}
        back = store.get_chunk("pbrf", 0)
        np.testing.assert_array_equal(back.dm, res.dm)
        np.testing.assert_array_equal(back.df, res.df)
        assert back.diagnostics == res.diagnostics and back.seconds == 0.25
        assert store.get_chunk("pbrf", 1) is None


def test_gather_concatenates_in_chunk_order_and_refuses_missing(tmp_path):
    with Store(tmp_path) as store:
        parts = [_result(chunk=c, k=2 + c, seed=c) for c in (1, 0)]  # written out of order
        for p in parts:
            store.put_chunk(p)
        dm, df, diags = store.gather("pbrf", 2)
        np.testing.assert_array_equal(dm, np.concatenate([parts[1].dm, parts[0].dm], axis=1))
        assert df.shape == (5, 4, 10) and len(diags) == 5
        with pytest.raises(KeyError, match="chunks \\[2\\]"):
            store.gather("pbrf", 3)


def test_arrays_and_meta(tmp_path):
    with Store(tmp_path) as store:
        store.put_arrays({"groups": np.array([[1, -1], [2, 3]]), "test_index": np.arange(4)})
        store.set_meta("n_train", 200)
        store.set_meta("x", {"a": float("nan")})
    with Store(tmp_path, readonly=True) as ro:
        np.testing.assert_array_equal(ro.get_array("groups"), [[1, -1], [2, 3]])
        assert ro.get_meta("n_train") == 200 and ro.get_meta("x") == {"a": "nan"}
        assert ro.get_array("nope") is None and ro.get_meta("nope", 7) == 7


def test_a_failed_write_leaves_no_row(tmp_path):
    with Store(tmp_path) as store:
        store.put_chunk(_result())
        bad = _result(chunk=1)
        bad.df = np.array([object()])  # .npy without pickle refuses object arrays
        with pytest.raises(ValueError):
            store.put_chunk(bad)
        bad = _result(chunk=2)
        bad.seconds = None  # NOT NULL constraint fails inside the transaction: rolled back
        with pytest.raises(sqlite3.IntegrityError):
            store.put_chunk(bad)
        assert store.done() == {("pbrf", 0)}


def test_rows_survive_an_unclosed_connection(tmp_path):
    """A committed chunk is on disk even if the writer never closes (as after kill -9)."""
    store = Store(tmp_path)
    store.put_chunk(_result())
    other = sqlite3.connect(tmp_path / "results.sqlite")
    assert other.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 1
    other.close()
    store.close()


def test_check_run_dir_modes(tmp_path):
    cfg = load_preset("digits-mlp", "tiny")
    assert check_run_dir(tmp_path / "new", cfg, overwrite=False) == "new"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    assert check_run_dir(run, cfg, overwrite=False) == "resume"
    other = load_preset("digits-mlp", "tiny", ["influence.damping=0.5"])
    # nothing computed yet (no θ^s, e.g. base training failed): a corrected config replaces it
    assert check_run_dir(run, other, overwrite=False) == "overwrite"
    (run / "theta_s.safetensors").write_bytes(b"results")
    with pytest.raises(ConfigError, match="different config.*--overwrite"):
        check_run_dir(run, other, overwrite=False)
    assert check_run_dir(run, other, overwrite=True) == "overwrite"
    # --overwrite always starts afresh
    assert check_run_dir(run, cfg, overwrite=True) == "overwrite"
    # the description does not define the experiment
    d = json.loads(cfg.to_json())
    d["description"] = "edited"
    (run / "config.json").write_text(json.dumps(d))
    assert check_run_dir(run, cfg, overwrite=False) == "resume"


def test_a_multi_seed_folder_with_results_is_not_replaced_silently(tmp_path):
    """A multi-seed folder never has θ^s at its top; its seeds' θ^s are results all the same
    (a single-seed run on it used to delete every seed=K/ without --overwrite).
    """
    multi = load_preset("digits-mlp", "tiny", ["run.seeds=2"])
    single = load_preset("digits-mlp", "tiny")
    run = tmp_path / "ms"
    (run / "seed=0").mkdir(parents=True)
    (run / "config.json").write_text(multi.to_json())
    assert check_run_dir(run, single, overwrite=False) == "overwrite"  # no seed computed yet
    (run / "seed=0" / "theta_s.safetensors").write_bytes(b"results")
    with pytest.raises(ConfigError, match="different config.*--overwrite"):
        check_run_dir(run, single, overwrite=False)
    assert check_run_dir(run, single, overwrite=True) == "overwrite"


def test_check_run_dir_refuses_foreign_directories(tmp_path):
    cfg = load_preset("digits-mlp", "tiny")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a pbrf run directory"):
        check_run_dir(tmp_path, cfg, overwrite=False)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_run_dir(f, cfg, overwrite=True)


def test_atomic_write_text_replaces_whole_file(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_overwrite_refuses_the_directory_it_runs_in(tmp_path, monkeypatch):
    cfg = load_preset("digits-mlp", "tiny")
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "config.json").write_text(cfg.to_json())
    for here, target in ((run, Path(".")), (run / "sub", Path(".."))):
        monkeypatch.chdir(here)
        with pytest.raises(ConfigError, match="holds the current directory"):
            check_run_dir(target, cfg, overwrite=True)
    monkeypatch.chdir(tmp_path)
    assert check_run_dir(run, cfg, overwrite=True) == "overwrite"
