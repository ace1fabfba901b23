"""The cache of verified token grants: a grant in use is verified again in the background past half its
time, once, so busy tokens never expire all at once; a revoked token is still refused within the
cache's time."""

from __future__ import annotations

import time

import pytest

from hepopt.client import Client
from hepopt.errors import Unauthorized
from orchestrator.app import REFRESH_AFTER, GrantCache
from orchestrator.storage.base import TokenInfo

SECONDS = 10.0
GRANT = TokenInfo(token_id=1, user="alice", study_id=None, created_at=0.0, expires_at=None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def refreshed() -> list[str]:
    return []


@pytest.fixture
def cache(clock: Clock, refreshed: list[str]) -> GrantCache:
    grants = GrantCache(SECONDS, refresh=refreshed.append, clock=clock)
    grants.put("secret", GRANT)
    return grants


def test_a_fresh_grant_is_served_without_a_refresh(cache: GrantCache, clock: Clock, refreshed: list[str]) -> None:
    clock.now += REFRESH_AFTER * SECONDS - 0.01
    assert cache.get("secret") == GRANT and refreshed == []


def test_past_half_its_time_a_grant_is_still_served_and_refreshed_once(cache: GrantCache, clock: Clock,
                                                                     refreshed: list[str]) -> None:
    clock.now += REFRESH_AFTER * SECONDS
    assert [cache.get("secret") for _ in range(3)] == [GRANT] * 3
    assert refreshed == ["secret"]


def test_a_refreshed_grant_starts_its_time_again(cache: GrantCache, clock: Clock, refreshed: list[str]) -> None:
    clock.now += REFRESH_AFTER * SECONDS
    cache.get("secret")
    cache.put("secret", GRANT)  # what the refresh does when the token is still valid
    clock.now += REFRESH_AFTER * SECONDS - 0.01
    assert cache.get("secret") == GRANT and refreshed == ["secret"]
    clock.now += 0.01
    cache.get("secret")
    assert refreshed == ["secret", "secret"]


def test_a_grant_expires_when_no_refresh_came(cache: GrantCache, clock: Clock) -> None:
    clock.now += REFRESH_AFTER * SECONDS
    cache.get("secret")
    clock.now += SECONDS
    assert cache.get("secret") is None


def test_a_forgotten_grant_is_gone_and_can_be_refreshed_again(cache: GrantCache, clock: Clock,
                                                             refreshed: list[str]) -> None:
    clock.now += REFRESH_AFTER * SECONDS
    cache.get("secret")
    cache.forget("secret")
    assert cache.get("secret") is None
    cache.put("secret", GRANT)
    clock.now += REFRESH_AFTER * SECONDS
    cache.get("secret")
    assert refreshed == ["secret", "secret"]


def test_a_revoked_token_in_use_is_refused_within_the_cache_time(server, wait_for) -> None:
    grants = server.app.state.service.grants
    secret = server.storage.create_token("carol")
    seconds, grants.seconds = grants.seconds, 0.4
    try:
        with Client(server.url, secret, retries=0) as carol:
            carol.list_studies()  # verified and cached
            assert server.storage.revoke_token(secret)
            carol.list_studies()  # still within the cache's time: served from it
            time.sleep(REFRESH_AFTER * grants.seconds)

            def refused() -> bool:
                try:
                    carol.list_studies()
                except Unauthorized:
                    return True
                return False

            wait_for(refused, timeout=grants.seconds, what="the revoked token to be refused")
    finally:
        grants.seconds = seconds
