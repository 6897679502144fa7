"""How a restore shares the dump's entries among its parallel loaders (`share_tables`)."""

from dr_pipelines.core.restore.pg_restore import post_data_ready, share_tables

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


# pg_restore --list --verbose of a dump (PostgreSQL 15) with a primary key, a foreign key, an index,
# a NOT VALID check, a unique index and a partitioned table's index
VERBOSE_TOC = """; Selected TOC Entries:
214; 1259 16384 TABLE public a postgres
215; 1259 16391 TABLE public b postgres
216; 1259 16402 TABLE public c postgres
217; 1259 16407 TABLE public p postgres
218; 1259 16410 TABLE public p1 postgres
;\tdepends on: 217
3212; 0 0 TABLE ATTACH public p1 postgres
;\tdepends on: 218 217
3364; 0 16384 TABLE DATA public a postgres
;\tdepends on: 214
3365; 0 16391 TABLE DATA public b postgres
;\tdepends on: 215
3366; 0 16402 TABLE DATA public c postgres
;\tdepends on: 216
3367; 0 16410 TABLE DATA public p1 postgres
;\tdepends on: 218
3215; 2606 16390 CONSTRAINT public a a_pkey postgres
;\tdepends on: 214
3213; 2606 16405 CHECK CONSTRAINT public c c_chk postgres
;\tdepends on: 216 216
3216; 1259 16401 INDEX public b_w postgres
;\tdepends on: 215
3217; 1259 16406 INDEX public c_x postgres
;\tdepends on: 216
3218; 1259 16413 INDEX public p_k postgres
;\tdepends on: 217
3219; 1259 16414 INDEX public p1_k_idx postgres
;\tdepends on: 218 218 3218
3220; 0 0 INDEX ATTACH public p1_k_idx postgres
;\tdepends on: 3219 3218 218 217
3221; 2606 16396 FK CONSTRAINT public b b_id_fkey postgres
;\tdepends on: 214 3215 215
3222; 0 0 COMMENT public CONSTRAINT a_pkey ON a postgres
;\tdepends on: 3215
3223; 0 0 COMMENT public INDEX p_k postgres
;\tdepends on: 3218
""".splitlines()


def data_of(*tables: str) -> list[str]:
    return [line for line in VERBOSE_TOC if " TABLE DATA " in line and line.split()[-2] in tables]


def test_indexes_and_keys_of_loaded_tables_only_are_ready_early():
    assert post_data_ready(VERBOSE_TOC, []) == []
    # a key's comment goes with it (in the rest of post-data, pg_restore could take it for table data's)
    assert post_data_ready(VERBOSE_TOC, data_of("a")) == [
        "3215; 2606 16390 CONSTRAINT public a a_pkey postgres",
        "3222; 0 0 COMMENT public CONSTRAINT a_pkey ON a postgres",
    ]
    # c's NOT VALID check is enforced on rows loaded after it: it waits, as do the foreign key (it needs
    # a's key as well as both tables), the partitioned table's indexes and their attachment
    assert post_data_ready(VERBOSE_TOC, data_of("a", "b", "c", "p1")) == [
        "3215; 2606 16390 CONSTRAINT public a a_pkey postgres",
        "3216; 1259 16401 INDEX public b_w postgres",
        "3217; 1259 16406 INDEX public c_x postgres",
        "3222; 0 0 COMMENT public CONSTRAINT a_pkey ON a postgres",
    ]


def test_a_list_without_dependencies_makes_nothing_ready_early():
    plain = [line for line in VERBOSE_TOC if not line.startswith(";")]
    assert post_data_ready(plain, data_of("a", "b", "c", "p1")) == []
