"""Walking a file set's tree: what is in it (never following a symlink, so a loop is just a link),
what is excluded, and the metadata of each thing found."""

from __future__ import annotations

import errno
import fnmatch
import grp
import os
import pwd
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from dr_pipelines.core.config import FileSetConfig

CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"


@dataclass
class Problem:
    path: bytes
    what: str  # "vanished" | "unreadable"
    detail: str


def type_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "dir"),
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "chardev"),
        (stat.S_ISBLK, "blockdev"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "unknown"


@cache
def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@cache
def group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def xattrs_of(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}  # not supported here, or gone
    out = {}
    for name in names:
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


class Excluder:
    def __init__(self, fs: FileSetConfig):
        self.patterns = fs.exclude
        self.if_present = [os.fsencode(n) for n in fs.exclude_if_present]
        self.caches = fs.exclude_caches

    def excluded(self, path: bytes) -> bool:
        text, name = os.fsdecode(path), os.fsdecode(os.path.basename(path))
        for p in self.patterns:
            if fnmatch.fnmatchcase(text if "/" in p else name, p) or (
                "/" in p and (text + "/").startswith(p.rstrip("/") + "/")
            ):
                return True
        return False

    def directory_excluded(self, path: bytes) -> bool:
        for marker in self.if_present:
            if os.path.lexists(os.path.join(path, marker)):
                return True
        if self.caches:
            try:
                with open(os.path.join(path, b"CACHEDIR.TAG"), "rb") as f:
                    return f.read(len(CACHEDIR_SIGNATURE)) == CACHEDIR_SIGNATURE
            except OSError:
                return False
        return False


def walk(
    roots: list[Path], fs: FileSetConfig, problem: Callable[[Problem], None]
) -> Iterator[tuple[bytes, os.stat_result]]:
    """Each path with its lstat, a directory before what it holds, names in byte order. Memory
    holds the directories still to visit, never the tree."""
    excluder = Excluder(fs)
    for root in roots:
        rootb = os.fsencode(os.path.abspath(root))
        try:
            st = os.lstat(rootb)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "a path of the file set does not exist", str(root)) from None
        yield rootb, st
        if not stat.S_ISDIR(st.st_mode):
            continue
        stack = [rootb]
        while stack:
            directory = stack.pop()
            try:
                names = sorted(os.listdir(directory))
            except FileNotFoundError:
                problem(Problem(directory, "vanished", "removed while the snapshot ran"))
                continue
            except OSError as e:
                problem(Problem(directory, "unreadable", e.strerror or str(e)))
                continue
            subdirs = []
            for name in names:
                path = os.path.join(directory, name)
                if excluder.excluded(path):
                    continue
                try:
                    child = os.lstat(path)
                except FileNotFoundError:
                    problem(Problem(path, "vanished", "removed while the snapshot ran"))
                    continue
                except OSError as e:
                    problem(Problem(path, "unreadable", e.strerror or str(e)))
                    continue
                if stat.S_ISDIR(child.st_mode):
                    if fs.one_file_system and child.st_dev != st.st_dev:
                        continue
                    if excluder.directory_excluded(path):
                        continue
                    subdirs.append(path)
                yield path, child
            stack.extend(reversed(subdirs))
