"""What one job costs the API in Redis commands, counted on a real redis-server (``INFO commandstats`` deltas).

Each saving is asserted as a count, so that a change that adds a round trip fails here.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import pytest
import redis

from classlens.core import keys
from classlens.core.settings import Settings
from classlens.core.store import RedisStore
from service.openapi import VerdictMemo
from tests.round_trips import command_calls
from tests.service_fixtures import TINY_MODEL, b64, problem, sample_png

DB = 15  # a Redis database of this module's own


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url, tiny_model_root):
    """The real app with no worker: what is accepted stays queued, and no long poll waits."""
    return Settings(
        redis_url=f"{redis_url}/{DB}",
        model_dirs=[tiny_model_root],
        data_dir=tmp_path_factory.mktemp("costs"),
        max_wait_s=0,
    )


# Commands the counting itself issues: never part of a count.
_OWN = {"info", "config|resetstat", "config"}


COUNTED = "classlens-counted"  # the client name of the stores whose round trips are counted


@pytest.fixture(scope="module")
def store(settings):
    """The app's store, under a client name of its own, so that only its round trips are counted."""
    return RedisStore(f"{settings.redis_url}?client_name={COUNTED}")


class RoundTrips:
    """Round trips by the counted stores: each packed send is one (a pipeline sends its commands at once)."""

    def __init__(self) -> None:
        self.count = 0

    def during(self, action: Callable[[], object]) -> int:
        before = self.count
        action()
        return self.count - before


@pytest.fixture
def round_trips(monkeypatch) -> RoundTrips:
    counter = RoundTrips()
    send = redis.connection.AbstractConnection.send_packed_command

    def counted(connection, command, check_health=True):
        if getattr(connection, "client_name", None) == COUNTED:
            counter.count += 1
        return send(connection, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    return counter


def commands_during(url: str, action: Callable[[], object]) -> Counter[str]:
    """The commands the server ran while ``action`` ran (by name: ``get``, ``set``, ``psubscribe``...)."""
    client = redis.Redis.from_url(url)
    before = command_calls(client)
    action()
    after = command_calls(client)
    return Counter(
        {name: after[name] - before[name] for name in after if name not in _OWN and after[name] > before[name]}
    )


def channel() -> str:
    return f"test:{uuid.uuid4().hex}"


# -- one listener per process ------------------------------------------------------------------------


def test_long_polls_share_one_subscription_and_issue_no_command_of_their_own(redis_url):
    store = RedisStore(redis_url)
    with store.listen(channel()) as first:  # starts the listener thread: one PSUBSCRIBE
        first.wait(0.5)
    store.notify(channel())  # and the connection that commands use
    names = [channel() for _ in range(20)]
    woken: list[str] = []

    def poll(name: str, ready: threading.Barrier) -> None:
        with store.listen(name) as listener:
            ready.wait()
            listener.wait(10)
            woken.append(name)

    def twenty_long_polls() -> None:
        ready = threading.Barrier(len(names) + 1)
        threads = [threading.Thread(target=poll, args=(name, ready)) for name in names]
        for thread in threads:
            thread.start()
        ready.wait()
        started = time.monotonic()
        for name in names:
            store.notify(name)
        for thread in threads:
            thread.join(10)
        assert time.monotonic() - started < 5, "every waiter was woken by its notice, not by its timeout"

    counted = commands_during(redis_url, twenty_long_polls)
    assert sorted(woken) == sorted(names)
    # Only the notices themselves: no SUBSCRIBE, UNSUBSCRIBE or PING per long poll.
    assert counted == Counter({"publish": 20}), counted
    assert store._listener.waiting() == 0, "waiters that returned leave nothing behind"


def test_a_waiter_is_woken_by_its_own_channel_only(redis_url):
    store = RedisStore(redis_url)
    mine, other = channel(), channel()
    with store.listen(mine) as listener:
        listener.wait(2)  # the first wake may be the subscription's confirmation
        store.notify(other)
        started = time.monotonic()
        listener.wait(0.5)
        assert time.monotonic() - started >= 0.45, "a notice on another channel does not wake this waiter"
        store.notify(mine)
        started = time.monotonic()
        listener.wait(5)
        assert time.monotonic() - started < 2


def test_waiters_that_time_out_leave_nothing_behind(redis_url):
    store = RedisStore(redis_url)
    for _ in range(5):
        with store.listen(channel()) as listener:
            listener.wait(0.05)
    assert store._listener.waiting() == 0
    assert store._listener._waiters == {}


def test_the_listener_reconnects_when_its_connection_is_dropped(redis_url):
    store = RedisStore(redis_url)
    admin = redis.Redis.from_url(redis_url)
    name = channel()
    with store.listen(name) as listener:
        listener.wait(2)
        assert admin.pubsub_numpat() >= 1
        # Like a Redis restart, from the listener's side: its connection is closed under it.
        admin.client_kill_filter(_type="pubsub", skipme=True)
        deadline = time.monotonic() + 10
        while True:  # subscribed again (the listener thread found the dead socket)
            listener.wait(0.2)
            patterns = [client for client in admin.client_list(_type="pubsub") if int(client["psub"]) > 0]
            if patterns:
                break
            assert time.monotonic() < deadline, "the listener did not subscribe again"
        listener.wait(0.5)  # the wake that says "subscribed again, look"
        store.notify(name)
        started = time.monotonic()
        listener.wait(5)
        assert time.monotonic() - started < 2, "a notice after the reconnect wakes the waiter"


def test_a_long_poll_of_a_finished_job_issues_no_command(redis_url):
    from classlens.core.jobs import JobStore

    store = RedisStore(redis_url)
    jobs = JobStore(store, ttl_s=60, inflight_ttl_s=60)
    job = jobs.create(job_id=uuid.uuid4().hex, kind="model", model="m@1", parameters={}, enqueue=lambda job: None)
    finished = jobs.succeed(job, b"{}")
    counted = commands_during(redis_url, lambda: jobs.wait(finished, 0.1))
    assert counted == Counter(), counted


# -- validation that does not re-check a new image's bytes ----------------------------------------------


def _images(count: int) -> list[str]:
    """``count`` distinct valid images, base64-encoded (the tiny model's samples, each with other trailing bytes)."""
    return [b64(sample_png() + bytes(n)) for n in range(count)]


def test_a_new_image_with_remembered_fields_reuses_the_verdict(app, client):
    contract = app.extensions["classlens"].contract
    first, *others = _images(4)
    assert client.post("/v1/explanations", json={"image": first, "model": TINY_MODEL, "top_k": 2}).status_code == 202
    entries, misses = len(contract.memo), contract.memo.misses
    for image in others:
        response = client.post("/v1/explanations", json={"image": image, "model": TINY_MODEL, "top_k": 2})
        assert response.status_code == 202, response.get_json()
    assert contract.memo.misses == misses, "each new image found the verdict"
    assert len(contract.memo) == entries, "new images add nothing to the memo"
    # Any other field still counts: a new verdict (openapi-core checks it).
    client.post("/v1/explanations", json={"image": first, "model": TINY_MODEL, "top_k": 3})
    assert len(contract.memo) == entries + 1


@pytest.mark.parametrize(
    ("image", "says"),
    [("QUJD", None), ("ab", "too short"), ("not base64!", "does not match"), (12, "is not of type 'string'")],
)
def test_a_bad_image_field_is_refused_exactly_as_openapi_core_refuses_it(app, client, image, says):
    """Whether or not the rest of the body was accepted before with a good image, the verdict is openapi-core's."""
    contract = app.extensions["classlens"].contract
    fields = {"model": TINY_MODEL, "top_k": 2}
    client.post("/v1/explanations", json={"image": _images(1)[0], **fields})  # the rest is remembered as good
    body = {"image": image, **fields}
    remembered = client.post("/v1/explanations", json=body)
    contract.memo = VerdictMemo()  # as if this body were the first request the API ever saw
    fresh = client.post("/v1/explanations", json=body)
    if says is None:  # valid by the schema (4 base64 characters), not an image: refused by the decoder
        assert remembered.status_code == fresh.status_code == 422
        assert problem(app, remembered, 422)["problem"] != "invalid_body"
    else:
        refused = problem(app, remembered, 422, "invalid_body")
        assert any(detail.startswith("image: ") and says in detail for detail in refused["errors"]), refused
    assert remembered.get_json() == fresh.get_json()


def test_a_refusal_is_never_reused_for_another_image(app, client):
    """A refusal may quote the body; it stays keyed by the exact body, so another image gets its own verdict."""
    one, two = _images(2)
    refused = problem(app, client.post("/v1/explanations", json={"image": one, "model": TINY_MODEL, "top_k": 99}), 422)
    again = problem(app, client.post("/v1/explanations", json={"image": two, "model": TINY_MODEL, "top_k": 99}), 422)
    assert refused["errors"] == again["errors"]  # the same fields refused, but each verdict is its own
    assert one[:40] not in json.dumps(again)


def test_the_memo_stays_bounded_under_distinct_bodies(app, client):
    contract = app.extensions["classlens"].contract
    contract.memo = VerdictMemo(max_entries=5, max_bytes=10_000)
    image = _images(1)[0]
    for top_k in range(1, 21):  # accepted bodies, each with other fields
        client.post("/v1/explanations", json={"image": image, "model": TINY_MODEL, "top_k": top_k})
    for top_k in range(100, 120):  # refused ones
        client.post("/v1/explanations", json={"image": image, "model": TINY_MODEL, "top_k": top_k})
    assert len(contract.memo) <= 5
    assert contract.memo.size_bytes <= 10_000


def test_a_file_part_s_name_does_not_change_the_verdict(app, client):
    contract = app.extensions["classlens"].contract

    def post(name: str) -> int:
        data = {"image": (io.BytesIO(sample_png()), name), "model": TINY_MODEL, "top_k": "2"}
        return client.post("/v1/explanations", data=data, content_type="multipart/form-data").status_code

    assert post("a.png") in {200, 202}
    misses = contract.memo.misses
    assert post("another name.png") in {200, 202}
    assert contract.memo.misses == misses


# -- fewer store round trips per job -----------------------------------------------------------------------


def test_a_new_explanation_costs_six_round_trips(app, client, round_trips):
    """Look-up (result and owner: one MGET), the image, the job's record and both claims (one pipeline),
    the hand-over claim's release with the owner (one pipeline), and the batch offer (a list push and its
    notice). It took ten before: the cache was read twice and every write was a trip of its own."""
    first, second = _images(2)
    assert client.post("/v1/explanations", json={"image": first, "model": TINY_MODEL, "top_k": 2}).status_code == 202
    trips = round_trips.during(
        lambda: client.post("/v1/explanations", json={"image": second, "model": TINY_MODEL, "top_k": 2})
    )
    assert trips == 6


def test_a_cache_hit_through_the_api_costs_one_round_trip(app, client, settings, round_trips):
    """The look-up saves the hit's record in the same trip (the result is there, so the record is written)."""
    from classlens.core.jobs import JobStore

    [image] = _images(1)
    queued = client.post("/v1/explanations", json={"image": image, "model": TINY_MODEL, "top_k": 1})
    assert queued.status_code == 202
    worker = JobStore(RedisStore(settings.redis_url), ttl_s=60, inflight_ttl_s=60)  # not counted
    worker.succeed(worker.get(queued.get_json()["id"]), b'{"targets": [{"index": 3}]}')
    answers = []
    trips = round_trips.during(
        lambda: answers.append(client.post("/v1/explanations", json={"image": image, "model": TINY_MODEL, "top_k": 1}))
    )
    [hit] = answers
    assert hit.status_code == 200
    assert hit.get_json()["cached"] is True
    assert worker.get(hit.get_json()["id"]).status == "succeeded"
    assert trips == 1


def _jobs(store: RedisStore):
    from classlens.core.jobs import JobStore

    return JobStore(store, ttl_s=60, inflight_ttl_s=60)


def _submit(jobs, key: str, owner: str | None = None):
    return jobs.submit(
        kind="explanation",
        model="m@1",
        parameters={},
        key=key,
        image_key=None,
        enqueue=lambda job: None,
        owner=owner,
        looked_up=jobs.lookup(key),
    )


def test_a_cache_hit_costs_two_round_trips_and_reads_the_result_once(store, round_trips):
    """One look-up (result and owner) and the caller's own record; it took four (result twice, owner, record)."""
    jobs = _jobs(store)
    key = uuid.uuid4().hex
    jobs.succeed(_submit(jobs, key, owner="a").job, b'{"done": true}')
    submission = None

    def hit() -> None:
        nonlocal submission
        submission = _submit(jobs, key, owner="a")

    assert round_trips.during(hit) == 2
    assert submission is not None
    assert submission.outcome == "cached"
    assert submission.result == b'{"done": true}'
    assert submission.cached, "the same owner is told its answer came from the cache"
    assert not _submit(jobs, key, owner="b").cached, "another owner is not"


def test_a_long_poll_reads_the_record_and_the_result_together(settings, store, round_trips):
    """After listening, and after each notice: one MGET of the record and the result (the result read once).

    Before, each look was a GET of the record, and the response read the result again: three trips here.
    """
    jobs = _jobs(store)
    job = _submit(jobs, uuid.uuid4().hex).job
    with store.listen("warm-up") as listener:  # the listener thread runs already, as in a serving API
        listener.wait(0.2)
    store.get("warm-up")  # and a connection for commands (the listener holds one of the pool's own)
    worker = _jobs(RedisStore(settings.redis_url))  # another client: its trips are not the poll's
    done = threading.Timer(0.3, lambda: worker.succeed(job, b'{"done": true}'))
    outcome: list[tuple[object, bytes | None]] = []

    def poll() -> None:
        outcome.append(jobs.wait_for_result(job, 10))

    done.start()
    trips = round_trips.during(poll)
    done.join()
    polled, result = outcome[0]
    assert polled.status == "succeeded"
    assert result == b'{"done": true}'
    assert trips == 2


def test_a_lost_race_for_a_claim_costs_one_trip_to_learn_the_winner(store, round_trips):
    """The loser drops its record and hand-over claim and reads the winner's claim in one trip."""
    jobs = _jobs(store)
    key = uuid.uuid4().hex
    winner = _submit(jobs, key).job
    joined = None

    def lose() -> None:
        nonlocal joined
        joined = _submit(jobs, key)

    # look-up, the pipeline that loses the claim, the pipeline that reads it, the winner's record, its claim
    assert round_trips.during(lose) == 5
    assert joined is not None
    assert (joined.outcome, joined.job.id) == ("joined", winner.id)
    assert store.keys(keys.CLAIM) == [], "no hand-over claim is left behind"
