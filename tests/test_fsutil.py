"""Safe outputs: check_output_folder / atomic_output_folder, and the convert CLI's target checks
(through ``python -m mlx_sora.convert``): nothing the command did not create is ever deleted."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_sora
from mlx_sora.errors import UserError, describe_os_error
from mlx_sora.io.fsutil import (
    apply_umask,
    atomic_output_folder,
    check_output_folder,
    current_umask,
    is_converted_folder,
    remove_stale_temporaries,
)

FIXTURES = Path(__file__).parent / "fixtures" / "opensora12"
# mlx_sora exports a convert() function that shares its name with the CLI module mlx_sora.convert:
# importing the module rebinds the package attribute, so put the function back.
_convert_function = mlx_sora.convert
convert_cli = importlib.import_module("mlx_sora.convert")
mlx_sora.convert = _convert_function


def ours(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "vae", "mlx_sora": {"format": 1}}))
    return folder


def not_ours(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("precious")
    return folder


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(previous)


# ---------------------------------------------------------------- check_output_folder


def test_a_fresh_folder_is_accepted_and_resolved(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert check_output_folder(tmp_path / "link" / "out") == (tmp_path / "real" / "out").resolve()
    assert check_output_folder(tmp_path / "a" / "b" / "c") == (tmp_path / "a" / "b" / "c").resolve()


@pytest.mark.parametrize("target, relation", [("src", "is"), ("src/sub", "lies inside"), (".", "contains"),
                                              ("link", "is")])
def test_source_is_protected(tmp_path, target, relation):
    source = tmp_path / "src"
    source.mkdir()
    (tmp_path / "link").symlink_to(source)
    with pytest.raises(UserError, match=f"{relation} the source folder"):
        check_output_folder(tmp_path / target, sources=[source], overwrite=True, is_ours=lambda p: True)


def test_current_home_and_root_are_protected(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "w" / "work"
    home.mkdir()
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    everything = dict(overwrite=True, is_ours=lambda p: True)
    for target, message in [(".", "is the current folder"), ("..", "contains the current folder"),
                            (str(home), "is your home folder"), ("~", "is your home folder"),
                            ("/", "is the file system root")]:
        with pytest.raises(UserError, match=message):
            check_output_folder(target, **everything)
    check_output_folder("weights/out")  # inside the current folder or home is where outputs go
    check_output_folder(home / "weights" / "out")


def test_existing_content_is_left_alone(tmp_path):
    other = not_ours(tmp_path / "other")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not an earlier output") as info:
            check_output_folder(other, overwrite=overwrite, is_ours=is_converted_folder)
        assert str(other) in str(info.value)
    with pytest.raises(UserError, match="not an earlier output"):  # no is_ours: nothing is ours
        check_output_folder(ours(tmp_path / "previous"), overwrite=True)
    assert (other / "notes.txt").read_text() == "precious"


def test_overwrite_replaces_only_our_previous_output(tmp_path):
    previous = ours(tmp_path / "previous")
    with pytest.raises(UserError, match="pass --overwrite"):
        check_output_folder(previous, is_ours=is_converted_folder)
    assert check_output_folder(previous, overwrite=True, is_ours=is_converted_folder) == previous.resolve()
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty")


def test_files_and_unwritable_places(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder; give the path of a folder"):
        check_output_folder(tmp_path / "file")
    with pytest.raises(UserError, match="cannot be created: .*file is a file"):
        check_output_folder(tmp_path / "file" / "out")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="broken symbolic link"):
        check_output_folder(tmp_path / "dangling")


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into (root ignores 0555: then a read-only mount)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    for candidate in (Path("/proc/sys"), Path("/sys/kernel")):
        if candidate.is_dir() and not os.access(candidate, os.W_OK):
            return candidate
    pytest.skip("no read-only folder available (running as root without a read-only mount)")


def test_read_only_parent(tmp_path):
    parent = read_only_folder(tmp_path)
    with pytest.raises(UserError, match="not writable"):
        check_output_folder(parent / "mlx-sora-test-out")


def test_is_converted_folder(tmp_path):
    assert is_converted_folder(ours(tmp_path / "a"))
    hf = tmp_path / "hf"
    shutil.copytree(FIXTURES / "vae_v12_checkpoint", hf)
    assert not is_converted_folder(hf)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[" * 100_000)
    assert not is_converted_folder(tmp_path / "bad")
    assert not is_converted_folder(tmp_path / "missing")


# ---------------------------------------------------------------- atomic_output_folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "mlx-sora-" in p.name)


def test_success_renames_into_place_with_umask_modes(tmp_path, umask_027):
    target = tmp_path / "out"
    with atomic_output_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.mlx-sora-tmp-") and not target.exists()
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o750  # 0o777 & ~umask, not mkdtemp's 0o700
    assert leftovers(tmp_path) == []


def test_a_mkdtemp_folder_gets_umask_modes(tmp_path, umask_027):
    import tempfile

    inner = Path(tempfile.mkdtemp(dir=tmp_path))
    assert inner.stat().st_mode & 0o777 == 0o700
    apply_umask(inner)
    assert inner.stat().st_mode & 0o777 == 0o750
    assert current_umask() == 0o027


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_leaves_nothing_and_keeps_the_previous_output(tmp_path, interrupt):
    target = ours(tmp_path / "out")
    with pytest.raises(type(interrupt)):
        with atomic_output_folder(target) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise interrupt
    assert json.loads((target / "config.json").read_text())["mlx_sora"] == {"format": 1}
    assert leftovers(tmp_path) == []


def test_previous_output_is_replaced_only_when_the_new_one_is_complete(tmp_path):
    target = ours(tmp_path / "out")
    (target / "old-only.txt").write_text("old")
    with atomic_output_folder(target, is_ours=is_converted_folder) as tmp:
        ours(tmp)
        assert (target / "old-only.txt").exists()
    assert not (target / "old-only.txt").exists() and (target / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_target_filled_by_someone_else_meanwhile_is_kept(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(UserError, match="filled with other files"):
        with atomic_output_folder(target, is_ours=is_converted_folder) as tmp:
            ours(tmp)
            not_ours(target)
    assert (target / "notes.txt").read_text() == "precious"
    assert leftovers(tmp_path) == []


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    target = tmp_path / "out"
    pid = dead_pid()
    stale = tmp_path / f".out.mlx-sora-tmp-{pid}-0123abcd"
    live = tmp_path / f".out.mlx-sora-tmp-{os.getppid()}-0123abcd"
    other_target = tmp_path / f".other.mlx-sora-tmp-{pid}-0123abcd"
    lookalike = tmp_path / f".out.mlx-sora-tmp-{pid}-notours"
    stale_file = tmp_path / f".out.mlx-sora-tmp-{pid}-89abcdef"
    for folder in (stale, live, other_target, lookalike):
        not_ours(folder)
    stale_file.write_text("a file, not a folder we make")
    with atomic_output_folder(target) as tmp:
        (tmp / "a").write_text("a")
    assert not stale.exists()
    for kept in (live, other_target, lookalike, stale_file):
        assert kept.exists()


def test_swap_killed_half_way_restores_the_previous_output(tmp_path):
    target = tmp_path / "out"
    pid = dead_pid()
    old = ours(tmp_path / f".out.mlx-sora-old-{pid}-0123abcd")  # renamed aside; the kill came next
    ours(tmp_path / f".out.mlx-sora-tmp-{pid}-4567abcd")
    remove_stale_temporaries(target)
    assert is_converted_folder(target) and not old.exists() and leftovers(tmp_path) == []


def test_sigkill_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    target = tmp_path / "out"
    script = (
        "import sys, time\n"
        "from mlx_sora.io.fsutil import atomic_output_folder\n"
        f"with atomic_output_folder({str(target)!r}) as tmp:\n"
        "    (tmp / 'big.safetensors').write_bytes(b'x' * 1000)\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(child.stdout.readline().strip())
        assert tmp.is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert tmp.exists() and not target.exists()
    with atomic_output_folder(target) as new:
        (new / "a").write_text("a")
    assert not tmp.exists() and leftovers(tmp_path) == []


def test_unwritable_parent_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create the folder for"):
        with atomic_output_folder(tmp_path / "file" / "out"):
            pass


def test_describe_os_error():
    error = OSError(errno.ENOSPC, "No space left on device", "/data/out/x.safetensors")
    assert describe_os_error(error) == "cannot write to /data/out/x.safetensors: no space left on the device"
    assert "permission denied" in describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/x"))


# ---------------------------------------------------------------- python -m mlx_sora.convert


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cli_world(tmp_path):
    """hf/src (a real tiny checkpoint), w/work/ (the current folder, with a file), home/ (HOME)."""
    source = tmp_path / "hf" / "src"
    shutil.copytree(FIXTURES / "vae_v12_checkpoint", source)
    work = tmp_path / "w" / "work"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("keep")
    (tmp_path / "home").mkdir()
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    before = digest(tmp_path)
    yield source, work, env
    for path, sha in before.items():  # nothing that existed before was changed or deleted
        assert digest(tmp_path).get(path) == sha, path


def run_convert(source: Path, target: str, cwd: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_sora.convert", "--hf-path", str(source), "--mlx-path", target, *extra],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def assert_clear_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --mlx-path "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "target, message",
    [
        ("{source}", "is the source folder"),
        ("{source}/..", "contains the source folder"),  # a parent of the source
        ("{source}/converted", "lies inside the source folder"),
        (".", "is the current folder"),
        ("..", "contains the current folder"),
        ("{home}", "is your home folder"),
        ("~", "is your home folder"),
        ("other", "not an earlier output of this command"),
        ("hf-copy", "not an earlier output of this command"),  # a Hugging Face folder is not ours
        ("keep.txt", "is a file, not a folder"),
        ("keep.txt/out", "is a file, not a folder"),
    ],
)
def test_convert_refuses_dangerous_targets(cli_world, target, message):
    source, work, env = cli_world
    not_ours(work / "other")
    shutil.copytree(source, work / "hf-copy")
    target = target.format(source=source, home=env["HOME"])
    result = run_convert(source, target, work, env, "--overwrite")
    assert_clear_error(result, message)
    assert (work / "other" / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in work.iterdir()) == ["hf-copy", "keep.txt", "other"]


def test_convert_refuses_a_read_only_parent(cli_world, tmp_path):
    source, work, env = cli_world
    parent = read_only_folder(work)
    assert_clear_error(run_convert(source, str(parent / "mlx-sora-test-out"), work, env), "not writable")


def test_convert_then_overwrite_only_our_output(cli_world):
    source, work, env = cli_world
    first = run_convert(source, "weights/vae", work, env)
    assert first.returncode == 0, first.stderr
    assert is_converted_folder(work / "weights" / "vae")
    (work / "weights" / "vae" / "stale-unit.safetensors").write_bytes(b"from an older conversion")
    assert_clear_error(run_convert(source, "weights/vae", work, env), "pass --overwrite")
    again = run_convert(source, "weights/vae", work, env, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert not (work / "weights" / "vae" / "stale-unit.safetensors").exists()
    assert leftovers(work / "weights") == []


def test_convert_cli_keeps_tracebacks_for_bugs(monkeypatch, tmp_path, capsys):
    argv = ["--hf-path", str(tmp_path), "--mlx-path", str(tmp_path / "out")]

    def raising(error):
        def fake_convert(*args, **kwargs):
            raise error
        return fake_convert

    for bug in (ValueError("internal bug"), RuntimeError("internal bug"), OSError("no path involved")):
        monkeypatch.setattr(convert_cli, "convert", raising(bug))
        with pytest.raises(type(bug)):
            convert_cli.main(argv)
    read_only = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out"))
    monkeypatch.setattr(convert_cli, "convert", raising(read_only))
    assert convert_cli.main(argv) == 2
    expected = f"error: cannot write to {tmp_path / 'out'}: the file system is read-only\n"
    assert capsys.readouterr().err == expected
    monkeypatch.setattr(convert_cli, "convert", raising(KeyboardInterrupt()))
    assert convert_cli.main(argv) == 130
    assert capsys.readouterr().err.startswith("interrupted")
