"""store/trust.py and the description checks of store/shards.py: what a dataset.json that someone else
wrote may cause. Commands run only with the reading command's --allow-commands and never from a
description read from a URL (a real HTTP server on 127.0.0.1); entries stay inside their folder; a shard
that cannot be read is one line in every reader."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from pipeline.errors import UserError
from store import trust
from store.shards import load_dataset
from store.stream import sample_stream

EXTRACT = ["extract", "--ckpt", "none", "--model", "ballad-tiny", "--batch-size", "64", "--workers", "1",
           "--device", "cpu", "--splits", "train"]
PHASE_A = ["phase-a", "--model", "ballad-tiny", "--epochs", "2", "--batch-size", "32", "--workers", "1",
           "--device", "cpu", "--select", "last", "--eval-every", "0", "--optimizer", "adamw", "--lr", "1e-3"]


def _run(*args) -> tuple[int, list[str], BaseException | None]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output.strip().splitlines(), result.exception


def _refused(match: str, *args) -> None:
    """Exit ≠ 0 with one line matching ``match``, no traceback."""
    code, lines, exc = _run(*args)
    assert code != 0 and isinstance(exc, SystemExit) and len(lines) == 1, lines
    assert lines[0].startswith("Error: ") and re.search(match, lines[0]), lines


def _described(src: Path, dest: Path, entries=None, **fields) -> Path:
    """A copy of the dataset ``src`` whose dataset.json has the train split's shards replaced by ``entries``
    (counts kept) and ``fields`` set: what a folder made elsewhere may hold."""
    shutil.copytree(src, dest)
    meta = json.loads((dest / "dataset.json").read_text())
    if entries is not None:
        train = meta["splits"]["train"]
        train["shards"] = entries
        train.pop("shard_bytes", None)
        train.pop("shard_sha256", None)
    meta.update(fields)
    (dest / "dataset.json").write_text(json.dumps(meta))
    return dest


@pytest.mark.parametrize("url, kind", [
    ("data/train/shard-000000.tar", "file"), ("/abs/shard.tar", "file"), ("file:///abs/shard.tar", "file"),
    ("http://host/a.tar", "url"), ("HTTPS://host/a.tar", "url"), ("s3://bucket/a.tar", "url"), ("gs://b/a.tar", "url"),
    ("pipe:cat a.tar", "command"),
])
def test_every_shard_entry_is_a_file_a_url_or_a_command(url, kind):
    assert trust.kind(url) == kind


@pytest.mark.parametrize("url", ["ais://bucket/a.tar", "zip://a.tar::file:///x.zip", "simplecache::http://h/a.tar",
                                 "memory://a.tar", "ftp://host/a.tar", "dvc://x"])
def test_any_other_url_form_is_refused_in_one_line(url):
    with pytest.raises(UserError, match=r"unsupported shard URL \(shards are local paths, http://"):
        trust.kind(url)


def test_the_opener_runs_no_command_that_nobody_allowed(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(UserError, match="a shard command nobody allowed to run; pass --allow-commands"):
        list(sample_stream([f"pipe:touch {marker}; cat /dev/null"], split_by_worker=False))
    assert not marker.exists()


def test_a_description_read_from_a_url_never_runs_its_commands(tiny_data, server, tmp_path):
    www, base = server
    marker = tmp_path / "ran"
    shard = load_dataset(tiny_data).urls("train")[0]
    # the reproduction: an http dataset.json whose shard list names a command
    _described(tiny_data, www / "hostile", [f"pipe:touch {marker}; cat {shard}"], indexed=True)
    url = f"{base}/hostile"
    refusal = (r"pipe:touch .*: a shard command in http://127\.0\.0\.1:\d+/hostile/dataset.json, a description read "
               r"from a URL; commands from a URL are never run")
    for consent in ([], ["--allow-commands"]):  # not even with the user's consent
        _refused(refusal, *EXTRACT, "--data", url, "--out", tmp_path / "x.zarr", *consent)
        _refused(refusal, *PHASE_A, "--data", url, "--out", tmp_path / "run", *consent)
    with pytest.raises(UserError, match=refusal):
        load_dataset(url, allow_commands=True)
    assert not marker.exists() and not (tmp_path / "x.zarr").exists() and not (tmp_path / "run").exists()


def test_a_local_description_runs_its_commands_only_with_the_readers_consent(tiny_data, tmp_path):
    marker = tmp_path / "ran"
    urls = load_dataset(tiny_data).urls("train")
    ds = _described(tiny_data, tmp_path / "folder", [f"pipe:touch {marker}; cat {urls[0]}", *urls[1:]], indexed=True)
    refusal = (rf"pipe:touch .*: a shard command in {ds}/dataset.json; run it only if you trust that file: pass "
               r"--allow-commands$")
    _refused(refusal, *EXTRACT, "--data", ds, "--out", tmp_path / "x.zarr")
    _refused(refusal, *PHASE_A, "--data", ds, "--out", tmp_path / "run")
    assert not marker.exists()
    code, lines, _ = _run(*EXTRACT, "--data", ds, "--out", tmp_path / "x.zarr", "--allow-commands")
    assert code == 0, lines
    assert marker.exists()  # the command ran, because the user said so


def test_http_shards_are_read_without_starting_a_process(tiny_data, server, monkeypatch):
    www, base = server
    shutil.copytree(tiny_data, www / "plain")
    info = load_dataset(f"{base}/plain")

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)  # webdataset reads http(s) through curl
    streamed = [label for _, _, label in sample_stream(info.urls("train"), split_by_worker=False)]
    assert len(streamed) == info.split("train").num_samples


@pytest.mark.parametrize("entry, fields, message", [
    ("../elsewhere/shard.tar", {}, "leaves the dataset's folder"),
    ("train/../../shard.tar", {"indexed": True}, "leaves the dataset's folder"),
    ("/etc/passwd", {}, "only `prepare index` describes shards outside the dataset's folder"),
    ("http://host/a.tar", {}, "only `prepare index` describes shards outside"),
    ("ais://bucket/a.tar", {"indexed": True}, "unsupported shard URL"),
])
def test_entries_stay_inside_what_the_description_is_about(tiny_data, tmp_path, entry, fields, message):
    ds = _described(tiny_data, tmp_path / "ds", [entry], **fields)
    with pytest.raises(UserError, match=rf"^{ds}/dataset.json: shard '{entry}' of split 'train'.*{message}|"
                                        rf"^{entry}: {message}"):
        load_dataset(ds)


def test_a_description_at_a_url_names_no_file_on_this_machine(tiny_data, server):
    www, base = server
    for i, entry in enumerate(("/etc/passwd", "file:///etc/passwd")):
        _described(tiny_data, www / f"local{i}", [entry], indexed=True)
        with pytest.raises(UserError, match="a description read from a URL cannot name files on this machine"):
            load_dataset(f"{base}/local{i}")


@pytest.mark.parametrize("fields, message", [
    ({"command": "rm -rf ~"}, r"key 'command' is 'rm -rf ~'; expected null or the `ballad-pipe prepare SOURCE …` command"),
    ({"command": "ballad-pipe prepare synthetic; rm -rf ~"}, r"key 'command' is .*; expected null or the `ballad-pipe prepare"),
    ({"command": "ballad-pipe prepare synthetic --out /elsewhere"}, r"key 'command' is .*; expected null or the `ballad-pipe"),
    ({"template": "{0.__class__.__init__}{}"}, r"key 'template' is .*; expected a prompt template: one \{\}"),
    ({"template": "a {} and a {}"}, r"key 'template' is 'a \{\} and a \{\}'; expected a prompt template"),
    ({"splits": {"../../x": {"shards": [], "num_samples": 0, "class_counts": [0] * 30}}},
     r"split '\.\./\.\./x' is not a split name"),
])
def test_fields_that_reach_further_than_a_value_are_refused(tiny_data, tmp_path, fields, message):
    ds = _described(tiny_data, tmp_path / "ds", **fields)
    with pytest.raises(UserError, match=rf"^{ds}/dataset.json: {message}"):
        load_dataset(ds)


def test_a_shard_that_cannot_be_read_is_one_line_in_phase_a_and_extract(tiny_data, tmp_path):
    # the second case: a command whose output is no tar (here: nothing) ended phase-a in a traceback
    ds = _described(tiny_data, tmp_path / "empty", ["pipe:cat /dev/null"], indexed=True)
    unreadable = r"^Error: pipe:cat /dev/null: unreadable shard \(ReadError"
    _refused(unreadable, *PHASE_A, "--data", ds, "--out", tmp_path / "run", "--allow-commands")
    _refused(unreadable, *EXTRACT, "--data", ds, "--out", tmp_path / "x.zarr", "--allow-commands")
    # a local shard overwritten with garbage of its recorded size passes the size check and fails as it streams
    ds = _described(tiny_data, tmp_path / "garbage")
    shard = ds / load_dataset(ds).split("train").shards[0]
    shard.write_bytes(b"\x17" * shard.stat().st_size)
    _refused(rf"^Error: {shard}: unreadable shard \(", *EXTRACT, "--data", ds, "--out", tmp_path / "y.zarr")
