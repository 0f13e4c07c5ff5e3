"""A saved adapter is a folder swapped in whole: a reader sees the old or the new one, never a
mix; a crash or a caught failure leaves one of them and no temporary behind.

* kill-during-save: a child process saves version after version and is SIGKILLed at random
  times; afterwards load gives exactly one saved version (its config and its tensors agree),
  never an older one than before, and leftovers are cleaned by the load;
* a reader racing a writer that alternates two adapters reads one of the two exactly, every time;
* both with the one-step swap (``renameat2(RENAME_EXCHANGE)``) and with the two-rename fallback;
* a full disk (ENOSPC) leaves the old folder intact, no temporary, and a message that says so.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.core import files, state
from tests.conftest import batch, out, perturb, tiny_llama
from tests.test_files import CONFIG, WEIGHTS

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

INPUTS = batch()
MODES = {"exchange": files._exchange, "two-renames": lambda a, b: False}


@pytest.fixture(params=list(MODES))
def mode(request, monkeypatch):
    monkeypatch.setattr(files, "EXCHANGE", MODES[request.param])
    return request.param


def _version(model, directory: Path, v: int) -> None:
    """Save version ``v``: alpha = v and every adapter tensor filled with v (r depends on v's
    parity, so that a mix of two versions also mis-shapes)."""
    if peftlab.adapters(model):
        peftlab.detach(model)
    peftlab.attach(model, "lora", r=2 + 2 * (v % 2), alpha=float(v), target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for p in peftlab.adapter_parameters(model, "default").values():
            p.fill_(float(v))
    peftlab.save(model, directory)


def _loaded_version(base, directory: Path) -> int:
    """The version in ``directory``, checked to be one whole save: its config's alpha, its r and
    every tensor agree."""
    peftlab.load(base, directory)
    try:
        method = peftlab.adapters(base)["default"]
        v = int(method.alpha)
        assert method.alpha == v and method.r == 2 + 2 * (v % 2), f"config of no single save: {method}"
        values = {float(x) for t in peftlab.adapter_parameters(base, "default").values() for x in t.unique()}
        assert values == {float(v)}, f"alpha {v} from one save, tensor values {values} from another"
        return v
    finally:
        peftlab.detach(base)


def _fork(work) -> int:
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 0
        try:
            work()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def _kill(pid: int) -> None:
    done, status = os.waitpid(pid, os.WNOHANG)
    assert not done, f"the writer died on its own (status {status})"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _leftovers(directory: Path) -> list[str]:
    inside = [n for n in os.listdir(directory) if n.startswith(".")] if directory.is_dir() else []
    return [p.name for p in files.leftovers(directory)] + inside


# ----------------------------------------------------------------------------- kill during save
def test_a_save_killed_at_any_instant_leaves_exactly_one_version(tmp_path, mode):
    d = tmp_path / "adapter"
    writer, base = tiny_llama(), tiny_llama()
    began = time.perf_counter()
    _version(writer, d, 1)
    one_save = time.perf_counter() - began  # the kill window scales with it: a loaded machine saves slower
    last, r, mid_save, changed = 1, 0, 0, 0
    rng = random.Random(0)
    # at least 30 kills, and more (up to 150) until three of them have landed inside a save:
    # where a kill lands is up to the scheduler, so a fixed count of rounds can miss the window
    while r < 30 or (mid_save < 3 and r < 150):
        r += 1
        start = 1000 * r

        def loop(start=start):
            for v in range(start, start + 10**6):
                _version(writer, d, v)

        pid = _fork(loop)
        time.sleep(rng.uniform(0.0, max(0.08, 4 * one_save)))
        _kill(pid)
        mid_save += bool(files.leftovers(d))
        v = _loaded_version(base, d)
        assert v == last or v >= start, f"round {r}: version {v} after {last}"
        changed += v != last
        last = v
        assert _leftovers(d) == [], "load did not clean what the killed writer left"
    print(f"{mode}: {r} kills, {changed} after a new version, {mid_save} inside a save")
    # the kills landed both between and inside saves
    assert changed >= 10 and mid_save >= 3, (r, changed, mid_save)


# ----------------------------------------------------------------------------- reader vs writer
def test_a_reader_racing_a_writer_sees_one_adapter_or_the_other(tmp_path, mode):
    d = tmp_path / "adapter"
    writer, base = tiny_llama(), tiny_llama()
    _version(writer, d, 1)

    def alternate():
        while True:
            _version(writer, d, 1)
            _version(writer, d, 2)

    pid = _fork(alternate)
    seen = {1: 0, 2: 0}
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline or min(seen.values()) == 0:
            seen[_loaded_version(base, d)] += 1
            assert time.monotonic() < deadline + 10, f"the reader saw only {seen}"
    finally:
        _kill(pid)
    print(f"{mode}: reads {seen}")
    assert seen[1] > 5 and seen[2] > 5, seen


# ----------------------------------------------------------------------------- crashes in between
def test_a_writer_that_died_between_the_two_renames_is_recovered_by_load(tmp_path):
    d = tmp_path / "adapter"
    model = tiny_llama()
    _version(model, d, 1)
    new = tmp_path / ".adapter.peftlab-new-1-ab"
    _version(model, new, 2)
    os.rename(d, tmp_path / ".adapter.peftlab-old-1-ab")  # the instant between the renames
    assert _loaded_version(tiny_llama(), d) == 2
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_a_temporary_left_by_a_killed_writer_is_ignored_and_cleaned(tmp_path):
    d = tmp_path / "adapter"
    model = tiny_llama()
    _version(model, d, 1)
    tmp = tmp_path / ".adapter.peftlab-tmp-1-ab"
    tmp.mkdir()
    (tmp / WEIGHTS).write_bytes(b"half a file")
    assert _loaded_version(tiny_llama(), d) == 1
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


# ----------------------------------------------------------------------------- failures
@pytest.mark.parametrize("existed", [True, False])
def test_a_full_disk_leaves_the_old_folder_and_no_temporary(tmp_path, monkeypatch, existed):
    d = tmp_path / "adapter"
    model = tiny_llama()
    if existed:
        _version(model, d, 1)
    before = {p.name: p.read_bytes() for p in d.iterdir()} if existed else None
    parent = sorted(os.listdir(tmp_path))

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(files, "write_bytes", full)
    with pytest.raises(peftlab.PeftlabError) as info:
        _version(model, d, 2)
    msg = str(info.value)
    assert "No space left on device" in msg and "free some disk space" in msg
    assert "overwritten" not in msg
    assert sorted(os.listdir(tmp_path)) == parent, "a temporary was left behind"
    if existed:
        assert "still holds the previous version, unchanged" in msg
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before
        monkeypatch.undo()
        assert _loaded_version(tiny_llama(), d) == 1
    else:
        assert "was not created" in msg and not d.exists()


def test_a_failed_swap_says_what_the_folder_holds(tmp_path, monkeypatch):
    d = tmp_path / "adapter"
    model = tiny_llama()
    _version(model, d, 1)

    def broken(a, b):
        raise OSError(errno.EIO, "Input/output error", str(b))

    monkeypatch.setattr(files, "EXCHANGE", broken)
    with pytest.raises(peftlab.PeftlabError, match="still holds the previous version"):
        _version(model, d, 2)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    monkeypatch.undo()
    assert _loaded_version(tiny_llama(), d) == 1


# ----------------------------------------------------------------------------- what else is in the folder
def test_other_files_and_adapters_in_the_folder_are_kept(tmp_path):
    d = tmp_path / "adapter"
    model = tiny_llama()
    peftlab.attach(model, "lora", r=4, target_modules=["q_proj"])
    peftlab.attach(model, "lora", name="other", r=2, target_modules=["v_proj"], activate=False)
    perturb(peftlab.adapter_parameters(model, "other"), seed=4)
    peftlab.save(model, d)
    (d / "README.md").write_text("my notes\n")
    (d / "tokenizer.json").write_text("{}\n")
    peftlab.use(model, "other")
    want_other = out(model, INPUTS)
    perturb(peftlab.adapter_parameters(model, "default"), seed=5)
    peftlab.save(model, d, names="default")  # only default: other/ and the user's files stay
    assert (d / "README.md").read_text() == "my notes\n" and (d / "tokenizer.json").read_text() == "{}\n"
    fresh = tiny_llama()
    peftlab.load(fresh, d / "other", name="other")
    torch.testing.assert_close(out(fresh, INPUTS), want_other, atol=1e-6, rtol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_a_link_to_a_folder_stays_a_link(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    model = tiny_llama()
    _version(model, real, 1)
    link.symlink_to(real)
    _version(model, link, 2)
    assert link.is_symlink() and _loaded_version(tiny_llama(), real) == 2


def test_save_into_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(peftlab.PeftlabError, match="is a file"):
        _version(tiny_llama(), f, 1)
    assert f.read_text() == "x"


def test_the_header_records_the_config_it_was_saved_with(tmp_path):
    d = tmp_path / "adapter"
    _version(tiny_llama(), d, 3)
    _, _, metadata = state.read(d)
    assert metadata["peftlab_config_sha256"] == state._config_digest(json.loads((d / CONFIG).read_text()))
