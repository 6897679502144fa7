"""How a restore shares the dump's entries among its parallel loaders (`share_tables`)."""

from dr_pipelines.core.restore.pg_restore import share_tables

TOC = """;
; Archive created at 2026-12-07 14:00:00 UTC
;
3406; 0 0 ENCODING - ENCODING
2; 3079 16407 EXTENSION - pgcrypto
217; 1259 16391 TABLE public accounts postgres
219; 1259 16444 TABLE public text postgres
230; 1259 16450 SEQUENCE public ticket_seq postgres
3401; 0 16391 TABLE DATA public accounts postgres
3402; 0 16394 TABLE DATA public branches postgres
3399; 0 16385 TABLE DATA public history postgres
3403; 0 16444 TABLE DATA public text postgres
3404; 0 16460 TABLE DATA sales "odd name" postgres
3411; 0 0 SEQUENCE SET public ticket_seq postgres
3412; 0 0 BLOBS - BLOBS
3252; 2606 16406 CONSTRAINT public accounts accounts_pkey postgres
""".splitlines()
ENTRIES = [line for line in TOC if line and not line.startswith(";")]
TABLE_DATA = [line for line in ENTRIES if " TABLE DATA " in line]


def test_every_entry_goes_to_exactly_one_share_in_archive_order():
    for jobs in (1, 2, 3, 8):
        shares = share_tables(TOC, {"public.text": 700, "public.accounts": 300}, jobs)
        assert len(shares) == min(jobs, len(TABLE_DATA))
        assert sorted(line for share in shares for line in share) == sorted(ENTRIES)
        for share in shares:
            assert share == [line for line in ENTRIES if line in share]  # a stream is read in order


def test_the_heaviest_tables_go_to_different_loaders_and_the_rest_to_the_first():
    text, accounts = share_tables(TOC, {"public.text": 700, "public.accounts": 300, "public.history": 5}, 2)
    assert [line for line in text if " TABLE DATA " in line] == ["3403; 0 16444 TABLE DATA public text postgres"]
    # whatever is not table data (sequence values, large objects, the schema the loaders skip) loads once, here
    assert "3411; 0 0 SEQUENCE SET public ticket_seq postgres" in text and "3412; 0 0 BLOBS - BLOBS" in text
    assert not [line for line in accounts if " TABLE DATA " not in line]
    assert "3401; 0 16391 TABLE DATA public accounts postgres" in accounts


def test_a_backup_without_sizes_still_spreads_the_tables():
    shares = share_tables(TOC, {}, 2)
    counts = [sum(" TABLE DATA " in line for line in share) for share in shares]
    assert sorted(counts) == [2, 3]


def test_an_empty_listing_needs_no_loader():
    assert share_tables([], {}, 2) == []
    assert share_tables(TOC[:3], {}, 2) == []
