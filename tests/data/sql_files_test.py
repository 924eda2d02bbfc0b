import dataclasses
import os
import shutil
import sqlite3
import subprocess

import pytest

from tffpipe import processes
from tffpipe.data import sql_files
from tffpipe.tasks.emnist import files


def test_statistics_are_the_per_client_counts(tiny_data_dir):
    path = files.database_path(tiny_data_dir)
    counts = sorted(sql_files.client_counts(path, "all_train").values())
    stats = sql_files.split_statistics(path, ["all_train"])["all_train"]
    assert stats["clients"] == 12 and stats["examples"] == sum(counts)
    assert (stats["min"], stats["max"]) == (counts[0], counts[-1])
    # 12 values: the median interpolates the 6th and 7th, p90 is 0.9 of the way from the 10th to the 11th.
    assert stats["median"] == (counts[5] + counts[6]) / 2
    assert stats["p90"] == pytest.approx(counts[9] + 0.9 * (counts[10] - counts[9]))


def test_only_temporary_files_of_dead_writers_are_removed(tmp_path):
    path = str(tmp_path / "data.sqlite")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"{path}.tmp-{dead.pid}", f"{path}.tmp-{os.getpid()}"
    for name in (stale, live):
        open(name, "wb").close()
    assert sql_files.remove_stale_temporaries(path) == [stale]
    assert os.path.exists(live)


def test_files_are_replaced_together_only_when_every_one_was_written(tmp_path):
    paths = [str(tmp_path / "a.txt"), str(tmp_path / "b.sqlite")]
    for path in paths:
        with open(path, "w") as f:
            f.write("old")
    with pytest.raises(RuntimeError), sql_files.replaced_atomically(*paths) as temporaries:
        for tmp in temporaries:
            with open(tmp, "w") as f:
                f.write("new")
        raise RuntimeError("the block failed")
    assert [_read(p) for p in paths] == ["old", "old"]
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.sqlite"]

    with sql_files.replaced_atomically(*paths) as temporaries:
        for tmp in temporaries:
            with open(tmp, "w") as f:
                f.write("new")
    assert [_read(p) for p in paths] == ["new", "new"]
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.sqlite"]


def test_a_new_database_records_its_generator_only_when_its_rows_were_written(tmp_path):
    path = str(tmp_path / "d.sqlite")
    with pytest.raises(RuntimeError), sql_files.new_database(path, 3, _Config(seed=1)):
        raise RuntimeError("the block failed")
    assert sql_files.recorded_config(path, 3, _Config) is None
    os.remove(path)
    with sql_files.new_database(path, 3, _Config(seed=1)) as con:
        con.execute("INSERT INTO examples VALUES ('train', 'c0', x'00')")
    assert sql_files.recorded_config(path, 3, _Config) == _Config(seed=1)
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM examples").fetchone() == (1,)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


@dataclasses.dataclass(frozen=True)
class _Config:
    seed: int


@pytest.mark.parametrize("directory", ["data#1", "data?mode=rw", "data%41", "da ta"])
def test_a_directory_named_with_uri_characters_is_read_where_it_is_and_nothing_is_created(
    tiny_data_dir, tmp_path, directory
):
    os.makedirs(tmp_path / directory)
    path = str(tmp_path / directory / "emnist_all.sqlite")
    shutil.copy(files.database_path(tiny_data_dir), path)
    # Unescaped, SQLite read "data#1/..." as the file "data" (created, empty, writable) and "%41" as "A".
    assert sql_files.check_database(path, ["all_train"], "") == {"all_train": 12}
    assert sorted(os.listdir(tmp_path)) == [directory]
    assert sql_files.read_only_uri(path).endswith("?mode=ro") and "#" not in sql_files.read_only_uri(path)
    with sql_files.connect(path) as con, pytest.raises(sqlite3.OperationalError, match="readonly"):
        con.execute("DELETE FROM examples")


def _checked(path: str, marks: str, seen: list[bytes], bad: bytes | None = None) -> bool:
    def problem(blob: bytes) -> str | None:
        seen.append(blob)
        return "is bad" if blob == bad else None

    return sql_files.check_every_row(
        path, problem, check_name="t-v1", marks_dir=marks, what_is_expected="Good rows are good.", how_to_get="Fix it."
    )


def test_every_row_is_checked_once_until_the_file_changes(tiny_data_dir, tmp_path):
    path, marks = str(tmp_path / "d.sqlite"), str(tmp_path / "marks")
    shutil.copy(files.database_path(tiny_data_dir), path)
    con = sqlite3.connect(path)
    rows = con.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
    seen: list[bytes] = []
    assert _checked(path, marks, seen) and len(seen) == rows
    assert not _checked(path, marks, seen) and len(seen) == rows  # the mark: no row read again
    con.execute("UPDATE examples SET serialized_example_proto = x'00' WHERE rowid = 1")
    con.commit()
    con.close()
    assert _checked(path, marks, seen) and len(seen) == 2 * rows  # written since: read again


def test_a_bad_row_is_named_with_its_client_and_split_and_leaves_no_mark(tiny_data_dir, tmp_path):
    path, marks = str(tmp_path / "d.sqlite"), str(tmp_path / "marks")
    shutil.copy(files.database_path(tiny_data_dir), path)
    con = sqlite3.connect(path)
    rowid, client = con.execute("SELECT rowid, client_id FROM examples WHERE split_name = 'all_test'").fetchone()
    con.execute("UPDATE examples SET serialized_example_proto = x'0badbad0' WHERE rowid = ?", (rowid,))
    con.commit()
    con.close()
    with pytest.raises(sql_files.DataFileError) as e:
        _checked(path, marks, [], bad=b"\x0b\xad\xba\xd0")
    assert (
        str(e.value) == f"{path}: row {rowid} (client {client!r}, split 'all_test') is bad; Good rows are good. Fix it."
    )
    assert not os.path.exists(marks)


def test_a_marks_directory_that_cannot_be_written_only_costs_the_check_again(tiny_data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    path = files.database_path(tiny_data_dir)
    with sql_files.connect(path) as con:
        (rows,) = con.execute("SELECT COUNT(*) FROM examples").fetchone()
    seen: list[bytes] = []
    assert _checked(path, str(blocker / "marks"), seen) and _checked(path, str(blocker / "marks"), seen)
    assert len(seen) == 2 * rows  # read twice, and no error


def test_a_directory_to_generate_in_must_be_writable(tmp_path, monkeypatch):
    assert sql_files.writable_directory(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root writes through chmod 555: fake a refusal
    with pytest.raises(sql_files.CacheDirError, match=r"cannot write the embedded data into .*/a/b \(not writable\)"):
        sql_files.writable_directory(str(tmp_path / "a" / "b"))


def test_checking_every_row_reports_clients_done_and_stops_when_asked(tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sql_files, "_STOP_POLL_ROWS", 10)  # the tiny file has hundreds of rows, not 10,000s
    path, marks = files.database_path(tiny_data_dir), str(tmp_path / "marks")
    with sql_files.connect(path) as con:
        (clients,) = con.execute("SELECT COUNT(*) FROM client_metadata").fetchone()  # 12 writers x 4 splits
    calls = []

    def check(**kwargs):
        return sql_files.check_every_row(
            path, lambda blob: None, check_name="t-v1", marks_dir=marks, what_is_expected="", how_to_get="", **kwargs
        )

    with pytest.raises(processes.Interrupted):
        check(stop_requested=lambda: True)
    assert not os.path.exists(marks)
    assert check(progress=lambda done, total: calls.append((done, total)))
    assert len(calls) > 2 and calls[-1] == (clients, clients) and all(t == clients for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-2][0] < clients
