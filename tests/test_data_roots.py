"""``data_roots``: the directories a node's owner lets ``data.local`` read. node.toml's list is
checked when it loads; a path is judged where it really is (symlinks and ``..`` resolved), so
nothing outside a root gets in through a link or a climb."""

from __future__ import annotations

from pathlib import Path

import pytest

from dllmd.config import ConfigError, NodeConfig
from dllmd.data.errors import PathForbidden
from dllmd.data.sources import path_under


def test_node_toml_data_roots_are_checked_and_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    home = tmp_path / "node"
    home.mkdir()
    assert NodeConfig(name="n").data_root_paths(home) == [(home / "data").resolve(), (tmp_path / "datasets").resolve()]
    config = NodeConfig(name="n", data_roots=["~/corpora", "/srv/data"])
    assert config.data_root_paths(home) == [(tmp_path / "me" / "corpora").resolve(), Path("/srv/data").resolve()]
    config.save(home)
    assert NodeConfig.load(home).data_roots == ["~/corpora", "/srv/data"]
    NodeConfig(name="n").save(home)
    assert "data_roots" not in (home / "node.toml").read_text()  # the default is no entry at all
    assert NodeConfig(name="n", data_roots=[]).data_root_paths(home) == []  # [] turns data.local off
    for bad, needle in (("data", "must be a list"), ([1], "non-empty path strings"), ([""], "non-empty path strings"),
                        (["relative/dir"], "absolute path or start with ~"),
                        (["~no-such-user-here-xyz/data"], "cannot expand")):
        with pytest.raises(ConfigError, match=needle):
            NodeConfig(name="n", data_roots=bad)
    (home / "node.toml").write_text("name = 'n'\ndata_roots = ['./x']\n")
    with pytest.raises(ConfigError, match="node.toml: data_roots entry './x'"):
        NodeConfig.load(home)


def test_only_paths_really_under_a_root_are_read(tmp_path):
    root, outside = tmp_path / "allowed", tmp_path / "private"
    (root / "corpus").mkdir(parents=True)
    outside.mkdir()
    (root / "corpus" / "a.txt").write_text("hello\n")
    (outside / "secret.txt").write_text("secret\n")
    (root / "link.txt").symlink_to(outside / "secret.txt")
    (root / "linkdir").symlink_to(outside)
    roots = [root.resolve()]
    assert path_under(str(root / "corpus"), roots) == (root / "corpus").resolve()
    assert path_under(f"file://{root}/corpus/a.txt", roots) == (root / "corpus" / "a.txt").resolve()
    assert path_under(str(root / "corpus" / ".." / "corpus"), roots) == (root / "corpus").resolve()
    for escape in (outside / "secret.txt", root / ".." / "private" / "secret.txt", root / "link.txt",
                   root / "linkdir", root / "linkdir" / "secret.txt", tmp_path / "allowed-not", outside / "missing"):
        with pytest.raises(PathForbidden, match="outside the directories this node reads data from"):
            path_under(str(escape), roots)
    with pytest.raises(PathForbidden, match="not an absolute path"):
        path_under("allowed/corpus", roots)
    with pytest.raises(PathForbidden, match=r"none: data_roots = \[\]"):
        path_under(str(root / "corpus"), [])
