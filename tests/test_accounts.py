"""Who jobs run as: the uid pool, the range's checks, the policy's account grant."""

from __future__ import annotations

import pwd

import pytest

from jobworker.auth import Identity, may_run_as_account
from jobworker.auth.policy import GRANTS, Scope
from jobworker.auth.roles import Role
from jobworker.errors import ConfigError, InvalidCommand, Unavailable
from jobworker.worker import JobSpec
from jobworker.worker.accounts import UidPool, host_account
from jobworker.worker.config import DEFAULT_JOB_UIDS, parse_uid_range


def test_the_pool_hands_out_each_uid_once_round_robin() -> None:
    pool = UidPool(70010, 70012)
    taken = [pool.acquire().uid for _ in range(3)]
    assert taken == [70010, 70011, 70012]
    with pytest.raises(Unavailable, match="every one of the worker's 3 job uids is in use"):
        pool.acquire()
    pool.release(70011)
    assert pool.acquire().uid == 70011
    pool.release(70010)
    pool.release(70012)
    assert pool.acquire().uid == 70012, "round robin: the uid after the last one given"


def test_the_pool_never_hands_out_a_host_account() -> None:
    first = pwd.getpwnam("daemon").pw_uid  # 1 on Debian, next to bin and sys
    known = [uid for uid in range(first, first + 3) if _exists(uid)]
    pool = UidPool(first, first + 2)
    given = []
    for _ in range(3 - len(known)):
        given.append(pool.acquire().uid)
    assert not set(given) & set(known)
    with pytest.raises(Unavailable):
        pool.acquire()


def _exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_the_default_range_avoids_systemd_and_subordinate_uids() -> None:
    first, last = DEFAULT_JOB_UIDS
    assert last < 61184 or first > 65519, "systemd's DynamicUser= range"
    assert first > 65535 and last < 100000, "nobody, (uint16_t) -1, useradd's subuids"
    assert last - first + 1 >= 10_000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1000", "FIRST-LAST"),
        ("a-b", "FIRST-LAST"),
        ("70000-60000", "1 <= FIRST <= LAST"),
        ("0-10", "1 <= FIRST <= LAST"),
        ("65000-66000", "include 65534 \\(nobody\\)"),
        ("2147483000-2147483648", "1 <= FIRST <= LAST"),
    ],
)
def test_a_bad_uid_range_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_uid_range(text)


def test_a_good_uid_range() -> None:
    assert parse_uid_range("70000-79999") == (70000, 79999)


def test_an_unknown_account_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no account 'no-such-user-here'"):
        host_account("no-such-user-here")
    assert host_account("root").uid == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (JobSpec("true", env={"": "x"}), "must be non-empty"),
        (JobSpec("true", env={"A=B": "x"}), "without '='"),
        (JobSpec("true", env={"A": "x\0y"}), "NUL"),
        (JobSpec("true", cwd="relative"), "absolute path"),
        (JobSpec("true", cwd="/a\0b"), "NUL"),
        (JobSpec("true", user=""), "not an account name"),
        (JobSpec("true", user="a/b"), "not an account name"),
        (JobSpec("true", args=("x" * 200_000,)), "the most is 131071"),
        (JobSpec("true", env={f"V{i}": "x" * 100_000 for i in range(3)}), "the most is 262144"),
    ],
)
def test_a_malformed_placement_is_refused(spec: JobSpec, message: str) -> None:
    with pytest.raises(InvalidCommand, match=message):
        spec.validate()


def test_only_admins_may_choose_the_account_and_every_role_has_a_grant() -> None:
    assert set(GRANTS) == set(Role)
    assert may_run_as_account(Identity("root", Role.ADMIN))
    assert not may_run_as_account(Identity("root", Role.USER))
    assert GRANTS[Role.ADMIN].sees is Scope.ALL and GRANTS[Role.USER].sees is Scope.OWN
