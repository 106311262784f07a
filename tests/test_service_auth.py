"""Authentication and quotas end to end: the real app, a real redis-server, a real worker where a job must finish.

Keys come from a key file written the way ``classlens keys create`` prints its lines. The
module's app has keys, so it authenticates; the other service tests run without keys on
localhost (the embedded default), where it is off.
"""

from __future__ import annotations

import inspect
import io
import json
import re
import shutil
import ssl
import subprocess
import time

import pytest
import redis
import yaml
from click.testing import CliRunner

from classlens.core.settings import Settings
from service.app import create_app
from service.auth import PUBLIC_ENDPOINTS, hash_key, scope_for
from tests.service_fixtures import (
    REPO,
    TINY_MODEL,
    b64,
    checked,
    free_port,
    noise_png,
    problem,
    sample_png,
    worker_running,
)

KEYS = {
    "alice": ("clk_alice-test-key", ["explain", "audit", "analyse"], {}),
    "bob": ("clk_bob-test-key", ["explain"], {}),
    "root": ("clk_root-test-key", ["admin"], {}),
    "root2": ("clk_root2-test-key", ["admin"], {}),
    "limited": ("clk_limited-test-key", ["explain"], {"rate_limit": "3/minute"}),
    "capped": ("clk_capped-test-key", ["explain"], {"max_in_flight": 1}),
}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url, tiny_model_root):
    folder = tmp_path_factory.mktemp("auth")
    entries = [
        {"id": name, "sha256": hash_key(key), "scopes": scopes, **extra} for name, (key, scopes, extra) in KEYS.items()
    ]
    (folder / "keys.yaml").write_text("".join(f"- {json.dumps(entry)}\n" for entry in entries))
    return Settings(
        redis_url=f"{redis_url}/3",
        model_dirs=[tiny_model_root],
        data_dir=folder / "data",
        api_keys_file=folder / "keys.yaml",
        worker_heartbeat_s=1,
    )


def post_image(client, key: str, image: bytes, **fields):
    data = {"image": (io.BytesIO(image), "image.png"), "model": TINY_MODEL, "top_k": "1", **fields}
    return client.post("/v1/explanations", data=data, content_type="multipart/form-data", headers=bearer(key))


def finished(app, client, key: str, job_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = checked(app, client.get(f"/v1/explanations/{job_id}?wait=5", headers=bearer(key))).get_json()
        if body["status"] in {"succeeded", "failed"}:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def routes(app):
    """Every (endpoint, method, concrete path, OpenAPI path) the app serves: a new route cannot be forgotten."""
    values = {"id": "some-job", "target": "0", "name": TINY_MODEL, "index": "0", "version": "1"}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule
        for argument in rule.arguments:
            path = re.sub(rf"<(?:[^:>]+:)?{argument}>", values[argument], path)
        contract_path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield rule.endpoint, method, path, contract_path


# -- who may call what --------------------------------------------------------------------------------------


def test_every_protected_route_answers_401_without_a_valid_key(app, client):
    protected = 0
    for endpoint, method, path, _ in routes(app):
        if endpoint in PUBLIC_ENDPOINTS:
            assert client.open(path, method=method).status_code != 401, path
            continue
        protected += 1
        for headers in ({}, {"Authorization": "Bearer clk_not-a-key"}, {"Authorization": "Basic YWxpY2U6eA=="}):
            response = client.open(path, method=method, headers=headers)
            body = problem(app, response, 401, "unauthenticated")
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), (method, path)
            assert "Authorization: Bearer" in body["detail"] or "not known" in body["detail"]
    assert protected >= 17


def test_403_without_the_scope_and_the_scopes_are_those_of_the_contract(app, client):
    body = problem(app, client.post("/v1/audits", headers=bearer("bob")), 403, "forbidden")
    assert body["required_scope"] == "audit"
    assert "bob" in body["detail"]
    problem(app, client.get("/v1/analyses/x", headers=bearer("bob")), 403, "forbidden")
    problem(app, client.get("/metrics", headers=bearer("bob")), 403, "forbidden")
    problem(app, client.delete(f"/v1/models/{TINY_MODEL}@1", headers=bearer("alice")), 403, "forbidden")
    problem(app, client.get("/v1/explanations/x", headers=bearer("root")), 403, "forbidden")
    assert client.get("/metrics", headers=bearer("root")).status_code == 200
    assert checked(app, client.get("/v1/models", headers=bearer("bob"))).status_code == 200  # any key reads the catalog
    # A job id of nobody's: the same 404 as another key's.
    problem(app, client.get("/v1/explanations/x", headers=bearer("bob")), 404, "unknown_job")

    document = yaml.safe_load((REPO / "openapi.yaml").read_text())
    for endpoint, method, _, contract_path in routes(app):
        operation = document["paths"][contract_path][method.lower()]
        scope = None if endpoint in PUBLIC_ENDPOINTS else scope_for(endpoint, app.view_functions[endpoint])
        expected = [] if endpoint in PUBLIC_ENDPOINTS else [{"bearer": [scope] if scope else []}]
        assert operation["security"] == expected, (method, contract_path)
        codes = set(operation["responses"])
        if endpoint not in PUBLIC_ENDPOINTS:
            assert {"401", "429"} <= codes, (method, contract_path)
            assert ("403" in codes) == (scope is not None), (method, contract_path)


def test_before_a_worker_runs_the_cap_on_jobs_in_flight_and_joins_across_keys(app, client, request, store):
    """No worker runs yet, so jobs stay queued; then one starts and every job finishes."""
    first = checked(app, post_image(client, "capped", noise_png(64)))
    assert first.status_code == 202
    refused = post_image(client, "capped", noise_png(65))
    body = problem(app, refused, 429, "too_many_jobs")
    assert int(refused.headers["Retry-After"]) > 0
    assert body["limit"] == 1
    assert body["in_flight"] == 1

    # An identical job in flight: the same key joins it; another key gets a record of its own.
    leader = checked(app, post_image(client, "alice", noise_png(65))).get_json()
    assert checked(app, post_image(client, "alice", noise_png(65))).get_json()["id"] == leader["id"]
    follower = checked(app, post_image(client, "bob", noise_png(65))).get_json()
    assert follower["status"] == "queued"
    assert follower["id"] != leader["id"]
    assert follower["cached"] is False
    problem(app, client.get(f"/v1/explanations/{leader['id']}", headers=bearer("bob")), 404, "unknown_job")
    problem(app, client.get(f"/v1/explanations/{follower['id']}", headers=bearer("alice")), 404, "unknown_job")

    request.getfixturevalue("running_worker")
    done = finished(app, client, "bob", follower["id"])
    assert done["status"] == "succeeded"
    assert done["id"] == follower["id"]
    assert done["result"] == finished(app, client, "alice", leader["id"])["result"]
    assert json.loads(store.get(f"job:{follower['id']}"))["owner"] == "bob"
    assert finished(app, client, "capped", first.get_json()["id"])["status"] == "succeeded"
    assert checked(app, post_image(client, "capped", noise_png(66))).status_code in {200, 202}  # a slot is free


@pytest.fixture(scope="module")
def running_worker(settings, store, tmp_path_factory):
    with worker_running(settings, store, tmp_path_factory.mktemp("worker") / "worker.log") as process:
        yield process


def test_another_keys_jobs_are_404_and_cached_never_leaks(app, client, running_worker):
    job = finished(app, client, "alice", checked(app, post_image(client, "alice", sample_png())).get_json()["id"])
    assert job["status"] == "succeeded"
    target = job["result"]["targets"][0]["index"]
    for path in (f"/v1/explanations/{job['id']}", f"/v1/explanations/{job['id']}/maps/{target}.png"):
        problem(app, client.get(path, headers=bearer("bob")), 404, "unknown_job")
        assert client.get(path, headers=bearer("alice")).status_code == 200
    for path in ("/v1/audits/", "/v1/analyses/"):  # another kind's routes do not find it either
        problem(app, client.get(f"{path}{job['id']}", headers=bearer("alice")), 404, "unknown_job")

    mine = checked(app, post_image(client, "alice", sample_png())).get_json()
    assert mine["status"] == "succeeded"
    assert mine["cached"] is True

    theirs = checked(app, post_image(client, "bob", sample_png())).get_json()
    # The same result, but bob is not told that someone submitted this image before him.
    assert theirs["status"] == "succeeded"
    assert theirs["cached"] is False
    assert theirs["id"] != job["id"]
    assert theirs["result"] == job["result"]
    assert checked(app, client.get(f"/v1/explanations/{theirs['id']}", headers=bearer("bob"))).status_code == 200
    assert client.get(f"/v1/explanations/{theirs['id']}/maps/{target}.png", headers=bearer("bob")).status_code == 200
    problem(app, client.get(f"/v1/explanations/{theirs['id']}", headers=bearer("alice")), 404, "unknown_job")


def test_model_registration_jobs_belong_to_their_key(app, client):
    data = {"weights": (io.BytesIO(b"x" * 64), "w.safetensors"), "name": "owned-model", "std": "0.5"}
    response = client.post("/v1/models", data=data, content_type="multipart/form-data", headers=bearer("root"))
    assert response.status_code == 202
    location = response.headers["Location"]
    problem(app, client.get(location, headers=bearer("root2")), 404, "unknown_job")
    assert checked(app, client.get(location, headers=bearer("root"))).status_code in {200, 202}


def test_the_rate_limit_answers_429_with_retry_after(app, client):
    for _ in range(3):
        assert client.get("/v1/models", headers=bearer("limited")).status_code == 200
    refused = client.get("/v1/models", headers=bearer("limited"))
    body = problem(app, refused, 429, "rate_limited")
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert "3 per 1 minute" in body["detail"]
    # Every route of the key counts together; probes never count, and other keys have their own.
    problem(app, client.get("/v1/explanations/x", headers=bearer("limited")), 429, "rate_limited")
    assert client.get("/livez", headers=bearer("limited")).status_code == 200
    assert client.get("/v1/models", headers=bearer("bob")).status_code == 200


# -- when authentication is on, and how it says so --------------------------------------------------------------


def test_off_only_on_localhost_without_keys_and_said_loudly(tmp_path, tiny_model_root, caplog):
    settings = Settings(redis_url=None, data_dir=tmp_path / "data", model_dirs=[tiny_model_root], max_wait_s=0)
    with caplog.at_level("WARNING", logger="service.auth"):
        app = create_app(settings)
    assert any("authentication is OFF" in record.getMessage() for record in caplog.records)
    client = app.test_client()
    assert client.get("/v1/models").status_code == 200
    ready = problem(app, client.get("/readyz"), 503, "not_ready")  # no worker here
    assert ready["authentication"]["enabled"] is False
    assert "OFF" in ready["authentication"]["detail"]

    for host in ("0.0.0.0", "192.0.2.7", "api.example"):  # off loopback: on, and with no key every route refuses
        public = create_app(settings, host=host)
        assert public.extensions["classlens"].auth.enabled
        problem(public, public.test_client().get("/v1/models"), 401, "unauthenticated")
        assert problem(public, public.test_client().get("/readyz"), 503)["authentication"]["enabled"] is True
    assert not create_app(settings, host="::1").extensions["classlens"].auth.enabled

    keyed = create_app(settings.model_copy(update={"api_keys": "[]"}))  # an empty list: no keys, still off
    assert not keyed.extensions["classlens"].auth.enabled


def test_keys_create_prints_a_key_and_a_line_usable_as_is(tmp_path, tiny_model_root):
    from classlens.cli import main

    runner = CliRunner()
    done = runner.invoke(main, ["keys", "create", "--id", "carol", "--scopes", "explain,admin"])
    assert done.exit_code == 0, done.output
    key = re.search(r"(clk_[A-Za-z0-9_-]{40,})", done.stderr).group(1)
    assert key not in done.stdout
    assert hash_key(key) in done.stdout
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(done.stdout)  # exactly what `classlens keys create ... >> keys.yaml` appends

    settings = Settings(
        redis_url=None, data_dir=tmp_path / "data", model_dirs=[tiny_model_root], api_keys_file=keys_file
    )
    app = create_app(settings)
    client = app.test_client()
    assert client.get("/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    problem(app, client.get("/metrics"), 401, "unauthenticated")

    refused = runner.invoke(main, ["keys", "create", "--id", "dave", "--scopes", "explain,write"])
    assert refused.exit_code == 2
    assert "write" in refused.output
    keys_file.write_text("- {id: eve, sha256: nothex, scopes: [explain]}\n")
    from service.auth import KeyFileError

    with pytest.raises(KeyFileError, match="sha256"):
        create_app(settings)


# -- Redis with a password -----------------------------------------------------------------------------------------


def test_redis_with_a_password_for_the_store_the_queue_and_the_rate_limits(tmp_path, tiny_model_root):
    from classlens.core.queue import create_celery
    from classlens.core.store import RedisStore, StoreError

    port = free_port()
    binary = shutil.which("redis-server")
    assert binary is not None
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--requirepass", "s3cret"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"redis://:s3cret@127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with pytest.raises(StoreError):
            RedisStore(f"redis://:wrong@127.0.0.1:{port}/0").ping()
        settings = Settings(
            redis_url=url,
            data_dir=tmp_path,
            model_dirs=[tiny_model_root],
            api_keys=f'- {{id: pat, sha256: "{hash_key("clk_pat")}", scopes: [explain]}}',
        )
        with create_celery(settings).connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
        app = create_app(settings)
        response = app.test_client().get("/v1/models", headers={"Authorization": "Bearer clk_pat"})
        assert response.status_code == 200
        assert redis.Redis.from_url(url).keys("*classlens-rate*"), redis.Redis.from_url(url).keys("*")
    finally:
        server.terminate()
        server.wait(10)


def test_tls_to_redis_checks_the_certificate_in_the_store_and_the_broker():
    """``rediss://`` without ``ssl_cert_reqs``: redis-py checks the certificate, and so must kombu (it would not)."""
    from classlens.core.queue import create_celery
    from classlens.core.store import RedisStore

    url = "rediss://:s3cret@redis.example:6380/0"
    pool = RedisStore(url)._client.connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert "ssl_cert_reqs" not in pool.connection_kwargs
    assert inspect.signature(redis.SSLConnection).parameters["ssl_cert_reqs"].default == "required"
    assert create_celery(Settings(redis_url=url)).connection_for_write().ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    relaxed = create_celery(Settings(redis_url=f"{url}?ssl_cert_reqs=optional")).connection_for_write()
    assert relaxed.ssl == {"ssl_cert_reqs": ssl.CERT_OPTIONAL}  # the URL's own choice stands


def test_an_explanation_end_to_end_over_tls_to_a_real_redis(tmp_path, tiny_model_root):
    """redis-server with TLS only and a password: the API, the queue and a worker all speak ``rediss://``.

    The certificate is checked: without the CA the store refuses to talk (the broker gets the same
    ``ssl_cert_reqs=required``, see the test above), with it an explanation runs end to end.
    """
    import trustme

    from classlens.core.store import RedisStore, StoreError

    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1", "localhost")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    authority.cert_pem.write_to_path(str(paths["ca"]))
    issued.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    issued.private_key_pem.write_to_path(str(paths["key"]))
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is needed (Debian: apt install redis-server)"
    tls = ["--tls-port", str(port), "--tls-cert-file", str(paths["cert"]), "--tls-key-file", str(paths["key"])]
    tls += ["--tls-ca-cert-file", str(paths["ca"]), "--tls-auth-clients", "no"]
    command = [binary, "--port", "0", *tls, "--bind", "127.0.0.1", "--save", "", "--requirepass", "s3cret"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={paths['ca']}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                RedisStore(url).ping()
                break
            except StoreError:
                assert server.poll() is None, "redis-server did not start with TLS"
                assert time.monotonic() < deadline, "redis-server did not start with TLS"
                time.sleep(0.1)
        with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED"):
            RedisStore(f"rediss://:s3cret@127.0.0.1:{port}/0").ping()
        with pytest.raises(StoreError):
            RedisStore(f"redis://:s3cret@127.0.0.1:{port}/0", timeout_s=2).ping()  # plain text is not spoken
        settings = Settings(redis_url=url, data_dir=tmp_path / "data", model_dirs=[tiny_model_root])
        store = RedisStore(url)
        app = create_app(settings, store=store)
        client = app.test_client()
        with worker_running(settings, store, tmp_path / "worker.log", queues="gpu"):
            body = {"model": TINY_MODEL, "image": b64(sample_png()), "top_k": 2}
            response = checked(app, client.post("/v1/explanations?wait=60", json=body))
            assert response.status_code == 200, response.get_json()
            job = response.get_json()
            assert job["status"] == "succeeded", job
            assert len(job["result"]["targets"]) == 2
    finally:
        server.terminate()
        server.wait(10)


def test_a_follower_takes_its_leaders_state_and_outlives_it(tmp_path):
    """The store's side of joins across keys, without HTTP: read-through status, own id and owner, the cached rule."""
    from classlens.core.jobs import JobStore
    from classlens.core.store import SqliteStore

    jobs = JobStore(SqliteStore(tmp_path / "store.sqlite3"), ttl_s=60, inflight_ttl_s=60)
    queued: list[str] = []

    def submit(owner: str, key: str = "k1"):
        fields = {"kind": "explanation", "model": "m@1", "parameters": {}, "image_key": None}
        return jobs.submit(key=key, enqueue=lambda job: queued.append(job.id), owner=owner, **fields)

    leader = submit("alice")
    follower = submit("bob")
    assert (leader.outcome, follower.outcome) == ("queued", "joined")
    assert queued == [leader.job.id]
    assert follower.job.follows == leader.job.id
    assert follower.job.owner == "bob"
    assert submit("alice").job.id == leader.job.id  # the same owner joins its own job
    jobs.start(leader.job)
    assert jobs.get(follower.job.id).status == "running"
    jobs.fail(jobs.get(leader.job.id), "Boom", "the worker said no")
    failed = jobs.get(follower.job.id)
    assert (failed.status, failed.error.title, failed.id) == ("failed", "Boom", follower.job.id)

    computing = submit("alice", "k2")
    waiting = submit("bob", "k2")
    jobs.store.delete(f"job:{computing.job.id}")  # the leader's record is gone, and no result came
    lost = jobs.get(waiting.job.id)
    assert lost.status == "failed"
    assert lost.error.title == "Job lost"

    done = submit("alice", "k3")
    jobs.succeed(done.job, b"{}")
    assert submit("alice", "k3").cached
    assert not submit("bob", "k3").cached
    assert submit("bob", "k3").outcome == "cached"
