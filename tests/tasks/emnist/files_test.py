import lzma
import os
import shutil
import sqlite3

import numpy as np
import pytest

from tffpipe.data import example_proto
from tffpipe.tasks.emnist import files as emnist_files


def test_missing_file_names_the_file_and_how_to_get_it(tmp_path):
    with pytest.raises(emnist_files.DataFileError) as e:
        emnist_files.load_client_data(str(tmp_path))
    assert str(tmp_path / "emnist_all.sqlite") in str(e.value)
    assert "emnist_all.sqlite.lzma" in str(e.value) and "data directory" in str(e.value)


def test_still_compressed_file_is_recognised(tmp_path):
    (tmp_path / "emnist_all.sqlite").write_bytes(
        lzma.compress(b"SQLite format 3\x00" + b"\x00" * 100, format=lzma.FORMAT_ALONE)
    )
    with pytest.raises(emnist_files.DataFileError, match="not an SQLite database.*LZMA"):
        emnist_files.check_database(str(tmp_path / "emnist_all.sqlite"), only_digits=False)


def test_sqlite_without_the_tables_is_rejected(tmp_path):
    path = str(tmp_path / "emnist_all.sqlite")
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE other (x)")
    con.commit()
    con.close()
    with pytest.raises(emnist_files.DataFileError, match=r"lacks the tables \['client_metadata', 'examples'\]"):
        emnist_files.check_database(path, only_digits=False)


def test_empty_split_is_rejected(tiny_data_dir, tmp_path):
    path = str(tmp_path / "emnist_all.sqlite")
    with open(os.path.join(tiny_data_dir, "emnist_all.sqlite"), "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    con = sqlite3.connect(path)
    con.execute("DELETE FROM examples WHERE split_name='digits_only_test'")
    con.execute("DELETE FROM client_metadata WHERE split_name='digits_only_test'")
    con.commit()
    con.close()
    assert emnist_files.check_database(path, only_digits=False)["all_test"] == 12
    with pytest.raises(emnist_files.DataFileError, match="split 'digits_only_test'"):
        emnist_files.check_database(path, only_digits=True)


def test_truncated_database_is_reported_as_damaged(tiny_data_dir, tmp_path):
    path = str(tmp_path / "emnist_all.sqlite")
    with open(os.path.join(tiny_data_dir, "emnist_all.sqlite"), "rb") as src:
        head = src.read(8192)
    with open(path, "wb") as dst:
        dst.write(head)
    with pytest.raises(emnist_files.DataFileError, match="damaged|lacks|no clients"):
        emnist_files.check_database(path, only_digits=False)


def test_loader_yields_tff_emnist_elements_for_both_class_sets(tiny_data_dir):
    for only_digits, max_label in ((False, 61), (True, 9)):
        train, test = emnist_files.load_client_data(tiny_data_dir, only_digits)
        assert set(train.element_type_structure) == {"label", "pixels"}
        labels = [int(e["label"]) for cid in train.client_ids[:3] for e in train.create_tf_dataset_for_client(cid)]
        assert max(labels) <= max_label
        assert test.client_ids


def _with_one_example(tiny_data_dir: str, tmp_path, blob: bytes) -> str:
    """A copy of the tiny file whose every train example is `blob`."""
    path = str(tmp_path / "emnist_all.sqlite")
    with open(os.path.join(tiny_data_dir, "emnist_all.sqlite"), "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    con = sqlite3.connect(path)
    con.execute("UPDATE examples SET serialized_example_proto = ? WHERE split_name = 'all_train'", (blob,))
    con.commit()
    con.close()
    return path


@pytest.mark.parametrize(
    "features, message",
    [
        ({"label": [3], "pixels": np.zeros(27 * 28, np.float32)}, "has 756 pixel values instead of 784 floats"),
        ({"label": [62], "pixels": np.zeros(784, np.float32)}, r"has label \[62\] outside \[0, 62\)"),
        ({"label": [-1], "pixels": np.zeros(784, np.float32)}, r"has label \[-1\] outside"),
        ({"label": [3], "pixels": np.full(784, 2.0, np.float32)}, r"pixel values outside \[0, 1\]"),
        ({"pixels": np.zeros(784, np.float32)}, "lacks label"),
    ],
)
def test_examples_of_the_wrong_shape_or_labels_are_named_before_training(tiny_data_dir, tmp_path, features, message):
    path = _with_one_example(tiny_data_dir, tmp_path, example_proto.encode_example(features))
    with pytest.raises(emnist_files.DataFileError, match=message) as e:
        emnist_files.check_database(path, only_digits=False)
    assert "split 'all_train'" in str(e.value) and "\n" not in str(e.value)


def test_digit_labels_are_checked_against_ten_classes(tiny_data_dir, tmp_path):
    path = str(tmp_path / "emnist_all.sqlite")
    with open(os.path.join(tiny_data_dir, "emnist_all.sqlite"), "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    con = sqlite3.connect(path)
    blob = example_proto.encode_example({"label": [12], "pixels": np.zeros(784, np.float32)})
    con.execute("UPDATE examples SET serialized_example_proto = ? WHERE split_name = 'digits_only_train'", (blob,))
    con.commit()
    con.close()
    assert emnist_files.check_database(path, only_digits=False)  # 12 is a letter: fine for all 62 classes
    with pytest.raises(emnist_files.DataFileError, match=r"label \[12\] outside \[0, 10\)"):
        emnist_files.check_database(path, only_digits=True)


def test_tensorflow_reads_a_data_dir_named_with_uri_characters_as_a_plain_path(tiny_data_dir, tmp_path):
    directory = tmp_path / "a#b?mode=rw%41"  # SQLite URI syntax: TF's SqlDataset opens a plain path, not a URI
    directory.mkdir()
    shutil.copy(emnist_files.database_path(tiny_data_dir), directory)
    train, _ = emnist_files.load_client_rows(str(directory))
    expected, _ = emnist_files.load_client_rows(tiny_data_dir)
    client = expected.client_ids[0]
    rows = list(train.create_tf_dataset_for_client(client).as_numpy_iterator())
    assert rows == list(expected.create_tf_dataset_for_client(client).as_numpy_iterator()) and rows
    assert sorted(os.listdir(tmp_path)) == ["a#b?mode=rw%41"]
