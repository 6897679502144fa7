"""The SoundHash tables and sample rows the sandbox database is loaded with."""

from __future__ import annotations

from typing import LiteralString

SAMPLE_SCHEMA: LiteralString = """
CREATE TABLE channels (
    id serial PRIMARY KEY,
    channel_id text NOT NULL UNIQUE,
    channel_name text NOT NULL,
    description text,
    subscriber_count integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE videos (
    id serial PRIMARY KEY,
    video_id text NOT NULL UNIQUE,
    channel_id integer NOT NULL REFERENCES channels(id),
    title text NOT NULL,
    duration_s real,
    upload_date date,
    processed boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE fingerprints (
    id bigserial PRIMARY KEY,
    video_id integer NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    start_time real NOT NULL,
    end_time real NOT NULL,
    fingerprint_data bytea NOT NULL,
    confidence_score real,
    peak_count integer
);
CREATE INDEX fingerprints_video_idx ON fingerprints (video_id);
CREATE TABLE processing_jobs (
    id serial PRIMARY KEY,
    job_type text NOT NULL,
    status text NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    target_id text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);
INSERT INTO alembic_version VALUES ('a1b2c3d4e5f6');
"""


SAMPLE_DATA: list[LiteralString] = [
    """
INSERT INTO channels (channel_id, channel_name, description, subscriber_count)
SELECT 'UC' || md5(g::text), 'Channel ' || g, 'Sample channel ' || g || ' – ünïcödé', g * 137
FROM generate_series(1, %(channels)s) g""",
    """
INSERT INTO videos (video_id, channel_id, title, duration_s, upload_date, processed)
SELECT substr(md5('v' || g), 1, 11), 1 + g %% %(channels)s, 'Video ' || g, 60 + g %% 600,
       date '2024-01-01' + (g %% 700), g %% 3 = 0
FROM generate_series(1, %(videos)s) g""",
    """
INSERT INTO fingerprints (video_id, start_time, end_time, fingerprint_data, confidence_score, peak_count)
SELECT 1 + g %% %(videos)s, (g %% 90) * 10, (g %% 90) * 10 + 10,
       decode(md5(g::text) || md5((g * 7)::text), 'hex'), (g %% 100) / 100.0, g %% 50
FROM generate_series(1, %(fingerprints)s) g""",
    """
INSERT INTO processing_jobs (job_type, status, target_id)
SELECT 'fingerprint', (ARRAY['pending','running','completed','failed'])[1 + g %% 4], 'v' || g
FROM generate_series(1, %(jobs)s) g""",
]


SAMPLE_SIZES = {"channels": 50, "videos": 2000, "fingerprints": 50000, "jobs": 500}
