"""Which Redis URLs an embedded Redis may stand in for (no I/O: none of these is local and dead)."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import load_settings
from service.embedded_redis import (
    EmbeddedRedis,
    LocalRedis,
    embedded_redis_for,
    local_redis,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost:6379/0", LocalRedis("localhost", 6379)),
        ("redis://localhost/0", LocalRedis("localhost", 6379)),
        ("redis://127.0.0.1:6390/3", LocalRedis("127.0.0.1", 6390)),
        ("redis://[::1]:6391/0", LocalRedis("::1", 6391)),
        ("redis://:secret@LOCALHOST:6379/0", LocalRedis("localhost", 6379)),
        ("redis://redis:6379/0", None),  # compose's service name: another machine
        ("redis://10.1.2.3:6379/0", None),
        ("rediss://localhost:6379/0", None),  # TLS: not something the embedded one speaks
        ("unix:///run/redis.sock", None),
        ("amqp://guest:guest@localhost:5672//", None),
    ],
)
def test_only_a_plain_redis_url_on_this_machine_may_get_an_embedded_redis(
    url: str, expected: LocalRedis | None
) -> None:
    assert local_redis(url) == expected


def test_the_embedded_redis_binds_the_address_the_url_names() -> None:
    assert LocalRedis("localhost", 1).bind == "127.0.0.1"
    assert LocalRedis("::1", 1).bind == "::1"
    assert LocalRedis("::1", 7000).url == "redis://[::1]:7000"


def test_a_remote_redis_or_no_embedded_means_nothing_is_started() -> None:
    remote = load_settings(
        redis_url="redis://redis.internal:6379/0", broker_url="amqp://guest:guest@rabbit//"
    )
    with embedded_redis_for(remote) as servers:
        assert servers == []
    local = load_settings(redis_url="redis://127.0.0.1:1/0", broker_url="redis://127.0.0.1:1/0")
    with embedded_redis_for(local, enabled=False) as servers:
        assert servers == []


def test_nothing_is_kept_on_disk_unless_the_data_dir_has_a_redis_conf(tmp_path: Path) -> None:
    target = LocalRedis("127.0.0.1", 7001)
    plain = EmbeddedRedis(target, executable=Path("/bin/redis-server"), data_dir=tmp_path)
    argv = plain.argv(tmp_path)
    assert argv[argv.index("--save") + 1] == ""
    assert argv[argv.index("--appendonly") + 1] == "no"
    assert argv[argv.index("--port") + 1] == "7001"

    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "redis.conf").write_text("appendonly yes\n")
    kept = EmbeddedRedis(target, executable=Path("/bin/redis-server"), data_dir=tmp_path)
    argv = kept.argv(tmp_path / "redis")
    assert kept.persistent
    assert argv[1] == str(tmp_path / "redis" / "redis.conf")
    assert "--save" not in argv
    assert "--appendonly" not in argv
    assert argv[argv.index("--port") + 1] == "7001"
