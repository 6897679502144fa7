"""The codec table: every compression x encryption method round-trips through the streaming encoder,
the whole-buffer encoder, both decoders (tools and in-process) and the suffix parser."""

import hashlib
import io
import os
from pathlib import Path

import pyrage
import pytest

from dr_pipelines.core.codec.decode import DecodeFailed, decode_bytes, decode_into
from dr_pipelines.core.codec.encode import compressing_reader, encode_bytes
from dr_pipelines.core.codec.methods import COMPRESSION, ENCRYPTION, methods_from_name, object_suffix
from dr_pipelines.core.config import CompressionConfig, EncryptionConfig

IDENTITY = pyrage.x25519.Identity.generate()
DATA = os.urandom(50_000) * 20 + b"tail"
SEGMENT = os.urandom(1 << 20) * 16  # a WAL segment's size: zstd compresses it on every core


def _configs(compression: str, encryption: str):
    recipients = [str(IDENTITY.to_public())] if encryption == "age" else []
    # validated from plain strings, as a config file's are (the constructors are typed with the Literal methods)
    return (
        CompressionConfig.model_validate({"method": compression, "level": 3}),
        EncryptionConfig.model_validate({"method": encryption, "recipients": recipients}),
    )


@pytest.mark.parametrize("tools", [True, False], ids=["tools", "in-process"])
@pytest.mark.parametrize("encryption", sorted(ENCRYPTION))
@pytest.mark.parametrize("compression", sorted(COMPRESSION))
def test_every_method_round_trips(compression, encryption, tools, monkeypatch, tmp_path):
    comp, enc = _configs(compression, encryption)
    identities = [IDENTITY] if encryption == "age" else None
    if not tools:
        monkeypatch.setenv("PATH", str(tmp_path))  # neither age nor zstd nor gzip to be found
    for data in (DATA, SEGMENT, memoryview(SEGMENT)):
        whole, whole_sha = encode_bytes(data, comp, enc)
        assert whole_sha == hashlib.sha256(whole).hexdigest()  # the stored object's hash, taken as it was written
        assert decode_bytes(whole, compression, encryption, identities) == data
    streamed = compressing_reader(io.BytesIO(DATA), comp).read()
    if encryption == "age":
        streamed = pyrage.encrypt(streamed, [IDENTITY.to_public()])
    out = io.BytesIO()
    decode_into(io.BytesIO(streamed), out, compression, encryption == "age", identities)
    assert out.getvalue() == DATA
    assert methods_from_name("dump.pgdump" + object_suffix(compression, encryption)) == (compression, encryption)


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_garbage_is_a_decode_failure_not_a_crash(compression):
    with pytest.raises(DecodeFailed, match="cannot decompress"):
        decode_bytes(b"garbage" * 10, compression, "none", None)


def test_wrong_identity_cannot_decrypt():
    comp, enc = _configs("zstd", "age")
    whole, _ = encode_bytes(DATA, comp, enc)
    with pytest.raises(DecodeFailed, match="cannot decrypt"):
        decode_bytes(whole, "zstd", "age", [pyrage.x25519.Identity.generate()])
    with pytest.raises(DecodeFailed, match="no identity"):
        decode_bytes(whole, "zstd", "age", None)


def test_the_decoding_tools_can_yield_the_cpu(monkeypatch):
    """A restore that loads as it decodes lowers the tools' priority (they run beside the database's
    backends) from their start, under nice(1): a priority set after exec would miss the threads age
    has started. The bytes are the same, and without niceness the tools run as they are."""
    from dr_pipelines.core.codec import decode

    compression, encryption = _configs("zstd", "age")
    stored, _ = encode_bytes(DATA, compression, encryption)
    started = []
    popen = decode.subprocess.Popen

    def recording(cmd, **kw):
        started.append(cmd)
        return popen(cmd, **kw)

    monkeypatch.setattr(decode.subprocess, "Popen", recording)
    for niceness in (0, 5):
        out = io.BytesIO()
        decode_into(io.BytesIO(stored), out, "zstd", True, [IDENTITY], niceness)
        assert out.getvalue() == DATA
    plain, niced = started[:2], started[2:]
    assert [Path(cmd[0]).name for cmd in plain] == ["age", "zstd"]
    assert [cmd[:3] for cmd in niced] == [["nice", "-n", "5"]] * 2
    assert [Path(cmd[3]).name for cmd in niced] == ["age", "zstd"]


def test_an_encryption_that_fails_midway_raises_its_own_error_and_lets_go_of_the_buffer(monkeypatch):
    """wal_push hands encode_bytes a view of a pooled buffer and releases it afterwards: a failure
    inside age must surface as itself, not as the view's release failing (BufferError) because the
    compressor's reader still holds it; and the compressor left midway must not be reused (that
    crashed the process: python-zstandard 0.25, a multithreaded compressor used whole before)."""
    comp, enc = _configs("zstd", "age")
    encode_bytes(SEGMENT, comp, enc)  # the pooled compressor has compressed a segment whole
    buffer = bytearray(SEGMENT)

    def failing(src, out, recipients):
        out.write(src.read(1 << 16))
        raise pyrage.EncryptError("disk gone")

    monkeypatch.setattr(pyrage, "encrypt_io", failing)
    with pytest.raises(pyrage.EncryptError, match="disk gone") as raised, memoryview(buffer) as view:
        encode_bytes(view, comp, enc)
    assert raised.value.__context__ is None  # not a BufferError raised while handling it
    monkeypatch.undo()
    whole, _ = encode_bytes(memoryview(buffer), comp, enc)
    assert decode_bytes(whole, "zstd", "age", [IDENTITY]) == SEGMENT
