"""Model repository: both layouts, the name rule, containment, newest-version tracking."""

from __future__ import annotations

import os
import shutil
import time
from functools import partial
from pathlib import Path

import pytest

from worker import repository
from worker.errors import ModelNotFound
from worker.repository import MODEL_FILE, ModelRef, ModelRepository, valid_name


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"onnx?")  # the repository never parses files
    return path


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    _touch(repo / "a" / "1" / "model.onnx")
    _touch(repo / "a" / "2" / "model.onnx")
    _touch(repo / "a" / "10" / "model.onnx")  # numeric, not lexicographic order
    _touch(repo / "b.onnx")
    _touch(repo / "c.onnx")
    _touch(repo / "c" / "3" / "model.onnx")
    return repo


def test_both_layouts_mixed(root: Path) -> None:
    repo = ModelRepository(root)
    assert repo.names() == ["a", "b", "c"]
    assert repo.versions("a") == [1, 2, 10]
    assert repo.versions("b") == [1]
    assert repo.versions("c") == [1, 3]
    assert repo.versions("nope") == []
    ref = repo.resolve("a")
    assert ref == ModelRef("a", 10, (root / "a" / "10" / "model.onnx").resolve())
    assert repo.resolve("a", 2).version == 2
    assert repo.resolve("b").path == (root / "b.onnx").resolve()
    assert repo.resolve("c").version == 3
    assert repo.resolve("c", 1).path == (root / "c.onnx").resolve()


def test_directory_layout_wins_for_version_1(tmp_path: Path) -> None:
    _touch(tmp_path / "m.onnx")
    _touch(tmp_path / "m" / "1" / "model.onnx")
    assert ModelRepository(tmp_path).resolve("m").path == (tmp_path / "m/1/model.onnx").resolve()


def test_ignores_non_version_entries(tmp_path: Path) -> None:
    _touch(tmp_path / "m" / "1" / "model.onnx")
    _touch(tmp_path / "m" / "01" / "model.onnx")  # would alias version 1
    _touch(tmp_path / "m" / "0" / "model.onnx")
    _touch(tmp_path / "m" / "latest" / "model.onnx")
    _touch(tmp_path / "m" / "7" / "other.onnx")
    (tmp_path / "m" / "8").mkdir()
    _touch(tmp_path / "notes.txt")
    repo = ModelRepository(tmp_path)
    assert repo.versions("m") == [1]
    assert repo.names() == ["m"]


def test_not_found_messages(root: Path) -> None:
    repo = ModelRepository(root)
    with pytest.raises(ModelNotFound, match=r"'zzz' not found.*zzz/<version>/model.onnx"):
        repo.resolve("zzz")
    with pytest.raises(ModelNotFound, match=r"no version 3 \(available: 1, 2, 10\)"):
        repo.resolve("a", 3)


@pytest.mark.parametrize("version", [0, -1, True, 1.0, "1"])
def test_bad_versions(root: Path, version: object) -> None:
    with pytest.raises(ModelNotFound, match="positive integer"):
        ModelRepository(root).resolve("a", version)  # type: ignore[arg-type]


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    # The message names the directory, not a flag: the CLIs add their own flag names.
    with pytest.raises(ValueError, match=r"model repository .*missing is not a directory$"):
        ModelRepository(tmp_path / "missing")


BAD_NAMES = [
    "../x", "..", ".", "a/b", "a\\b", "/etc/passwd", "x\x00y", "", ".hidden", "-x", "_x",
    " x", "x\n", "a" * 129, "ü", "a b", "a:1",
]


class _Guarded:
    """Stands for a module inside ``worker.repository`` only: the listed calls fail the
    test, everything else is the real module's (pytest's own file access goes on)."""

    def __init__(self, real: object, forbidden: set[str], **inner: object) -> None:
        self._real, self._forbidden, self._inner = real, forbidden, inner

    def __getattr__(self, attr: str) -> object:
        if attr in self._forbidden:
            return partial(_touched, attr)
        return self._inner.get(attr, getattr(self._real, attr))


def _touched(call: str, *args: object, **kwargs: object) -> None:
    raise AssertionError(f"file system touched for a bad name: {call}{args}")


class _GuardedPath(type(Path())):  # type: ignore[misc]
    """The repository's root: a path whose file-system methods fail the test."""

    def _touch_fs(self, *args: object, **kwargs: object) -> None:
        _touched("Path", self, *args)

    stat = lstat = iterdir = open = resolve = readlink = glob = _touch_fs
    exists = is_dir = is_file = is_symlink = _touch_fs


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused_before_any_filesystem_access(
    root: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = ModelRepository(root)
    repo.root = _GuardedPath(repo.root)
    fs = {"scandir", "stat", "lstat", "listdir", "open", "readlink", "walk"}
    paths = {"realpath", "isfile", "isdir", "exists", "join"}
    monkeypatch.setattr(repository, "os", _Guarded(os, fs, path=_Guarded(os.path, paths)))
    with pytest.raises(ModelNotFound, match="invalid model name"):
        repo.resolve(name)
    with pytest.raises(ModelNotFound, match="invalid model name"):
        repo.versions(name)
    assert not valid_name(name)


def test_the_guard_of_the_bad_names_test_sees_the_repositorys_file_access(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = ModelRepository(root)
    guard = _Guarded(os, {"scandir"}, path=_Guarded(os.path, {"join"}))
    monkeypatch.setattr(repository, "os", guard)
    with pytest.raises(AssertionError, match=r"file system touched for a bad name: join"):
        repo.resolve("a")  # a good name: the repository looks on disk
    assert os.path.isdir(os.path.join(root, "a"))  # the process's own os is untouched
    monkeypatch.setattr(repository, "os", os)
    repo.root = _GuardedPath(repo.root)
    with pytest.raises(AssertionError, match="file system touched for a bad name: Path"):
        repo.root.is_dir()


def test_name_rule_accepts_the_documented_alphabet() -> None:
    for name in ("a", "A9", "mnist-mlp", "iris_logreg.v2", "a" * 128, "x..y"):
        assert valid_name(name), name


def test_symlinks_pointing_outside_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    secret = _touch(outside / "secret" / "1" / "model.onnx")
    root = tmp_path / "repo"
    _touch(root / "ok" / "1" / "model.onnx")
    (root / "evil").symlink_to(outside / "secret")  # whole model dir
    (root / "evil2.onnx").symlink_to(secret)  # single-file layout
    (root / "mixed").mkdir()
    (root / "mixed" / "1").symlink_to(outside / "secret" / "1")  # a version dir
    _touch(root / "mixed" / "2" / "x")
    (root / "mixed" / "2" / "model.onnx").symlink_to(secret)  # the file itself
    (root / "inner").symlink_to(root / "ok")  # inside: allowed
    repo = ModelRepository(root)
    for name in ("evil", "evil2", "mixed"):
        with pytest.raises(ModelNotFound):
            repo.resolve(name)
    assert repo.names() == ["inner", "ok"]
    assert repo.resolve("inner").path == (root / "ok" / "1" / "model.onnx").resolve()


def test_root_given_through_a_symlink(tmp_path: Path) -> None:
    _touch(tmp_path / "real" / "m" / "1" / "model.onnx")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert ModelRepository(tmp_path / "link").resolve("m").version == 1


def test_new_version_picked_up_within_rescan(root: Path) -> None:
    repo = ModelRepository(root, rescan_s=0.2)
    assert repo.resolve("a").version == 10
    _touch(root / "a" / "11" / "model.onnx")
    deadline = time.monotonic() + 3
    while repo.resolve("a").version != 11:
        assert time.monotonic() < deadline, "new version not picked up"
        time.sleep(0.05)
    assert repo.resolve("a", 11).version == 11  # an explicit request sees it at once


def test_newest_is_cached_between_rescans(root: Path) -> None:
    repo = ModelRepository(root, rescan_s=60)
    assert repo.resolve("a").version == 10
    _touch(root / "a" / "11" / "model.onnx")
    assert repo.resolve("a").version == 10  # cached: a hit costs one stat, not a scan


def test_deleted_newest_falls_back_at_once(root: Path) -> None:
    repo = ModelRepository(root, rescan_s=60)
    assert repo.resolve("a").version == 10
    shutil.rmtree(root / "a" / "10")
    assert repo.resolve("a").version == 2
    with pytest.raises(ModelNotFound, match="no version 10"):
        repo.resolve("a", 10)
    shutil.rmtree(root / "a")
    with pytest.raises(ModelNotFound, match="not found"):
        repo.resolve("a")


# -- publishing a version ----------------------------------------------------------


def _stage(repo: ModelRepository, name: str, payload: bytes = b"new") -> Path:
    """A staged version that stays on disk (the test publishes or inspects it)."""
    with repo.staging(name, tag="test") as work:
        (work / MODEL_FILE).write_bytes(payload)
        (work / "notes.json").write_text("{}")
        kept = work.with_name(work.name + "-kept")
        work.rename(kept)
    return kept


def test_publish_makes_the_staged_directory_the_next_version(root: Path) -> None:
    repo = ModelRepository(root, rescan_s=3600)  # a long rescan: only publish refreshes it
    assert repo.resolve("a").version == 10
    with repo.staging("a") as work:
        assert work.parent == root / "a" and work.name.startswith(".stage-")
        assert repo.versions("a") == [1, 2, 10]  # the scan ignores a staging directory
        (work / MODEL_FILE).write_bytes(b"eleven")
        (work / "optimize.json").write_text("{}")
        ref = repo.publish_version("a", work)
        assert not work.exists()
    assert ref == ModelRef("a", 11, (root / "a" / "11" / MODEL_FILE).resolve())
    assert (root / "a" / "11" / "optimize.json").read_text() == "{}"
    assert repo.resolve("a") == ref  # the cached "newest" was dropped by the publish
    assert repo.versions("a") == [1, 2, 10, 11]
    assert not list((root / "a").glob(".*"))


def test_staging_is_removed_when_not_published(root: Path) -> None:
    repo = ModelRepository(root)
    with pytest.raises(RuntimeError), repo.staging("a") as work:
        (work / MODEL_FILE).write_bytes(b"half")
        raise RuntimeError("the build failed")
    assert not list((root / "a").glob(".*"))
    assert repo.versions("a") == [1, 2, 10]


def test_flat_model_gets_its_first_version_directory(root: Path) -> None:
    repo = ModelRepository(root)
    with repo.staging("b") as work:
        (work / MODEL_FILE).write_bytes(b"two")
        assert repo.publish_version("b", work).version == 2
    assert repo.resolve("b", 1).path == (root / "b.onnx").resolve()
    assert repo.resolve("b").path == (root / "b" / "2" / MODEL_FILE).resolve()


def test_numeric_directories_without_a_model_are_never_replaced(root: Path) -> None:
    (root / "a" / "11").mkdir()  # someone's half-made version
    (root / "a" / "12").mkdir()
    (root / "a" / "12" / "x").write_text("taken")
    repo = ModelRepository(root)
    with repo.staging("a") as work:
        (work / MODEL_FILE).write_bytes(b"new")
        assert repo.publish_version("a", work).version == 13
    assert list((root / "a" / "11").iterdir()) == []
    assert (root / "a" / "12" / "x").read_text() == "taken"


def test_a_version_taken_meanwhile_moves_the_publish_on(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers: the other one creates version 11 between our scan and our rename."""
    repo = ModelRepository(root)
    staged = _stage(repo, "a")
    real_rename = os.rename

    def racing_rename(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == "11" and not Path(dst).exists():
            _touch(Path(dst) / MODEL_FILE)  # the other writer wins version 11
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", racing_rename)
    ref = repo.publish_version("a", staged)
    assert ref.version == 12 and ref.path.read_bytes() == b"new"
    assert (root / "a" / "11" / MODEL_FILE).read_bytes() == b"onnx?"


def test_publish_refuses_what_is_not_a_staged_version(root: Path, tmp_path: Path) -> None:
    repo = ModelRepository(root)
    elsewhere = tmp_path / "elsewhere"
    _touch(elsewhere / MODEL_FILE)
    with pytest.raises(ValueError, match="not a staging directory of model 'a'"):
        repo.publish_version("a", elsewhere)
    with pytest.raises(ValueError, match="not a staging directory"):
        repo.publish_version("a", root / "a" / "2")  # a published version is not staging
    with pytest.raises(ValueError, match=f"holds no {MODEL_FILE}"), repo.staging("a") as work:
        repo.publish_version("a", work)
    staged_for_c = _stage(repo, "c")
    with pytest.raises(ValueError, match="not a staging directory of model 'a'"):
        repo.publish_version("a", staged_for_c)
    with pytest.raises(ModelNotFound):
        repo.publish_version("../a", staged_for_c)
    assert repo.versions("a") == [1, 2, 10] and repo.versions("c") == [1, 3]


def test_staging_refuses_a_model_path_that_is_a_file(tmp_path: Path) -> None:
    _touch(tmp_path / "m")  # a file named like the model, beside m.onnx
    _touch(tmp_path / "m.onnx")
    repo = ModelRepository(tmp_path)
    with pytest.raises(NotADirectoryError, match="is not a directory"), repo.staging("m"):
        pass  # pragma: no cover
    with pytest.raises(ModelNotFound), repo.staging("../m"):
        pass  # pragma: no cover
