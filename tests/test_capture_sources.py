"""The pure parts of change capture, from tables: the sources file, templates, the pgoutput decoder."""

from __future__ import annotations

import struct

import pytest

from api.cli import main
from worker.capture.pgoutput import Begin, Commit, DecodeError, Decoder, RowChange, Truncate, lsn_int, lsn_str
from worker.capture.sources import UNAVAILABLE, RowRejected, load_sources, render, render_delete
from worker.errors import ConfigError

GOOD = """
[[sources]]
name = "articles"
kind = "postgres"
dsn = "host=db dbname=app"
table = "public.articles"
collection = "articles"
doc_id = "{id}"
text = "{title}\\n\\n{body}"
metadata = ["lang"]
tenant = "{org}"

[[sources]]
name = "products"
kind = "debezium"
stream = "app.public.products"
collection = "products"
doc_id = "p{id}"
text = "{name}"
"""


def write(tmp_path, text: str):
    path = tmp_path / "sources.toml"
    path.write_text(text)
    return path


def test_a_good_file(tmp_path):
    pg, dbz = load_sources(write(tmp_path, GOOD), default_redis_url="redis://r:6379/0")
    assert (pg.name, pg.kind, pg.table, pg.publication, pg.slot) == (
        "articles",
        "postgres",
        "public.articles",
        "sidecar_articles",
        "articles",
    )
    assert pg.columns == {"id", "title", "body", "lang", "org"} and pg.text_columns == {"title", "body"}
    assert dbz.redis_url == "redis://r:6379/0" and dbz.stream == "app.public.products"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('name = "articles"', 'name = "Articles!"'), "sources[0].name"),
        (('kind = "postgres"', 'kind = "mysql"'), "'articles'.kind"),
        (('dsn = "host=db dbname=app"', ""), "'articles'.dsn: give exactly one"),
        (('dsn = "host=db dbname=app"', 'dsn_env = "NOPE_NOT_SET"'), "NOPE_NOT_SET is not set"),
        (('table = "public.articles"', 'table = "articles; drop"'), "'articles'.table"),
        (('doc_id = "{id}"', 'doc_id = "fixed"'), "'articles'.doc_id: must use at least one column"),
        (('doc_id = "{id}"', 'doc_id = "{id!r}"'), "no format spec"),
        (('metadata = ["lang"]', "metadata = 3"), "'articles'.metadata"),
        (('collection = "articles"', 'collection = "a b"'), "'articles'.collection"),
        (('tenant = "{org}"', 'tenant = "{org}"\nbogus = 1'), "'articles'.bogus: unknown key"),
        (('name = "products"', 'name = "articles"'), "unique"),
    ],
)
def test_a_bad_file_names_source_and_key(tmp_path, change, message):
    old, new = change
    with pytest.raises(ConfigError) as caught:
        load_sources(write(tmp_path, GOOD.replace(old, new, 1)), default_redis_url="redis://r")
    assert message in str(caught.value)


def test_debezium_needs_a_redis(tmp_path):
    with pytest.raises(ConfigError, match="redis_url"):
        load_sources(write(tmp_path, GOOD))


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not TOML"):
        load_sources(write(tmp_path, "[[sources]\n"))
    with pytest.raises(ConfigError, match="needs one or more"):
        load_sources(write(tmp_path, "x = 1\n"))
    with pytest.raises(ConfigError, match="sources file"):
        load_sources(tmp_path / "absent.toml")


def test_render_rows(tmp_path):
    pg, _ = load_sources(write(tmp_path, GOOD), default_redis_url="redis://r")
    row = {"id": 7, "title": "Tea", "body": None, "lang": "en", "org": "acme"}
    assert render(pg, row, version=42, lane="batch") == {
        "op": "upsert",
        "collection": "articles",
        "doc_id": "7",
        "version": 42,
        "text": "Tea\n\n",
        "tenant": "acme",
        "metadata": {"lang": "en"},
        "lane": "batch",
    }
    assert render_delete(pg, {"id": 7, "org": "acme"}, version=43)["op"] == "delete"
    for bad, field in (
        ({**row, "title": "", "body": " "}, "text"),
        ({k: v for k, v in row.items() if k != "id"}, "doc_id"),
        ({**row, "title": UNAVAILABLE}, "text"),
        ({k: v for k, v in row.items() if k != "lang"}, "metadata"),
    ):
        with pytest.raises(RowRejected) as caught:
            render(pg, bad, version=1)
        assert caught.value.field == field


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["capture", "--sources", str(write(tmp_path, "nope"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sidecar: sources file") and err.count("\n") == 1


# --- pgoutput, protocol 1, byte by byte as PostgreSQL's documentation lays it out ---------------


def cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def tuple_data(*columns: bytes | None) -> bytes:
    out = struct.pack("!h", len(columns))
    for value in columns:
        if value is None:
            out += b"n"
        elif value == b"<toast>":
            out += b"u"
        else:
            out += b"t" + struct.pack("!i", len(value)) + value
    return out


def relation() -> bytes:
    columns = [(1, "id", 23), (0, "body", 25), (0, "meta", 3802), (0, "ok", 16)]
    out = b"R" + struct.pack("!i", 16384) + cstr("public") + cstr("articles") + b"d" + struct.pack("!h", 4)
    for flags, name, oid in columns:
        out += struct.pack("!b", flags) + cstr(name) + struct.pack("!ii", oid, -1)
    return out


def test_decoder_messages():
    decoder = Decoder()
    begin = decoder.decode(b"B" + struct.pack("!qqi", 0x16B3748, 0, 700))
    assert isinstance(begin, Begin) and begin.final_lsn == 0x16B3748 and begin.commit_ts_s == 946_684_800
    decoder.decode(relation())
    insert = decoder.decode(
        b"I" + struct.pack("!i", 16384) + b"N" + tuple_data(b"1", b"hello", b'{"a": 1}', b"t")
    )
    assert isinstance(insert, RowChange) and insert.new == {
        "id": 1,
        "body": "hello",
        "meta": {"a": 1},
        "ok": True,
    }
    update = decoder.decode(
        b"U"
        + struct.pack("!i", 16384)
        + b"O"
        + tuple_data(b"1", b"old", None, b"f")
        + b"N"
        + tuple_data(b"1", b"<toast>", None, b"f")
    )
    assert isinstance(update, RowChange) and update.new is not None and update.old is not None
    assert update.new["body"] == UNAVAILABLE and update.old["body"] == "old"
    delete = decoder.decode(b"D" + struct.pack("!i", 16384) + b"K" + tuple_data(b"1", None, None, None))
    assert (
        isinstance(delete, RowChange)
        and delete.kind == "delete"
        and delete.old
        == {
            "id": 1,
            "body": None,
            "meta": None,
            "ok": None,
        }
    )
    truncate = decoder.decode(b"T" + struct.pack("!ib", 1, 0) + struct.pack("!i", 16384))
    assert isinstance(truncate, Truncate) and truncate.relation_ids == [16384]
    commit = decoder.decode(b"C" + struct.pack("!bqqq", 0, 0x16B3748, 0x16B3780, 1_000_000))
    assert isinstance(commit, Commit) and commit.end_lsn == 0x16B3780
    assert decoder.decode(b"O" + struct.pack("!q", 1) + cstr("origin")) is None


@pytest.mark.parametrize(
    "payload",
    [b"", b"Z", b"B\x00", b"I" + struct.pack("!i", 99) + b"N", b"R" + struct.pack("!i", 1) + b"no-nul"],
)
def test_decoder_refuses_what_is_not_pgoutput(payload):
    with pytest.raises(DecodeError):
        Decoder().decode(payload)


def test_lsn_text_and_integer():
    assert lsn_int("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert lsn_str(lsn_int("16/B374D848")) == "16/B374D848"
