"""Safe outputs: a command never deletes what it did not create, and never leaves half a result.

Writing an output folder (a converted model) takes two calls::

    target = check_output_folder(args.mlx_path, sources=[source_dir], overwrite=args.overwrite,
                                 is_ours=is_converted_folder)      # before any heavy work
    with atomic_output_folder(target, is_ours=is_converted_folder) as tmp:
        ...write every file into tmp...                             # renamed to target on success

* ``check_output_folder`` refuses, with a ``UserError`` naming the path, a target that is, contains or
  lies inside a source folder; that is or contains the current folder, the home folder or the file
  system root; that is a file; that exists and is not empty (without ``overwrite``), or whose content
  is not a previous output of ours (with ``overwrite``: only a folder for which ``is_ours`` is true is
  ever replaced); and a target whose parent cannot be created or written. Symlinks are resolved
  first; it returns the resolved target.
* ``atomic_output_folder`` yields a new folder next to the target, named
  ``.{name}.mlx-sora-tmp-{pid}-{random}``. On success it is renamed into place; a previous folder is
  first renamed aside (``.{name}.mlx-sora-old-...``) and deleted only once the new one is in place,
  so a kill at any moment loses nothing. On failure (or Ctrl-C) the temporary folder is removed.
  Before starting it removes stale temporaries of ours for the same target whose process is gone
  (``remove_stale_temporaries``); a previous output found renamed aside with no target in place is
  renamed back.
* Permissions follow the umask (``apply_umask``), like any file the user creates: the temporary
  folder is created with ``os.mkdir`` (0o777 & ~umask), and callers that use ``mkstemp`` or
  ``mkdtemp`` (always 0600 / 0700) fix the mode with ``apply_umask``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import UserError, describe_os_error

_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.mlx-sora-(?P<kind>tmp|old)-(?P<pid>[0-9]{1,10})-[0-9a-f]{8}")


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path, directory: bool | None = None) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would: 0o666 (file) or 0o777 (folder) & ~umask."""
    path = Path(path)
    if directory is None:
        directory = path.is_dir()
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def is_converted_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds a ``config.json`` written by mlx-sora (it has an ``mlx_sora`` key):
    the only kind of folder that ``--overwrite`` may replace."""
    path = Path(folder) / "config.json"
    try:
        if not path.is_file() or path.stat().st_size > 16 << 20:
            return False
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and isinstance(config.get("mlx_sora"), dict)


def _relation(inner: Path, outer: Path) -> str | None:
    if inner == outer:
        return "is"
    if outer in inner.parents:
        return "lies inside"
    if inner in outer.parents:
        return "contains"
    return None


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


def check_output_folder(
    target: str | Path,
    sources: Iterable[str | Path] = (),
    overwrite: bool = False,
    is_ours: Callable[[Path], bool] | None = None,
) -> Path:
    """Refuse an output folder that would lose data or cannot be written; returns the resolved target.

    ``sources`` are folders the output must stay apart from (the input being converted). With
    ``overwrite``, an existing non-empty folder is accepted only when ``is_ours(folder)`` is true
    (``None``: nothing is ours, so only an empty folder can be replaced). Raises ``UserError`` whose
    message starts with the path, so a CLI can prefix its option name.
    """
    given = Path(target).expanduser()
    if os.path.islink(given) and not given.exists():
        raise UserError(f"{given} is a broken symbolic link; remove it or choose another folder")
    real = given.resolve()

    for source in sources:
        source_real = Path(source).expanduser().resolve()
        relation = _relation(real, source_real)
        if relation is not None:
            raise UserError(f"{given} {relation} the source folder {source}: the output must be a "
                            "separate folder (e.g. weights/<name>)")
    protected = [(Path(real.anchor), "the file system root")]
    for place, what in ((Path.home, "your home folder"), (Path.cwd, "the current folder")):
        try:
            protected.append((place(), what))
        except (OSError, RuntimeError, KeyError):  # no home / a deleted current folder: nothing to protect
            pass
    for wanted in ("is", "contains"):  # "is the root" says more than "contains the home folder"
        for place, what in protected:
            place_real = place.resolve()
            if _relation(real, place_real) == wanted:
                raise UserError(f"{given} {wanted} {what} ({place_real}): the output must be a dedicated "
                                "folder (e.g. weights/<name>)")

    if real.exists():
        if not real.is_dir():
            raise UserError(f"{given} is a file, not a folder; give the path of a folder to create")
        try:
            empty = _is_empty_dir(real)
        except OSError as e:
            raise UserError(describe_os_error(e, "read the output folder")) from e
        if not empty:
            ours = is_ours is not None and is_ours(real)
            if not ours:
                raise UserError(
                    f"{given} exists and holds files that are not an earlier output of this command; they "
                    "are left alone (even with --overwrite): choose another folder or remove it yourself"
                )
            if not overwrite:
                raise UserError(f"{given} already holds a converted model; pass --overwrite to replace it")

    ancestor = real.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{given} cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{given} cannot be created: {ancestor} is not writable (read-only file system or "
                        "no permission)")
    return real


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _temporary_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.mlx-sora-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove temporaries of ours for ``target`` left by killed runs; returns what was removed.

    Only folders named ``.{target name}.mlx-sora-{tmp|old}-{pid}-{8 hex}`` whose process is no longer
    alive are touched. A previous output renamed aside (``old``) while no target exists is a swap
    killed half-way: it is renamed back instead of removed.
    """
    target = Path(target)
    try:
        with os.scandir(target.parent) as it:
            entries = list(it)
    except OSError:
        return []
    removed = []
    for entry in sorted(entries, key=lambda e: e.name):
        match = _TEMP_NAME.fullmatch(entry.name)
        if (match is None or match["name"] != target.name or not entry.is_dir(follow_symlinks=False)
                or _pid_alive(int(match["pid"]))):
            continue
        path = Path(entry.path)
        try:
            if match["kind"] == "old" and not os.path.lexists(target):
                os.rename(path, target)
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _swap_into_place(new: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        old = _temporary_name(target, "old")
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)  # a file or a non-empty folder that appeared meanwhile makes this fail


@contextmanager
def atomic_output_folder(target: str | Path, is_ours: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``target`` when the block succeeds (see the module doc).

    Call ``check_output_folder`` first. If ``is_ours`` is given, an existing non-empty target is
    replaced only when it is still ours at the end (it may have changed while the block ran).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(describe_os_error(e, f"create the folder for {target}")) from e
    remove_stale_temporaries(target)
    while True:
        tmp = _temporary_name(target, "tmp")
        try:
            os.mkdir(tmp)  # mode 0o777 & ~umask, unlike mkdtemp's 0700
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(describe_os_error(e, f"create a folder next to {target}")) from e
    try:
        yield tmp
        apply_umask(tmp, directory=True)  # in case the block replaced it with a mkdtemp folder
        if (is_ours is not None and target.is_dir() and not _is_empty_dir(target)
                and not is_ours(target)):
            raise UserError(f"{target} was filled with other files while the output was written; "
                            "they are left alone and the new output is discarded")
        try:
            _swap_into_place(tmp, target)
        except OSError as e:
            raise UserError(describe_os_error(e, f"move the finished output into place at {target}")) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
