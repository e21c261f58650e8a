"""Accuracy at scale (cloformer-validate --data): labels, paired intervals, streaming shards, resumption, workers,
a Ray cluster, reports and bad input."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cloformer_deploy.cli import validate_main
from cloformer_deploy.images import write_photo_set
from cloformer_deploy.inputs import InputError
from cloformer_deploy.pipeline import schema
from cloformer_deploy.validation.labelled import DataError, imagenet_synsets, read_set
from cloformer_deploy.validation.paired import mcnemar_p, paired_change_ci, tango_statistic, wilson_ci

from helpers import live_processes

TESTS = Path(__file__).resolve().parent
CLASSES = [str(i) for i in range(10)]  # the tiny model's labels
# what differs between runs that computed the same figures: when and where they ran
RUN_FIELDS = ("run", "nodes", "worker_seconds")


def figures(doc: dict) -> dict:
    """An accuracy.json without what says when, where and how fast it was computed."""
    rows = [{k: v for k, v in r.items() if k not in RUN_FIELDS} for r in doc["rows"]]
    ref = {k: v for k, v in doc["reference"].items() if k != "run"}
    return {"reference": ref, "rows": rows, "unreadable": doc["unreadable"], "skipped": doc["skipped"]}


# ---- paired intervals ------------------------------------------------------------------------------------------


def test_tango_statistic_at_zero_change_is_mcnemars():
    for gained, lost in [(3, 9), (40, 25), (1, 0)]:
        assert tango_statistic(gained, lost, 1000, 0.0) == pytest.approx((gained - lost) / math.sqrt(gained + lost))


def test_tango_statistic_matches_its_constrained_maximum_likelihood():
    from scipy.optimize import minimize_scalar

    def numeric(b, c, n, d):  # b gained, c lost, change d = p_b - p_c: maximise the likelihood over p_c
        def nll(pc):
            return -(b * math.log(pc + d) + c * math.log(pc) + (n - b - c) * math.log(1 - 2 * pc - d))

        pc = minimize_scalar(nll, bounds=(max(0, -d) + 1e-12, (1 - d) / 2 - 1e-12), method="bounded").x
        return (b - c - n * d) / math.sqrt(n * (2 * pc + d - d * d))

    for b, c, n, d in [(5, 9, 100, 0.02), (30, 10, 1000, -0.01), (3, 1, 50, 0.1)]:
        assert tango_statistic(b, c, n, d) == pytest.approx(numeric(b, c, n, d), rel=1e-4)


def test_paired_interval_properties():
    n = 50_000
    lo, hi = paired_change_ci(0, 0, n)  # nothing flipped: about +-3.84/n, not a zero width
    assert lo == pytest.approx(-hi) and hi == pytest.approx(1.959964**2 / n, rel=0.01)
    lo, hi = paired_change_ci(9, 2, 100)
    assert (lo, hi) == pytest.approx(tuple(-x for x in reversed(paired_change_ci(2, 9, 100))))
    assert lo < 0.07 < hi and lo > 0
    # many flips: close to the Wald interval of the paired difference
    b, c = 1200, 800
    p = (b - c) / n
    se = math.sqrt((b + c) - (b - c) ** 2 / n) / n
    assert paired_change_ci(b, c, n) == pytest.approx((p - 1.96 * se, p + 1.96 * se), abs=2e-5)
    assert -1 <= paired_change_ci(0, 10, 10)[0] < paired_change_ci(0, 10, 10)[1] <= 1
    with pytest.raises(ValueError):
        paired_change_ci(5, 6, 10)


def test_mcnemar_and_wilson():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_p(30_000, 29_000) < 1e-4  # large counts stay cheap and finite
    lo, hi = wilson_ci(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


# ---- labels ----------------------------------------------------------------------------------------------------


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_labels_from_class_folders_by_name(tmp_path):
    _touch(tmp_path / "tabby" / "a.jpg")
    _touch(tmp_path / "Great_White_Shark" / "b.png")  # case and underscores aside
    _touch(tmp_path / "tabby" / "deeper" / "c.jpg")
    classes = ["tench", "great white shark", "tabby"]
    s = read_set(tmp_path, classes)
    assert s.how == "folders" and s.labelled
    assert dict(zip(s.names, s.labels)) == {"Great_White_Shark/b.png": 1, "tabby/a.jpg": 2, "tabby/deeper/c.jpg": 2}


def test_labels_from_synset_folders_in_the_standard_order(tmp_path):
    synsets = imagenet_synsets()
    assert len(synsets) == 1000 and synsets == sorted(synsets) and synsets[0] == "n01440764"
    _touch(tmp_path / "n01440764" / "x.JPEG")
    _touch(tmp_path / synsets[281] / "y.JPEG")
    s = read_set(tmp_path, [f"c{i}" for i in range(1000)])
    assert s.how == "synsets" and s.labels == [0, 281]


def test_labels_from_csv_over_a_flat_folder(tmp_path):
    for name in ("ILSVRC2012_val_00000001.JPEG", "b.jpg", "c.jpg", "d.jpg", "unlisted.jpg"):
        _touch(tmp_path / "val" / name)
    csv = tmp_path / "labels.csv"
    # a header; an index, a class name, a synset with ImageNet's boxes after it, a file named without extension
    csv.write_text(
        "ImageId,PredictionString\nb.jpg,3\nc.jpg,tabby\nd.jpg,n01440764 1 2 3 4\nILSVRC2012_val_00000001,2\n"
    )
    classes = [f"c{i}" for i in range(1000)]
    classes[281] = "tabby"
    s = read_set(tmp_path / "val", classes, csv)
    assert s.how == "csv"
    assert dict(zip(s.names, s.labels)) == {"ILSVRC2012_val_00000001.JPEG": 2, "b.jpg": 3, "c.jpg": 281, "d.jpg": 0}


def test_flat_folder_without_labels_is_unlabelled(tmp_path):
    _touch(tmp_path / "a.jpg")
    s = read_set(tmp_path, CLASSES)
    assert s.how == "none" and not s.labelled and s.labels == [-1]


@pytest.mark.parametrize(
    "layout, csv, says",
    [
        ({}, None, "holds no .jpg/.png images"),
        ({"notes.txt": b"x"}, None, "holds no .jpg/.png images"),
        ({"cat/a.jpg": b"x", "b.jpg": b"x"}, None, "both at its top"),
        ({"zebra/a.jpg": b"x"}, None, "subfolder 'zebra' names 'zebra', which is not one of the bundle's labels"),
        ({"a.jpg": b"x"}, "a.jpg,3\nmissing.jpg,1\nalso_missing.jpg,1\n", "'missing.jpg' and 1 more, not found"),
        ({"a.jpg": b"x"}, "a.jpg,zebra\n", "'zebra', which is not one of the bundle's labels"),
        ({"a.jpg": b"x"}, "a.jpg,12\n", "names class 12, but the model has 10 classes (0..9)"),
        ({"a.jpg": b"x"}, "a.jpg\n", "is not file,label"),
        ({"a.jpg": b"x"}, "/etc/hostname,1\n", "not a path inside data"),
        ({"a.jpg": b"x"}, "../a.jpg,1\n", "not a path inside data"),
    ],
)
def test_bad_sets_are_refused_in_one_line(tmp_path, layout, csv, says):
    data = tmp_path / "data"
    data.mkdir()
    for name, content in layout.items():
        _touch(data / name, content)
    labels = None
    if csv is not None:
        labels = tmp_path / "labels.csv"
        labels.write_text(csv)
    with pytest.raises(DataError) as e:
        read_set(data, CLASSES, labels)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_shard_keys_follow_the_files(tmp_path):
    for i in range(5):
        _touch(tmp_path / "0" / f"{i}.jpg")
    keys = [s.key for s in read_set(tmp_path, CLASSES).shards(2)]
    assert [len(s) for s in read_set(tmp_path, CLASSES).shards(2)] == [2, 2, 1]
    assert keys == [s.key for s in read_set(tmp_path, CLASSES).shards(2)]
    _touch(tmp_path / "0" / "3.jpg", b"changed")
    changed = [s.key for s in read_set(tmp_path, CLASSES).shards(2)]
    assert changed[0] == keys[0] and changed[1] != keys[1] and changed[2] == keys[2]


# ---- the evaluation --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def photo_set(tmp_path_factory):
    """36 views of the bundled photographs in the tiny model's class folders, a truncated JPEG and a text file
    named .jpg among them."""
    folder = write_photo_set(tmp_path_factory.mktemp("photos") / "set", 36, classes=CLASSES)
    whole = next((folder / "0").iterdir()).read_bytes()
    (folder / "3" / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (folder / "4" / "notes.jpg").write_text("not an image")
    return folder


@pytest.fixture(scope="session")
def evaluated(tiny_bundle, tiny_checkpoint, photo_set, tmp_path_factory):
    """The tiny bundle (every format) evaluated on the photo set in one process, shards of 8."""
    from cloformer_deploy.pipeline import evaluate_bundle

    out = tmp_path_factory.mktemp("accuracy")
    return evaluate_bundle(
        tiny_bundle.bundle, weights=tiny_checkpoint, data=photo_set, out=out, workers=1, shard_size=8
    )


def test_every_artifact_evaluated_against_pytorch(evaluated, tiny_bundle):
    doc = evaluated.document
    assert schema.problem("accuracy", json.loads(json.dumps(doc))) is None
    ref = doc["reference"]
    assert ref["images"] == 36 and ref["labelled"] and 0 <= ref["top1"] <= ref["top5"] <= 1
    assert sorted(u["image"] for u in doc["unreadable"]) == ["3/truncated.jpg", "4/notes.jpg"]
    manifest = json.loads((tiny_bundle.bundle / "manifest.json").read_text())
    assert [(r["format"], r["precision"]) for r in doc["rows"]] == [
        (a["format"], a["precision"]) for a in manifest["artifacts"]
    ]
    for row in doc["rows"]:
        assert "error" not in row, row
        assert row["passed"], row
        assert row["images"] == 36 and row["reference_top1"] == ref["top1"]
        lo, hi = row["top1_delta_ci95"]
        assert lo <= row["top1_delta"] <= hi
        assert row["flipped"]["count"] == row["flipped"]["lost"] + row["flipped"]["gained"]
        assert row["top1_delta"] == pytest.approx((row["flipped"]["gained"] - row["flipped"]["lost"]) / 36)
        assert sum(n["images"] for n in row["nodes"]) == 36 and sum(n["shards"] for n in row["nodes"]) == 5
    fp32 = [r for r in doc["rows"] if r["precision"] == "fp32"]
    assert fp32 and all(r["agreement"] == 1.0 and r["drift"]["max_abs"] < 1e-4 for r in fp32)
    for name in ("accuracy.json", "accuracy.md", "accuracy.png", "flipped.csv"):
        assert (evaluated.folder / name).is_file()
    md = (evaluated.folder / "accuracy.md").read_text()
    assert "Unreadable images: 2" in md and "3/truncated.jpg" in md


def test_figures_are_the_same_whatever_ran_the_shards(evaluated, tiny_bundle, tiny_checkpoint, photo_set, tmp_path):
    """Two worker processes and shards of another size: the same figures, image by image."""
    from cloformer_deploy.pipeline import evaluate_bundle

    other = evaluate_bundle(
        tiny_bundle.bundle, weights=tiny_checkpoint, data=photo_set, out=tmp_path, workers=2, shard_size=5
    )
    assert figures(other.document) == figures(evaluated.document)
    nodes = {n["node"] for r in other.rows for n in r["nodes"]}
    assert len(nodes) == 2 and all(f"process {os.getpid()}" not in n for n in nodes)
    assert live_processes(str(tmp_path)) == []


def test_a_breach_and_its_flips_are_reported(evaluated, tmp_path):
    """An artifact whose outputs are shuffled fails its bounds and every image it flips is in flipped.csv."""
    from cloformer_deploy.validation.accuracy import artifact_figures
    from cloformer_deploy.validation.evaluation import Job, Preprocessing, ShardStore
    from cloformer_deploy.validation.labelled import read_set as read
    from cloformer_deploy.validation.outputs import bounds_for

    doc = evaluated.document
    data = read(doc["data"]["folder"], CLASSES)
    shards = data.shards(8)
    store = ShardStore(evaluated.folder / "shards")
    prep = Preprocessing((64, 96), (0, 0, 0), (1, 1, 1))
    ref_dir = next(p for p in store.root.iterdir() if p.name.startswith("reference-"))
    ref_job = Job("reference", json.loads((ref_dir / "job.json").read_text())["key"], "ref", prep)
    bad = Job("artifact", "f" * 64, "shuffled", prep, slug="shuffled")
    rng = np.random.default_rng(0)
    for shard in shards:
        r = store.read(ref_job, shard)
        top5 = r["top5"].copy()
        top5[:, 0] = rng.integers(0, 10, len(top5))
        buf = io.BytesIO()
        n = len(top5)
        np.savez(
            buf,
            top5=top5,
            max_abs=np.full(n, 0.5),
            mean_abs=np.full(n, 0.1),
            cosine=np.full(n, 0.9),
            finite=np.ones(n, bool),
            node=np.array("here"),
            seconds=np.array(0.0),
            runner=np.array("{}"),
        )
        store.write(bad, shard, buf.getvalue())
    row, flipped = artifact_figures(data, shards, bad, ref_job, store, bounds_for("fp16"))
    assert not row["passed"] and "cosine 0.900000 < 0.999" in row["problems"][0]
    assert row["flipped"]["count"] == len(flipped) > 0
    assert row["agreement"] < 1.0


def test_unlabelled_set_gives_drift_and_agreement(tiny_bundle, tiny_checkpoint, tmp_path):
    from cloformer_deploy.pipeline import evaluate_bundle

    flat = tmp_path / "flat"
    for p in write_photo_set(tmp_path / "made", 6, classes=["x"]).rglob("*.jpg"):
        _touch(flat / p.name, p.read_bytes())
    ev = evaluate_bundle(tiny_bundle.bundle, weights=tiny_checkpoint, data=flat, out=tmp_path / "out", workers=1)
    assert ev.document["reference"]["top1"] is None and ev.document["data"]["labels_from"] == "none"
    for row in ev.rows:
        assert row["top1"] is None and row["flipped"] is None and row["agreement"] is not None
    assert schema.problem("accuracy", json.loads(json.dumps(ev.document))) is None


def _validate(bundle, checkpoint, *args, cwd=None):
    return subprocess.Popen(
        [sys.executable, str(TESTS / "validate_tiny.py"), str(bundle), "--weights", str(checkpoint), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=cwd,
    )


@pytest.fixture(scope="session")
def larger_set(tmp_path_factory):
    return write_photo_set(tmp_path_factory.mktemp("larger") / "set", 240, classes=CLASSES, side=128)


def test_killed_run_resumes_to_the_same_figures(tiny_bundle, tiny_checkpoint, larger_set, tmp_path):
    common = ["--data", larger_set, "--shard-size", "4", "--workers", "2", "-q"]
    killed = tmp_path / "killed"
    proc = _validate(tiny_bundle.bundle, tiny_checkpoint, *common, "--out", killed)
    deadline = time.monotonic() + 300
    # kill it once some artifact has finished shards, as a user's Ctrl-\ or an OOM killer would: no cleanup at all
    while time.monotonic() < deadline and proc.poll() is None:
        done = [p for p in killed.glob("shards/*/*.npz") if not p.parent.name.startswith("reference-")]
        if len(done) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "accuracy.json").exists()
    assert live_processes(str(killed)) == []  # its workers ended with it
    finished = len(list(killed.glob("shards/*/*.npz")))
    resumed = _validate(tiny_bundle.bundle, tiny_checkpoint, *common, "--out", killed)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err.decode()[-2000:]
    whole = _validate(tiny_bundle.bundle, tiny_checkpoint, *common, "--out", tmp_path / "whole")
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err.decode()[-2000:]
    a = json.loads((killed / "accuracy.json").read_text())
    b = json.loads((tmp_path / "whole" / "accuracy.json").read_text())
    assert figures(a) == figures(b)
    runs = [a["reference"]["run"], *(r["run"] for r in a["rows"])]
    assert sum(r["images_resumed"] for r in runs) == finished * 4  # every shard finished before the kill was kept
    assert all(r["images_run"] + r["images_resumed"] == 240 for r in runs)


def test_progress_shows_rate_and_time_left_and_a_line_per_artifact(tiny_bundle, tiny_checkpoint, photo_set, tmp_path):
    from cloformer_deploy.pipeline import evaluate_bundle
    from cloformer_deploy.progress import Progress

    class Stream:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return False

    stream = Stream()
    evaluate_bundle(
        tiny_bundle.bundle,
        weights=tiny_checkpoint,
        data=photo_set,
        out=tmp_path,
        workers=1,
        shard_size=4,
        progress=Progress(stream=stream, plain_interval=0.0),
    )
    assert "images/s" in stream.text and " left" in stream.text
    finished = [ln for ln in stream.text.splitlines() if ": PASS, top-1 " in ln]
    assert len(finished) == len(json.loads((tmp_path / "accuracy.json").read_text())["rows"])


def test_cli_prints_the_table_and_where_the_reports_are(tiny_bundle, tiny_checkpoint, photo_set, tmp_path, capsys):
    args = [str(tiny_bundle.bundle), "--weights", str(tiny_checkpoint), "--data", str(photo_set)]
    assert validate_main([*args, "--workers", "1", "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "PyTorch fp32" in out and "95% CI (pts)" in out and "onnx fp32 on local" in out
    assert "2 unreadable image(s)" in out and f"in {tmp_path}" in out
    assert out.strip().splitlines()[-1].startswith("PASS: ") and "on 36 images" in out


# ---- bad input -------------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--workers", "0"], "--workers"),
        (["--shard-size", "0"], "--shard-size"),
        (["--labels", "{tmp}/missing.csv"], "--labels"),
        (["--labels", "{tmp}/labels.csv"], "not found under --data"),
        (["--data", "{tmp}/empty"], "holds no .jpg/.png images"),
        (["--data", "{tmp}/unknown"], "'zebra', which is not one of the bundle's labels"),
        (["--cluster", "127.0.0.1:{port}"], "--cluster"),  # nothing there (or, without the extra, no Ray here)
        (["--cluster", "127.0.0.1:{port}", "--target", "ssh://127.0.0.1:{port}"], "--cluster"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tiny_bundle, tiny_checkpoint, photo_set, tmp_path, capsys, extra, says
):
    (tmp_path / "empty").mkdir()
    _touch(tmp_path / "unknown" / "zebra" / "a.jpg")
    (tmp_path / "labels.csv").write_text("nowhere.jpg,1\n")
    port = _free_port()
    extra = [e.format(tmp=tmp_path, port=port) for e in extra]
    args = [str(tiny_bundle.bundle), "--weights", str(tiny_checkpoint)]
    if "--data" not in extra:
        args += ["--data", str(photo_set)]
    out = tmp_path / "out"
    code = validate_main([*args, *extra, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_set_with_no_readable_image_is_one_line(tiny_bundle, tiny_checkpoint, tmp_path, capsys):
    _touch(tmp_path / "set" / "0" / "a.jpg", b"version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer
    args = [str(tiny_bundle.bundle), "--weights", str(tiny_checkpoint), "--data", str(tmp_path / "set")]
    assert validate_main([*args, "--workers", "1", "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "no image of --data could be read (0/a.jpg: cannot identify image file)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out" / "accuracy.json").exists()


def test_two_evaluations_do_not_write_one_folder(tiny_bundle, tiny_checkpoint, photo_set, tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running evaluation holds it
        args = [str(tiny_bundle.bundle), "--weights", str(tiny_checkpoint), "--data", str(photo_set)]
        assert validate_main([*args, "--workers", "1", "--out", str(out), "-q"]) == 2
    assert f"another evaluation is writing into {out}" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_evaluation_options_need_data(tiny_bundle, tiny_checkpoint, capsys):
    code = validate_main([str(tiny_bundle.bundle), "--weights", str(tiny_checkpoint), "--workers", "2", "-q"])
    assert code == 2 and "--workers applies to --data" in capsys.readouterr().err


@pytest.mark.e2e
def test_unreachable_cluster_is_named(capsys):
    pytest.importorskip("ray") if not os.environ.get("CI") else __import__("ray")
    from cloformer_deploy.validation.ray_cluster import check_address

    port = _free_port()
    with pytest.raises(InputError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        check_address("--cluster", f"127.0.0.1:{port}")


def test_cluster_without_ray_names_the_extra(monkeypatch):
    import importlib.util

    from cloformer_deploy.validation.ray_cluster import check_address

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(InputError, match=r'pip install -e "\.\[cluster\]"'):
        check_address("--cluster", "127.0.0.1:6379")


# ---- the published schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(schema.SCHEMAS))
def test_published_schema_is_current(name):
    published = schema.schema_file(name).read_text(encoding="utf-8")
    assert published == schema.published_text(name), (
        f"{schema.SCHEMAS[name][0]} is stale; run: python -m cloformer_deploy.pipeline.schema --write"
    )


def test_reference_evaluations_follow_the_published_schema():
    root = TESTS.parent / "runtime_bench" / "reference"
    found = sorted(root.glob("*/accuracy/accuracy.json"))
    assert found, "no reference evaluation is committed"
    for path in found:
        doc = json.loads(path.read_text())
        assert schema.problem("accuracy", doc) is None, path
        assert doc["rows"] and all(r["passed"] for r in doc["rows"])


def test_a_fresh_manifest_validates_against_the_published_file_alone(tiny_bundle):
    """What an app developer does: the file as shipped, a stock validator, no code of ours."""
    from jsonschema import Draft202012Validator

    published = json.loads(schema.schema_file("manifest").read_text())
    manifest = json.loads((tiny_bundle.bundle / "manifest.json").read_text())
    assert list(Draft202012Validator(published).iter_errors(manifest)) == []


# ---- a Ray cluster of two nodes --------------------------------------------------------------------------------

RAY_SCRIPT = """
set -e
ip link set lo up
export RAY_USAGE_STATS_ENABLED=0
trap 'ray stop --force > /dev/null 2>&1 || true' EXIT
ray start --head --node-ip-address 127.0.0.1 --port {port} --num-cpus 1 --include-dashboard=false \\
    --temp-dir {temp} --disable-usage-stats > {temp}/head.log 2>&1
ray start --address 127.0.0.1:{port} --node-ip-address 127.0.0.1 --num-cpus 1 > {temp}/node.log 2>&1
"{python}" "{script}" {bundle} --weights {weights} --data {data} --shard-size 4 --cluster 127.0.0.1:{port} \\
    --out {out} -q
"""


@pytest.mark.e2e
def test_two_node_ray_cluster_gives_the_local_figures(evaluated, tiny_bundle, tiny_checkpoint, photo_set, tmp_path):
    """A real Ray cluster of two nodes on loopback, inside a network namespace with only lo (Ray would take the
    machine's interface address otherwise): both nodes run shards, and the figures equal one process's."""
    import shutil

    reasons = []
    try:
        import ray  # noqa: F401
    except ImportError:
        reasons.append('Ray is not installed (pip install -e ".[cluster]")')
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        reasons.append("unshare and ip (util-linux, iproute2) are needed for a network namespace")
    elif subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        reasons.append("this user cannot make a network namespace (unshare --net needs root)")
    if reasons:
        if os.environ.get("CI"):
            pytest.fail("; ".join(reasons) + "; CI must run the cluster test")
        pytest.skip("; ".join(reasons))
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's sockets need a short path (108 bytes at most)
    out = tmp_path / "out"
    ray_bin = Path(sys.executable).parent
    script = RAY_SCRIPT.format(
        port=6380,
        temp=temp,
        python=sys.executable,
        script=TESTS / "validate_tiny.py",
        bundle=tiny_bundle.bundle,
        weights=tiny_checkpoint,
        data=photo_set,
        out=out,
    )
    env = {**os.environ, "PATH": f"{ray_bin}:{os.environ['PATH']}"}
    try:
        done = subprocess.run(
            ["unshare", "--net", "bash", "-c", script], capture_output=True, text=True, timeout=600, env=env
        )
        logs = (temp / "head.log").read_text()[-2000:] if (temp / "head.log").exists() else ""
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:] + logs
    assert "Traceback" not in done.stderr and "network_util" not in done.stderr, done.stderr
    doc = json.loads((out / "accuracy.json").read_text())
    assert doc["scheduler"]["kind"] == "ray" and len(doc["scheduler"]["nodes"]) == 2
    for row in doc["rows"]:
        ran = {n["node"] for n in row["nodes"]}
        assert len(ran) == 2, row["nodes"]  # both nodes ran shards of every artifact
    assert figures(doc) == figures(evaluated.document)
    assert live_processes("raylet") == [] and live_processes(str(temp)) == []
