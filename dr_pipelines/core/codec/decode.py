"""Stored bytes -> decrypt -> decompress -> a sink: through the age/zstd tools when installed (3x faster),
in-process otherwise. A copy that cannot be decoded raises DecodeFailed; a full disk raises OutputFull
(not the backup's fault)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pyrage

from dr_pipelines.core.child_env import tool_env
from dr_pipelines.core.codec.methods import CHUNK, COMPRESSION, ENCRYPTION, Readable
from dr_pipelines.core.errors import DrError

# --------------------------------------------------------------------------- restore direction


class HashingReader:
    """Reads from an object while hashing it, to compare with the manifest at the end."""

    def __init__(self, src: Readable):
        self._src = src
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        self.sha256.update(data)
        self.size += len(data)
        return data


class DecodeError(DrError):
    """The stored bytes could not be turned back into the plain ones."""


class OutputFull(DecodeError):
    """The decoded backup could not be written (a full disk): not the backup's fault."""


# --------------------------------------------------------------------------- decoding


class DecodeFailed(DecodeError):
    def __init__(self, stage: str, detail: str):
        super().__init__(f"cannot {stage} ({detail})")
        self.stage = stage


def _decoder_commands(compression: str, encrypted: bool) -> list[list[str]] | None:
    """age and zstd/gzip as processes, when installed; None: decode in-process instead."""
    tools = [ENCRYPTION["age"].tool if encrypted else None, COMPRESSION[compression].tool]
    cmds = [list(tool) for tool in tools if tool]  # age's identity pipe is added by the caller
    for cmd in cmds:
        found = shutil.which(cmd[0])
        if found is None:
            return None
        cmd[0] = found
    return cmds


def _decode_in_process(src, out, compression: str, encrypted: bool, identities: list | None) -> None:
    method = COMPRESSION[compression]
    sink = method.sink(out)
    try:
        if encrypted:
            pyrage.decrypt_io(src, sink, identities or [])
        else:
            while chunk := src.read(CHUNK):
                sink.write(chunk)
        sink.close()
    except pyrage.DecryptError as e:
        raise DecodeFailed("decrypt", str(e)) from None
    except method.errors as e:
        raise DecodeFailed("decompress", str(e)) from None
    except OSError as e:
        raise (output_full(e) or e) from None


OUTPUT_FULL = (
    "cannot write the decoded backup ({detail}); the backup itself may be fine. Free space where it "
    "is written (scratch_dir, or the data directory) and retry"
)


def output_full(e: OSError) -> OutputFull | None:
    """A write refused for lack of room (a full disk, a quota, the file-size limit) as OutputFull:
    not the backup's fault; None for any other failure."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputFull(OUTPUT_FULL.format(detail=e))
    return None


def _decode_with_tools(src, out, cmds: list[list[str]], identities: list | None, niceness: int = 0) -> None:
    """src -> age -d -> zstd -d -> out, the tools running beside this process (in-process, the GIL
    and one core made decoding 3x slower than the tools). `out` with a fileno is written by the
    last tool directly."""
    identity_read = None
    if identities:
        identity_read, identity_write = os.pipe()
        os.write(identity_write, "".join(f"{i}\n" for i in identities).encode())
        os.close(identity_write)
        cmds[0] = cmds[0] + [f"/dev/fd/{identity_read}"]
    try:
        out_fd = out.fileno()
        out.flush()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        out_fd = None
    direct = out_fd is not None
    procs: list[subprocess.Popen] = []
    errors: list[BaseException] = []
    pump: threading.Thread | None = None
    try:
        for i, cmd in enumerate(cmds):
            last = i == len(cmds) - 1
            procs.append(
                subprocess.Popen(
                    # niced from the start: a priority set after exec misses the threads a tool
                    # (age's Go runtime) has already started
                    (["nice", "-n", str(niceness)] if niceness and shutil.which("nice") else []) + cmd,
                    stdin=procs[-1].stdout if procs else subprocess.PIPE,
                    stdout=out_fd if last and direct else subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=(identity_read,) if identity_read is not None and i == 0 else (),
                    env=tool_env(),  # none of our secrets: age reads its identity from the pipe
                )
            )
            if i:
                procs[-2].stdout.close()  # the next tool owns it now
        if not direct:

            def copy_out() -> None:
                try:
                    reader: Any = procs[-1].stdout  # a BufferedReader: read1 returns what is there
                    while chunk := reader.read1(CHUNK):  # no waiting for a whole MB
                        out.write(chunk)
                except BaseException as e:
                    errors.append(e)
                    for p in procs:
                        p.kill()

            pump = threading.Thread(target=copy_out, name="decode-output", daemon=True)
            pump.start()
        try:
            while chunk := src.read(CHUNK):
                procs[0].stdin.write(chunk)
        except BrokenPipeError:
            pass  # a tool stopped: its exit status says why
        finally:
            try:
                procs[0].stdin.close()
            except BrokenPipeError:
                pass
        for p in procs:
            p.wait()
        if pump is not None:
            pump.join()
        if errors:
            raise errors[0]
        _check_tools(cmds, procs)
    finally:
        if identity_read is not None:
            os.close(identity_read)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stderr.close()
        if procs and not direct and procs[-1].stdout:
            if pump is not None:  # after the kills above it reads to the end at once
                pump.join(timeout=10)
            procs[-1].stdout.close()


_WRITE_FAILED = ("no space left", "write error", "cannot write", "failed to write", "disk quota", "file too large")


def _check_tools(cmds: list[list[str]], procs: list[subprocess.Popen]) -> None:
    """Say which tool failed, and whose fault it is. A failure to read spreads downstream (the next
    tool sees a truncated input), a failure to write spreads upstream (the previous one dies of a
    broken pipe): so a write failure (a full disk) is blamed first, and is not the backup's fault;
    otherwise the most upstream real failure marks the copy unusable (cannot decrypt/decompress)."""
    failures = []
    for cmd, p in zip(cmds, procs, strict=True):
        if p.returncode == 0 or p.returncode == -signal.SIGPIPE:
            continue
        if p.returncode == -signal.SIGXFSZ:  # past the file-size limit: a write failure
            raise OutputFull(OUTPUT_FULL.format(detail=f"{Path(cmd[0]).name}: file size limit exceeded"))
        said = [
            ln.strip()
            for ln in p.stderr.read().decode(errors="replace").splitlines()
            if ln.strip() and "report unexpected" not in ln
        ]  # age's bug-report footer
        detail = "; ".join(said) or f"exit {p.returncode}"
        if "broken pipe" not in detail.lower():
            failures.append((Path(cmd[0]).name, detail))
    for _, detail in failures:
        if any(w in detail.lower() for w in _WRITE_FAILED):
            raise OutputFull(OUTPUT_FULL.format(detail=detail))
    if failures:
        tool, detail = failures[0]
        raise DecodeFailed("decrypt" if tool == "age" else "decompress", detail)
    if any(p.returncode for p in procs):  # only broken pipes: whoever read the output stopped reading
        raise DecodeError("the reader of the decoded backup stopped before the end (see its own error)")


def decode_into(src, out, compression: str, encrypted: bool, identities: list | None, niceness: int = 0) -> None:
    """src (stored bytes) -> decrypt -> decompress -> out.write(). Raises DecodeFailed for a copy
    that cannot be decrypted or decompressed. `niceness`: the decoding tools' priority below ours."""
    cmds = _decoder_commands(compression, encrypted)
    if cmds:
        _decode_with_tools(src, out, cmds, identities, niceness)
    elif cmds is None:
        _decode_in_process(src, out, compression, encrypted, identities)
    else:  # neither encrypted nor compressed
        while chunk := src.read(CHUNK):
            out.write(chunk)


def decode_bytes(data: bytes, compression: str, encryption: str, identities: list | None) -> bytes:
    """A whole stored buffer (a WAL segment) back to its plain bytes. Raises DecodeFailed."""
    if encryption == "age":
        if not identities:
            raise DecodeFailed(
                "decrypt",
                "the object is age-encrypted and no identity is configured "
                "(encryption.identity_file or identity_file_env)",
            )
        try:
            data = pyrage.decrypt(data, identities)
        except pyrage.DecryptError as e:
            raise DecodeFailed("decrypt", str(e)) from None
    method = COMPRESSION[compression]
    try:
        return method.decompress(data)
    except method.errors as e:
        raise DecodeFailed("decompress", str(e)) from None
