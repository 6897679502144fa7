"""The sandbox's application files: what SoundHash keeps beside its database (configuration,
uploaded audio, generated fingerprints, logs and a cache) and its `.env` secrets."""

from __future__ import annotations

import os
import random
from pathlib import Path

ENV_FILE = """# SoundHash runtime secrets (sandbox values, not real ones)
DATABASE_URL=postgresql://soundhash:sandbox-password@127.0.0.1/soundhash
YOUTUBE_API_KEY=sandbox-youtube-key-0000
JWT_SECRET=sandbox-jwt-secret-0000
"""


def app_files_dir(base: Path) -> Path:
    return base / "app_files"


def secrets_dir(base: Path) -> Path:
    return base / "app_secrets"


def ensure_sample_files(base: Path) -> None:
    """Made once; a change the demo makes stays (the next snapshot shows it)."""
    root = app_files_dir(base)
    if not root.exists():
        rng = random.Random(7)
        (root / "config").mkdir(parents=True)
        (root / "config" / "settings.yaml").write_text(
            "app:\n  workers: 4\n  fingerprint_window_s: 10\n  upload_dir: /srv/soundhash/uploads\n"
        )
        (root / "config" / "nginx.conf").write_text("server { listen 8080; location / { proxy_pass http://api; } }\n")
        uploads = root / "uploads"
        uploads.mkdir()
        for i in range(6):  # audio-like: incompressible
            (uploads / f"clip-{i:03d}.ogg").write_bytes(rng.randbytes(rng.randint(200_000, 900_000)))
        (root / "fingerprints").mkdir()
        for i in range(40):
            (root / "fingerprints" / f"video-{i:04d}.json").write_text(
                '{"hashes": [' + ",".join(str(rng.getrandbits(32)) for _ in range(300)) + "]}\n"
            )
        (root / "logs").mkdir()
        (root / "logs" / "api.log").write_text("started\n" * 1000)
        (root / "cache").mkdir()
        (root / "cache" / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
        (root / "cache" / "thumbnails.bin").write_bytes(rng.randbytes(100_000))
        os.symlink("config/settings.yaml", root / "settings.yaml")
    secrets = secrets_dir(base)
    if not secrets.exists():
        secrets.mkdir(mode=0o700)
        (secrets / ".env").write_text(ENV_FILE)
        (secrets / ".env").chmod(0o600)
