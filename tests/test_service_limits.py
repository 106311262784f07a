"""Faults and abuse: every request the API refuses is a quick, clear 4xx; its memory stays bounded.

The real app over a real redis-server (no worker: what is accepted stays queued). Each refusal
is checked against openapi.yaml, and "nothing queued" is read from the broker itself.
"""

import contextlib
import io
import json
import threading
import time

import pytest
from PIL import Image

from classlens.core.audit_report import rows_csv
from classlens.core.capabilities import VIT_KINDS, analysis_needs, missing
from classlens.core.images import decode_image, fit_to_input
from classlens.core.queue import create_celery, queue_depths
from classlens.core.requests import RequestError
from classlens.core.settings import Settings
from model_store.manifest import InputSpec, Preprocessing
from service.decoding import DecodeSlots, slots
from service.errors import Problem, problem_for
from service.limits import MAX_JSON_DEPTH, integral_numbers
from service.openapi import MEMO_MAX_BYTES, VerdictMemo
from tests.service_fixtures import TINY_MODEL, b64, checked, problem, sample_png

DB = 13  # a Redis database of this module's own
SAMPLES = ["test-00000.png", "test-00001.png", "test-00002.png", "test-00003.png"]


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url, tiny_model_root):
    return Settings(
        redis_url=f"{redis_url}/{DB}",
        model_dirs=[tiny_model_root],
        data_dir=tmp_path_factory.mktemp("limits"),
        max_wait_s=0,
        api_decode_wait_s=0.2,
    )


@pytest.fixture
def queued(settings):
    """The number of messages waiting on every queue, read from the broker."""
    celery = create_celery(settings)
    return lambda: sum(queue_depths(celery).values())


def explain_json(**fields):
    return {"image": b64(sample_png()), "model": TINY_MODEL, **fields}


def batch_json(names=SAMPLES, labels=None, **fields):
    images = [{"image": b64(sample_png(name)), "file": name} for name in names]
    for item, label in zip(images, labels or [], strict=False):
        item["label"] = label
    return {"images": images, "model": TINY_MODEL, **fields}


def post(client, route, body):
    return client.post(route, json=body)


# -- JSON numbers by value --------------------------------------------------------------------------


def test_integral_floats_are_integers_and_huge_ones_are_out_of_range(app, client):
    accepted = checked(app, post(client, "/v1/explanations", explain_json(targets=[2.0, 0], top_k=3.0)))
    assert accepted.status_code == 202
    assert accepted.get_json()["parameters"]["targets"] == [2, 0]
    body = problem(app, post(client, "/v1/explanations", explain_json(targets=[1e300])), 422, "unknown_class")
    assert "out of range" in body["detail"]
    assert "0..9" in body["detail"]

    audit = checked(app, post(client, "/v1/audits", batch_json(labels=[1.0, 2, 3.0, 4], targets=[1.0])))
    assert audit.status_code == 202
    assert audit.get_json()["parameters"]["explain"]["targets"] == [1]
    problem(app, post(client, "/v1/audits", batch_json(targets=[1e300])), 422, "unknown_class")
    problem(app, post(client, "/v1/audits", batch_json(labels=[1e300, 1, 2, 3])), 422, "unknown_label")

    analysis = checked(app, post(client, "/v1/analyses", batch_json(labels=[1.0, 2.0, 3, 4], kind="probes")))
    assert analysis.status_code == 202
    problem(app, post(client, "/v1/analyses", batch_json(labels=[1e300, 1, 2, 3], kind="probes")), 422)


def test_non_numbers_of_python_json_are_malformed(app, client):
    for number in ("NaN", "Infinity", "-1e400"):
        text = json.dumps(batch_json(kind="probes")).replace('"kind"', f'"ridge": {number}, "kind"')
        response = client.post("/v1/analyses", data=text, content_type="application/json")
        assert "not a JSON number" in problem(app, response, 400, "malformed_body")["detail"]


def test_integral_numbers_keeps_fractions_and_other_values():
    assert integral_numbers({"a": [2.0, 2.5, "3", True, None], "b": 1e300}) == {
        "a": [2, 2.5, "3", True, None],
        "b": int(1e300),
    }


def test_form_indices_are_ascii_digits_only(app, client):
    for text in ("²", "٣", "1,²"):
        data = {"image": (io.BytesIO(sample_png()), "a.png"), "model": TINY_MODEL, "targets": text}
        response = client.post("/v1/explanations", data=data, content_type="multipart/form-data")
        body = problem(app, response, 422, "unknown_class")
        assert "²" in body["detail"] or "٣" in body["detail"]


# -- depth and length, refused before the validator walks them ----------------------------------------


@pytest.mark.parametrize("route", ["/v1/explanations", "/v1/audits", "/v1/analyses"])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])
def test_deep_json_is_refused(app, client, route, depth):
    text = '{"model": "tiny-vit", "images": ' + "[" * depth + "]" * depth + "}"
    body = problem(app, client.post(route, data=text, content_type="application/json"), 422, "too_deep")
    assert str(MAX_JSON_DEPTH) in body["detail"]


def test_a_million_targets_are_refused_at_once(app, client, capsys):
    text = json.dumps(explain_json(targets=list(range(1_000_000))))
    started = time.perf_counter()
    response = client.post("/v1/explanations", data=text, content_type="application/json")
    elapsed = time.perf_counter() - started
    body = problem(app, response, 422, "too_many_items")
    assert "/targets: 1,000,000 items" in body["detail"]
    assert "1,024" in body["detail"]
    with capsys.disabled():
        print(f"\n  a million targets ({len(text):,} bytes) refused in {elapsed * 1000:.0f} ms")


def test_more_targets_than_classes_are_refused(app, client):
    targets = ",".join(str(index % 10) for index in range(11))
    data = {"image": (io.BytesIO(sample_png()), "a.png"), "model": TINY_MODEL, "targets": targets}
    response = client.post("/v1/explanations", data=data, content_type="multipart/form-data")
    body = problem(app, response, 422, "too_many_targets")
    assert "10 classes" in body["detail"]


# -- what the manifest says cannot run is refused at submission ---------------------------------------


def test_work_the_manifest_rules_out_is_refused_before_queueing(app, client, queued):
    before = queued()
    body = problem(app, post(client, "/v1/explanations", explain_json(model="fmnist-resnet")), 422, "unsupported_model")
    assert "Vision Transformer" in body["detail"]
    assert "fmnist-resnet@1" in body["detail"]
    problem(app, post(client, "/v1/audits", batch_json(model="fmnist-resnet")), 422, "unsupported_model")
    for kind in sorted(VIT_KINDS):
        problem(
            app, post(client, "/v1/analyses", batch_json(model="fmnist-resnet", kind=kind)), 422, "unsupported_model"
        )
    # fmnist-vit@2 pools the image tokens: no CLS token, so no CLS representation (for either model of cka).
    labels = list(range(4))
    no_cls = batch_json(model="fmnist-vit@2", labels=labels, kind="probes", representation="cls")
    assert "CLS token" in problem(app, post(client, "/v1/analyses", no_cls), 422, "unsupported_model")["detail"]
    across = batch_json(kind="cka", compare_to="fmnist-vit@2", representation="cls")
    assert "fmnist-vit@2" in problem(app, post(client, "/v1/analyses", across), 422, "unsupported_model")["detail"]
    assert queued() == before

    # What the manifest allows is accepted: CKA of a CNN's pooled features, a CLS token where there is one.
    gap = checked(
        app, post(client, "/v1/analyses", batch_json(model="fmnist-resnet", kind="cka", representation="gap"))
    )
    cls = checked(app, post(client, "/v1/analyses", batch_json(model="fmnist-vit@1", kind="cka", representation="cls")))
    assert gap.status_code == cls.status_code == 202
    assert queued() == before + 2


def test_one_table_of_needs():
    assert analysis_needs("attention-distance") == {"vit"}
    assert analysis_needs("probes", "cls") == {"cls"}
    assert analysis_needs("probes", "gap") == set()
    assert analysis_needs("skip-ratio") == set()  # a ResNet has skip connections too: the worker decides
    assert missing(frozenset({"vit", "cls"}), is_vit=True, prefix_tokens=()) == ["cls"]
    assert missing(frozenset({"vit", "cls"}), is_vit=False) == ["vit", "cls"]
    assert missing(frozenset({"cls"}), is_vit=True, prefix_tokens=("cls",)) == []
    # Register tokens are prefix tokens, but not a CLS token.
    assert missing(frozenset({"cls"}), is_vit=True, prefix_tokens=("reg0",)) == ["cls"]


def test_a_vit_registered_before_manifests_had_a_structure_is_not_refused():
    """Its architecture and arguments still say it is a patch model: judged by those, as GET /v1/models shows it."""
    from model_store.catalog import BUNDLED_ROOT, Catalog
    from service.params import require

    manifest = Catalog([BUNDLED_ROOT]).resolve("fmnist-vit@1").manifest
    legacy = manifest.model_copy(update={"structure": None})
    require(legacy, legacy.reference, frozenset({"vit", "cls"}), "an explanation")  # no Problem raised
    cnn = Catalog([BUNDLED_ROOT]).resolve("fmnist-resnet").manifest
    with pytest.raises(RequestError, match="needs a Vision Transformer") as refused:
        require(cnn, cnn.reference, frozenset({"vit"}), "an explanation")
    answer = problem_for(refused.value)
    assert (answer.status, answer.problem, answer.title) == (422, "unsupported_model", "Model cannot do this")


# -- repeated parts -----------------------------------------------------------------------------------


def test_a_repeated_part_is_refused_not_ignored(app, client):
    png = sample_png()
    twice = [("image", (io.BytesIO(png), "a.png")), ("image", (io.BytesIO(png), "b.png")), ("model", TINY_MODEL)]
    response = client.post("/v1/explanations", data=_multi(twice), content_type="multipart/form-data")
    assert problem(app, response, 422, "repeated_field")["field"] == "image"
    fields = [("image", (io.BytesIO(png), "a.png")), ("model", TINY_MODEL), ("top_k", "1"), ("top_k", "2")]
    response = client.post("/v1/explanations", data=_multi(fields), content_type="multipart/form-data")
    assert problem(app, response, 422, "repeated_field")["field"] == "top_k"

    for route, extra in (("/v1/audits", []), ("/v1/analyses", [("kind", "cka")])):
        repeated = [*_images(), ("model", TINY_MODEL), ("model", "fmnist-vit"), *extra]
        response = client.post(route, data=_multi(repeated), content_type="multipart/form-data")
        assert problem(app, response, 422, "repeated_field")["field"] == "model"
        # images (and labels) are meant to repeat
        once = _multi([*_images(), ("model", TINY_MODEL), *extra])
        assert checked(app, client.post(route, data=once, content_type="multipart/form-data")).status_code == 202


def test_a_form_part_without_a_name_is_refused(app, client):
    """A part whose Content-Disposition has no name cannot be read by anything: a 422, not a 500."""
    body = (
        f'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n{TINY_MODEL}\r\n'
        "--b\r\nContent-Disposition: form-data\r\n\r\nwhat am I\r\n"
        "--b\r\nContent-Disposition: form-data\r\n\r\nand I\r\n--b--\r\n"
    ).encode()
    response = client.post("/v1/explanations", data=body, content_type="multipart/form-data; boundary=b")
    assert "has no name" in problem(app, response, 422, "unnamed_part")["detail"]


def _images():
    return [("images", (io.BytesIO(sample_png(name)), name)) for name in SAMPLES]


def _multi(pairs):
    from werkzeug.datastructures import MultiDict

    return MultiDict(pairs)


# -- bounded memory -----------------------------------------------------------------------------------


def test_refused_bodies_keep_little_in_the_validation_memo(app, client):
    memo = app.extensions["classlens"].contract.memo
    before = memo.size_bytes
    for number in range(5):  # five distinct 1 MB bodies, each refused by the schema (a name too long)
        huge = explain_json(targets=[f"{number}" + "x" * 1_000_000])
        body = problem(app, post(client, "/v1/explanations", huge), 422, "invalid_body")
        assert len(body["detail"]) < 2_000
    assert memo.size_bytes - before < 5 * 4_000


def test_the_memo_is_bounded_by_bytes_and_entries():
    memo = VerdictMemo(max_entries=3, max_bytes=5_000)
    verdict = Problem(422, "t", "d" * 1_000, problem="p")
    for key in range(10):
        memo.put(bytes([key]), verdict)
        assert memo.size_bytes <= 5_000
        assert len(memo) <= 3
    assert memo.get(bytes([9])) == (True, verdict)
    assert memo.get(bytes([0])) == (False, None)
    memo.put(b"big", Problem(422, "t", "d" * 10_000, problem="p"))  # larger than the whole memo: not kept
    assert memo.get(b"big") == (False, None)
    assert MEMO_MAX_BYTES <= 4 * 1024 * 1024


def test_decode_slots_admit_at_most_their_size_with_real_threads():
    gate = DecodeSlots(2, wait_s=10)
    inside = threading.Barrier(2, timeout=10)

    def work():
        with gate.hold():
            with contextlib.suppress(threading.BrokenBarrierError):
                inside.wait()  # two holders at once are possible...
            time.sleep(0.02)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert gate.most_active == 2
    assert gate.active == 0


def test_decode_slots_refuse_after_waiting():
    gate = DecodeSlots(1, wait_s=0.05)
    held, release = threading.Event(), threading.Event()

    def holder():
        with gate.hold():
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    with pytest.raises(Problem) as refused, gate.hold():
        pass
    assert refused.value.status == 503
    assert refused.value.problem == "busy"
    release.set()
    thread.join(10)
    with gate.hold():
        assert gate.active == 1


def test_the_api_waits_for_a_decode_slot_then_answers_busy(app, client):
    with app.app_context():
        gate = slots()
    assert gate.size == 2
    held, release = threading.Event(), threading.Event()
    holders = []

    def holder():
        with gate.hold():
            held.set()
            release.wait(10)

    for _ in range(gate.size):
        held.clear()
        thread = threading.Thread(target=holder)
        thread.start()
        held.wait(10)
        holders.append(thread)
    try:
        fresh = Image.new("L", (31, 29), 7)
        buffer = io.BytesIO()
        fresh.save(buffer, format="PNG")
        response = post(client, "/v1/explanations", {"image": b64(buffer.getvalue()), "model": TINY_MODEL})
        problem(app, response, 503, "busy")
    finally:
        release.set()
        for thread in holders:
            thread.join(10)
    response = post(client, "/v1/explanations", {"image": b64(buffer.getvalue()), "model": TINY_MODEL})
    assert checked(app, response).status_code == 202


# -- the small ones ------------------------------------------------------------------------------------


def test_rows_csv_escapes_formula_cells():
    row = {
        "file": '=HYPERLINK("http://x")',
        "true_index": -1,
        "true_label": "+cmd",
        "predicted_index": 0,
        "predicted_label": "@SUM(A1)",
        "probability": -0.5,
        "correct": None,
        "predicted_emergence_layer": None,
        "true_emergence_layer": None,
        "explained_index": 0,
        "explained_label": "\tx",
        "peak_row": 0,
        "peak_col": 0,
        "central_share": None,
        "border_share": None,
    }
    text = rows_csv({"rows": [row, {**row, "file": "-2+3", "true_label": "\rA", "predicted_label": "safe"}]})
    lines = text.split("\r\n")
    assert lines[1].startswith('"\'=HYPERLINK(""http://x"")",-1,\'+cmd,0,\'@SUM(A1),-0.5,')
    assert "'\tx" in lines[1]
    assert lines[2].startswith("'-2+3,-1,\"'\rA\",0,safe,")


def _oriented_jpeg(orientation: int) -> bytes:
    """A 40x20 JPEG, left half black and right half white, with an EXIF orientation tag."""
    image = Image.new("L", (40, 20), 0)
    image.paste(255, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def _grey(image: Image.Image, x: int, y: int) -> int:
    value = image.getpixel((x, y))
    assert isinstance(value, int)
    return value


def test_exif_orientation_is_applied_before_preprocessing():
    data = _oriented_jpeg(6)  # 6: the stored picture is to be turned 90 degrees clockwise
    spec = InputSpec(height=40, width=40, channels=1, colour_mode="L")
    upright = fit_to_input(decode_image(data), spec, Preprocessing(resize=(40, 20), mean=(0.5,), std=(0.5,)))
    assert upright.size == (20, 40)  # (width, height): turned
    assert _grey(upright, 10, 5) < 60
    assert _grey(upright, 10, 35) > 200
    steps = Preprocessing(resize=(20, 40), mean=(0.5,), std=(0.5,), exif_orientation=False)
    as_stored = fit_to_input(decode_image(data), spec, steps)
    assert as_stored.size == (40, 20)
    assert _grey(as_stored, 5, 10) < 60
    assert _grey(as_stored, 35, 10) > 200
    assert Preprocessing(resize=(28, 28), mean=(0.5,), std=(0.5,)).exif_orientation is True
