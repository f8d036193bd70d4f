"""tasks.data: the three kinds of source, the cache, safe extraction and the subsets."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import socket
import tarfile
import threading
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import data, sources
from tasks.paths import PROJECT_DIR, SPLITS, RunPaths, read_json, sha256_file
from tasks.sources import normalised_texts
from tasks.text import normalise

PER_CLASS = 12  # reviews per split and label in the test tarball


def _write_aclimdb(parent: Path, sample: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Real reviews as `parent/aclImdb/<split>/<neg|pos>/<id>_<rating>.txt`; returns the
    frames that reading it must give (ordered by label, review_id)."""
    expected = {}
    for split, frame in sample.items():
        chosen = pd.concat([frame[frame.label == lab].head(PER_CLASS) for lab in (0, 1)])
        for row in chosen.itertuples():
            folder = parent / "aclImdb" / split / ("pos" if row.label else "neg")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{row.review_id}_{row.rating}.txt").write_bytes(row.text.encode("utf-8"))
        expected[split] = chosen.sort_values(["label", "review_id"], ignore_index=True)
    return expected


def _two_splits(sample: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The sample as a source holds it: a train and a test split."""
    return {s: sample[s] for s in ("train", "test")}


def _tarball(folder: Path, target: Path, extra: list[tarfile.TarInfo] = ()) -> str:
    """Pack `folder/aclImdb` (plus `extra` members) as `target`; returns its SHA-256."""
    with tarfile.open(target, "w:gz") as tar:
        tar.add(folder / "aclImdb", arcname="aclImdb")
        for info in extra:
            payload = b"evil" if info.isfile() else b""
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.sha256(target.read_bytes()).hexdigest()


@pytest.fixture
def private_urls(monkeypatch):
    """http and loopback URLs allowed, as for an air-gapped mirror."""
    monkeypatch.setenv("LORAFLOW_PRIVATE_URLS", "1")


@pytest.fixture
def server(tmp_path, private_urls):
    """A static HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, request log).
    Private URLs are allowed while it runs."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # keep pytest output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, requests
    httpd.shutdown()
    httpd.server_close()


def _frames(paths: RunPaths) -> dict[str, pd.DataFrame]:
    return {s: pd.read_parquet(paths.split_parquet(s)) for s in SPLITS}


def _from_split(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The rows taken from each source split: train and validation both come from train."""
    return {"train": pd.concat([frames["train"], frames["validation"]], ignore_index=True),
            "test": frames["test"]}


def _same_reviews(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """The same reviews, the expected texts normalised as the download step writes them."""
    cols = ["text", "label", "review_id", "rating"]
    got = got[cols].sort_values(["label", "review_id"], ignore_index=True)
    expected = expected[cols].reset_index(drop=True).assign(text=expected["text"].map(normalise)
                                                            .to_numpy())
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)


# --- local sources ---------------------------------------------------------------------------

def test_local_parquet_writes_requested_subsets_with_source_index(smoke_run, imdb_dir):
    config, paths = smoke_run
    written = data.download_dataset(config, paths)
    assert written == {s: str(paths.split_parquet(s)) for s in SPLITS}
    frames = _frames(paths)
    for split, size in (("train", config.train_size), ("validation", config.val_size),
                        ("test", config.test_size)):
        frame = frames[split]
        full = pd.read_parquet(imdb_dir / f"{'test' if split == 'test' else 'train'}.parquet")
        assert list(frame.columns) == ["text", "label", "review_id", "rating", "source_index"]
        assert len(frame) == size and frame["label"].dtype == "int64"
        assert frame["text"].tolist() == full["text"].iloc[frame["source_index"]].map(
            normalise).tolist()
        assert not frame["text"].str.contains("<br", case=False).any()
        assert frame["label"].nunique() == 2  # a shuffle, not the label-ordered head


def test_validation_is_disjoint_from_train_and_deterministic(smoke_run, artifacts):
    config, paths = smoke_run
    config = config.with_overrides(train_size=500, val_size=200)
    data.download_dataset(config, paths)
    first = _frames(paths)
    train, validation = (set(first[s]["source_index"]) for s in ("train", "validation"))
    assert len(train) == 500 and len(validation) == 200 and not train & validation
    other = RunPaths.for_run("again", paths.artifacts, paths.reports)
    data.download_dataset(config, other)
    for split, frame in _frames(other).items():
        pd.testing.assert_frame_equal(frame, first[split])
    reseeded = RunPaths.for_run("reseeded", paths.artifacts, paths.reports)
    data.download_dataset(config.with_overrides(data_seed=7), reseeded)
    assert set(_frames(reseeded)["train"]["source_index"]) != train


@pytest.mark.usefixtures("private_cache")  # the cache's first build is watched
def test_the_cache_normalises_each_text_once_for_every_later_run(smoke_run, imdb_sample,
                                                                  tmp_path, monkeypatch):
    config, paths = smoke_run
    folder = tmp_path / "sample"  # real reviews, fewer than the full splits: a quick first build
    folder.mkdir()
    for split in ("train", "test"):
        imdb_sample[split].to_parquet(folder / f"{split}.parquet")
    config = config.with_overrides(data=str(folder))
    data.download_dataset(config, paths)  # builds the cache, normalised texts included
    first = _frames(paths)

    def refuse(text):
        raise AssertionError("a cached source was normalised again")

    monkeypatch.setattr("tasks.data.normalise_text", refuse)
    other = RunPaths.for_run("again", paths.artifacts, paths.reports)
    data.download_dataset(config, other)
    for split, frame in _frames(other).items():
        pd.testing.assert_frame_equal(frame, first[split])


def test_test_subset_is_drawn_from_its_own_random_stream(smoke_run, imdb_dir):
    """IMDB's splits list their labels in the same order; shuffled with the same seed, the
    test subset's labels were the first training rows' labels, row for row."""
    config, paths = smoke_run
    config = config.with_overrides(train_size=300, val_size=50, test_size=300)
    data.download_dataset(config, paths)
    ours = _frames(paths)
    assert ours["test"]["label"].tolist() != ours["train"]["label"].tolist()
    # the normalised texts the download step cached (their normalisation is tested above)
    pools, _ = data.unique_pools(normalised_texts(config.data, paths.cache_dir))
    order = pools["test"][data.shuffled(len(pools["test"]), (config.data_seed, data.TEST_STREAM))]
    assert ours["test"]["source_index"].tolist() == order[:300].tolist()
    order = pools["train"][data.shuffled(len(pools["train"]), config.data_seed)]
    assert ours["validation"]["source_index"].tolist() == order[300:350].tolist()
    np.testing.assert_array_equal(data.shuffled(1000, 42), data.shuffled(1000, 42))
    assert not np.array_equal(data.shuffled(1000, 42), data.shuffled(1000, (42, 1)))


def test_duplicate_texts_planted_across_splits_are_removed_before_drawing_and_counted(
        smoke_run, imdb_sample, tmp_path):
    """A review in both splits (once with `<br />`, once without), one twice in train, one
    twice in test: each text lands in one subset at most, and draw.json counts them."""
    config, paths = smoke_run
    train, test = imdb_sample["train"].head(40).copy(), imdb_sample["test"].head(40).copy()
    train.loc[1, "text"] = train.loc[0, "text"]  # within train
    test.loc[3, "text"] = test.loc[2, "text"]  # within test
    test.loc[5, "text"] = train.loc[4, "text"].replace(" ", " <br /><br /> ", 1)  # across
    folder = tmp_path / "planted"
    folder.mkdir()
    train.to_parquet(folder / "train.parquet")
    test.to_parquet(folder / "test.parquet")
    config = config.with_overrides(data=str(folder), train_size=30, val_size=9, test_size=38)
    data.download_dataset(config, paths)
    frames = _frames(paths)
    texts = [t for f in frames.values() for t in f["text"]]
    assert len(texts) == len(set(texts)) == 30 + 9 + 38
    removed = read_json(paths.data_dir / "draw.json")["deduplication"]
    assert removed["train"] == {"rows": 40, "kept": 39, "duplicates_within_split": 1,
                                "also_in_an_earlier_split": 0}
    assert removed["test"] == {"rows": 40, "kept": 38, "duplicates_within_split": 1,
                               "also_in_an_earlier_split": 1}
    with pytest.raises(ValueError, match="test_size = 39 but the test split of .* has 38 "
                                         "distinct reviews \\(40 rows\\)"):
        data.download_dataset(config.with_overrides(test_size=39), paths)


@pytest.mark.parametrize("sizes, message", [
    ({"train_size": 20_000, "val_size": 5_001}, "train_size \\+ val_size = 25,001 but the train "
                                                "split of .* has 24,9\\d\\d distinct reviews "
                                                "\\(25,000 rows\\)"),
    ({"test_size": 25_001}, "test_size = 25,001 but the test split of .* has 24,\\d+ distinct "
                            "reviews \\(25,000 rows\\)"),
], ids=["train+validation", "test"])
def test_sizes_larger_than_the_source_are_a_value_error_naming_the_numbers(smoke_run, sizes,
                                                                           message):
    config, paths = smoke_run
    with pytest.raises(ValueError, match=message):
        data.download_dataset(config.with_overrides(**sizes), paths)
    assert not paths.data_dir.exists() or not list(paths.data_dir.iterdir())


@pytest.mark.usefixtures("private_cache")  # looks into the cache
def test_local_parquet_cached_once_and_reread_when_files_change(smoke_run, imdb_sample, tmp_path):
    config, paths = smoke_run
    folder = tmp_path / "parquet"
    folder.mkdir()
    for split in ("train", "test"):
        imdb_sample[split].head(40).to_parquet(folder / f"{split}.parquet")
    config = config.with_overrides(data=str(folder), train_size=30, val_size=10, test_size=40)
    data.download_dataset(config, paths)
    assert len(list((paths.cache_dir / "datasets").glob("*/train.parquet"))) == 1
    changed = imdb_sample["train"].tail(40).assign(label=1)
    changed.to_parquet(folder / "train.parquet")  # new size/mtime -> new cache key
    data.download_dataset(config, paths)
    assert (_frames(paths)["train"]["label"] == 1).all()


def test_source_with_fewer_rows_than_asked_for_is_refused(smoke_run, imdb_sample, tmp_path):
    config, paths = smoke_run
    folder = tmp_path / "small"
    folder.mkdir()
    for split in ("train", "test"):
        imdb_sample[split].head(20).to_parquet(folder / f"{split}.parquet")
    with pytest.raises(ValueError, match="train_size \\+ val_size = 30 but the train split of "
                                         ".* has 20 distinct reviews"):
        data.download_dataset(config.with_overrides(data=str(folder), train_size=20, val_size=10,
                                                    test_size=20), paths)
    data.download_dataset(config.with_overrides(data=str(folder), train_size=15, val_size=5,
                                                test_size=20), paths)
    assert [len(f) for f in _frames(paths).values()] == [15, 5, 20]


@pytest.mark.parametrize("as_root", [False, True], ids=["parent-of-aclImdb", "aclImdb-itself"])
def test_local_aclimdb_folder_read_like_the_parquet_copy(smoke_run, imdb_sample, tmp_path, as_root):
    config, paths = smoke_run
    expected = _write_aclimdb(tmp_path / "src", _two_splits(imdb_sample))
    source = tmp_path / "src" / ("aclImdb" if as_root else "")
    n = 2 * PER_CLASS
    data.download_dataset(config.with_overrides(data=str(source), train_size=n - 4, val_size=4,
                                                test_size=n), paths)
    frames = _from_split(_frames(paths))
    for split in ("train", "test"):
        _same_reviews(frames[split], expected[split])


def test_hub_source_loads_stanfordnlp_imdb_through_datasets(smoke_run, imdb_sample, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, *args, **kwargs):  # the hub is unreachable here
        calls.append(name)
        return datasets.DatasetDict({s: datasets.Dataset.from_pandas(imdb_sample[s][["text", "label"]])
                                     for s in ("train", "test")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config, paths = smoke_run
    data.download_dataset(config.with_overrides(data="hub"), paths)
    train = _frames(paths)["train"]
    assert calls == ["stanfordnlp/imdb"]
    assert list(train.columns) == ["text", "label", "source_index"]
    assert train["text"].isin(set(imdb_sample["train"]["text"].map(normalise))).all()


@pytest.mark.parametrize("make_source, message", [
    (lambda p: "ftp://example.org/aclImdb_v1.tar.gz", "unknown data source"),
    (lambda p: str(p / "nowhere"), "does not exist"),
    (lambda p: str(p), "holds neither train.parquet"),
    (lambda p: str(p / "only-train"), r"lacks \['test.parquet'\]"),
    (lambda p: str(p / "no-label"), r"lacks columns \['label'\]"),
    (lambda p: str(p / "a-file.txt"), "is a file"),
    (lambda p: "https://example.org/aclImdb_v1.tar.gz", "no checksum known"),
    (lambda p: "https://example.org/a.tar.gz#sha256=abc", "expected #sha256=<64 hex digits>"),
], ids=["scheme", "missing", "empty", "one-parquet", "no-label", "file", "no-checksum",
        "bad-fragment"])
def test_bad_sources_raise_clear_value_errors(smoke_run, imdb_sample, tmp_path, make_source,
                                              message):
    config, paths = smoke_run
    src = tmp_path / "src"
    (src / "only-train").mkdir(parents=True)
    imdb_sample["train"].head(5).to_parquet(src / "only-train" / "train.parquet")
    (src / "no-label").mkdir()
    for split in ("train", "test"):
        frame = imdb_sample[split].head(5).drop(columns="label")
        frame.to_parquet(src / "no-label" / f"{split}.parquet")
    (src / "a-file.txt").write_text("x")
    with pytest.raises(ValueError, match=message):
        data.download_dataset(config.with_overrides(data=make_source(src)), paths)
    assert not paths.train_parquet.exists()


def test_a_folder_outside_the_data_roots_is_refused_without_a_word_about_its_contents(
        smoke_run, imdb_sample, tmp_path, monkeypatch):
    """`data: /root` passed and the download error listed the folder's entries."""
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    allowed.mkdir()
    elsewhere.mkdir()
    (elsewhere / "id_rsa").write_text("secret")
    monkeypatch.setenv("LORAFLOW_DATA_ROOTS", str(allowed))
    (allowed / "link").symlink_to(elsewhere)  # resolved before the check: no way out
    config, paths = smoke_run
    for source in (elsewhere, allowed / "link", allowed / ".." / "elsewhere"):
        with pytest.raises(ValueError, match=re.escape(f"is outside the allowed data folders "
                                                       f"['{allowed}']; set LORAFLOW_DATA_ROOTS")
                           ) as refused:
            data.download_dataset(config.with_overrides(data=str(source)), paths)
        assert "id_rsa" not in str(refused.value)
    (allowed / "unusable").mkdir()  # inside the roots, but no data: still nothing listed
    (allowed / "unusable" / "id_rsa").write_text("secret")
    with pytest.raises(ValueError, match="holds neither train.parquet") as refused:
        data.download_dataset(config.with_overrides(data=str(allowed / "unusable")), paths)
    assert "id_rsa" not in str(refused.value)
    for split in ("train", "test"):
        imdb_sample[split].head(40).to_parquet(elsewhere / f"{split}.parquet")
    monkeypatch.setenv("LORAFLOW_DATA_ROOTS", os.pathsep.join([str(tmp_path / "other"),
                                                               str(elsewhere)]))
    data.download_dataset(config.with_overrides(data=str(allowed / "link"), train_size=30,
                                                val_size=5, test_size=40), paths)
    assert len(_frames(paths)["test"]) == 40


def test_default_data_roots_are_the_folder_holding_loraflow_data_and_the_projects_data(
        tmp_path, monkeypatch):
    monkeypatch.delenv("LORAFLOW_DATA_ROOTS")
    monkeypatch.setenv("LORAFLOW_DATA", str(tmp_path / "datasets" / "imdb"))
    assert sources.data_roots() == [tmp_path / "datasets", PROJECT_DIR / "data"]
    monkeypatch.setenv("LORAFLOW_DATA", "hub")
    assert sources.data_roots() == [PROJECT_DIR / "data"]
    with pytest.raises(ValueError, match="outside the allowed data folders"):
        sources.parse_source(str(tmp_path))


# --- the URL source --------------------------------------------------------------------------

def test_canonical_stanford_url_has_the_published_checksum():
    for url in ("https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
                "http://ai.stanford.edu/%7Eamaas/data/sentiment/aclImdb_v1.tar.gz"):
        assert sources.expected_sha256(url) == sources.CANONICAL_SHA256
    assert sources.expected_sha256("https://mirror/a.tar.gz#sha256=" + "AB" * 32) == "ab" * 32


@pytest.mark.usefixtures("private_cache")  # looks into the cache
def test_url_download_verified_extracted_and_cached(smoke_run, imdb_sample, tmp_path, server):
    base, www, requests = server
    expected = _write_aclimdb(tmp_path / "src", _two_splits(imdb_sample))
    digest = _tarball(tmp_path / "src", www / "aclImdb_v1.tar.gz")
    config, paths = smoke_run
    n = 2 * PER_CLASS
    config = config.with_overrides(data=f"{base}/aclImdb_v1.tar.gz#sha256={digest}",
                                   train_size=n - 4, val_size=4, test_size=n)
    data.download_dataset(config, paths)
    for split, frame in _from_split(_frames(paths)).items():
        _same_reviews(frame, expected[split])
    first = _frames(paths)

    other = RunPaths.for_run("second-run", paths.artifacts, paths.reports)
    data.download_dataset(config, other)
    assert requests == ["/aclImdb_v1.tar.gz"]  # the second run read the cache
    for split, frame in _frames(other).items():
        pd.testing.assert_frame_equal(frame, first[split])
    leftovers = [p.name for p in (paths.cache_dir / "datasets").iterdir()]
    assert not [name for name in leftovers if name.startswith(".download")]


@pytest.mark.usefixtures("private_cache")  # looks into the cache
def test_url_checksum_mismatch_raises_and_keeps_nothing(smoke_run, imdb_sample, tmp_path, server):
    base, www, _ = server
    _write_aclimdb(tmp_path / "src", _two_splits(imdb_sample))
    digest = _tarball(tmp_path / "src", www / "aclImdb_v1.tar.gz")
    wrong = digest[::-1]
    config, paths = smoke_run
    source = f"{base}/aclImdb_v1.tar.gz#sha256={wrong}"
    with pytest.raises(ValueError, match=f"checksum mismatch.*sha256 {digest}, expected {wrong}"):
        data.download_dataset(config.with_overrides(data=source), paths)
    files = [p for p in (paths.cache_dir / "datasets").rglob("*") if not p.name.endswith(".lock")]
    assert files == [] and not paths.train_parquet.exists()


def test_url_http_error_raises_value_error(smoke_run, server):
    base, _, _ = server
    config, paths = smoke_run
    with pytest.raises(ValueError, match="HTTP 404"):
        data.download_dataset(
            config.with_overrides(data=f"{base}/missing.tar.gz#sha256={'0' * 64}"), paths)


def test_unreachable_url_raises_connection_error(smoke_run, private_urls):
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config, paths = smoke_run
    source = f"http://127.0.0.1:{port}/a.tar.gz#sha256={'0' * 64}"
    with pytest.raises(ConnectionError, match=f"could not reach http://127.0.0.1:{port}/"):
        data.download_dataset(config.with_overrides(data=source), paths)


@pytest.mark.usefixtures("private_cache")  # looks into the cache
def test_url_tarball_with_parent_member_is_refused(smoke_run, imdb_sample, tmp_path, server):
    base, www, _ = server
    _write_aclimdb(tmp_path / "src", _two_splits(imdb_sample))
    evil = tarfile.TarInfo("aclImdb/../../evil.txt")
    digest = _tarball(tmp_path / "src", www / "aclImdb_v1.tar.gz", [evil])
    config, paths = smoke_run
    with pytest.raises(ValueError, match=r"member 'aclImdb/\.\./\.\./evil.txt' contains '\.\.'"):
        data.download_dataset(
            config.with_overrides(data=f"{base}/aclImdb_v1.tar.gz#sha256={digest}"), paths)
    assert not list(paths.artifacts.rglob("evil.txt"))
    assert not list(paths.artifacts.rglob("*_*.txt"))  # nothing extracted anywhere


@pytest.fixture
def no_network(monkeypatch):
    """Names resolve as listed here; every attempt to connect is recorded and fails."""
    monkeypatch.delenv("LORAFLOW_PRIVATE_URLS", raising=False)
    names = {"mirror.example": ["93.184.216.34", "10.0.0.7"], "localhost": ["127.0.0.1"],
             "public.example": ["93.184.216.34"]}
    connections: list = []

    def getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in names[host]]

    def create_connection(address, *args, **kwargs):
        connections.append(address)
        raise OSError("no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return connections


@pytest.mark.parametrize("url, message", [
    ("http://example.org/aclImdb_v1.tar.gz", "is not https; set LORAFLOW_PRIVATE_URLS=1"),
    ("https://127.0.0.1:8443/a.tar.gz", "127.0.0.1 is not a public address"),
    ("https://[::1]/a.tar.gz", "::1 is not a public address"),
    ("https://10.1.2.3/a.tar.gz", "10.1.2.3 is not a public address"),
    ("https://localhost/a.tar.gz", "localhost: it resolves to 127.0.0.1, not a public"),
    ("https://mirror.example/a.tar.gz", "mirror.example: it resolves to 10.0.0.7, not a public"),
], ids=["http", "loopback", "loopback-v6", "private", "name-of-loopback", "one-private-address"])
def test_urls_over_http_or_to_private_addresses_are_refused_before_connecting(
        smoke_run, tmp_path, no_network, url, message):
    """`data: http://127.0.0.1:PORT/...#sha256=...` made the worker fetch a loopback URL."""
    config, paths = smoke_run
    source = f"{url}#sha256={'0' * 64}"
    with pytest.raises(ValueError, match=message):
        data.download_dataset(config.with_overrides(data=source), paths)
    with pytest.raises(ValueError, match=message):  # fetch checks too, past parse_source
        sources.fetch(source, tmp_path / "a.tar.gz", "0" * 64)
    assert no_network == [] and not (tmp_path / "a.tar.gz").exists()


def test_a_public_https_url_is_connected_to_at_the_checked_address(tmp_path, no_network):
    with pytest.raises(ConnectionError, match="could not reach https://public.example/a.tar.gz"):
        sources.fetch(f"https://public.example/a.tar.gz#sha256={'0' * 64}", tmp_path / "a",
                      "0" * 64)
    assert no_network == [("93.184.216.34", 443)]  # the vetted address, not a second lookup


def test_a_redirect_is_followed_only_to_an_allowed_url(no_network):
    redirects = next(h for h in sources._opener().handlers
                     if isinstance(h, urllib.request.HTTPRedirectHandler))
    request = urllib.request.Request("https://public.example/a.tar.gz")
    for target, message in (("http://public.example/a.tar.gz", "is not https"),
                            ("https://10.0.0.1/a.tar.gz", "10.0.0.1 is not a public address")):
        with pytest.raises(ValueError, match=f"redirects elsewhere: .*{message}"):
            redirects.redirect_request(request, io.BytesIO(), 302, "Found", {}, target)
    followed = redirects.redirect_request(request, io.BytesIO(), 302, "Found", {},
                                          "https://public.example/b.tar.gz")
    assert followed.full_url == "https://public.example/b.tar.gz"


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("member, message", [
    (lambda out: tarfile.TarInfo("../evil.txt"), "contains '..'"),
    (lambda out: tarfile.TarInfo(str(out.parent / "evil.txt")), "absolute path"),
    (lambda out: _link("aclImdb/train/pos/1_9.txt", "../../../../evil.txt", tarfile.SYMTYPE),
     "is a link to '../../../../evil.txt'"),
    (lambda out: _link("aclImdb/train/pos/2_9.txt", "/etc/passwd", tarfile.LNKTYPE), "is a link"),
    (lambda out: _link("aclImdb/train/pos/dev", "", tarfile.CHRTYPE), "special file"),
], ids=["dotdot", "absolute", "symlink-out", "hardlink-out", "device"])
def test_safe_extract_refuses_escaping_members_before_writing(imdb_sample, tmp_path, member,
                                                              message):
    _write_aclimdb(tmp_path / "src", _two_splits(imdb_sample))
    out = tmp_path / "out"
    archive = tmp_path / "evil.tar.gz"
    _tarball(tmp_path / "src", archive, [member(out)])
    with pytest.raises(ValueError, match=f"refusing to extract evil.tar.gz: member .*{message}"):
        sources.safe_extract(archive, out)
    assert list(out.rglob("*")) == [] and not (tmp_path / "evil.txt").exists()


def test_safe_extract_takes_only_review_files(imdb_sample, tmp_path):
    _write_aclimdb(tmp_path / "src", _two_splits(imdb_sample))
    (tmp_path / "src" / "aclImdb" / "imdb.vocab").write_text("the\n")
    archive = tmp_path / "a.tar.gz"
    _tarball(tmp_path / "src", archive)
    sources.safe_extract(archive, tmp_path / "out")
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) == 4 * PER_CLASS  # 2 splits x 2 labels; imdb.vocab left out
    assert all(p.suffix == ".txt" and p.parent.name in ("pos", "neg") for p in files)


# --- the source cache: checksums, read-only hits, leftovers -----------------------------------

def _parquet_source(folder: Path, sample: dict[str, pd.DataFrame], rows: int = 40) -> Path:
    folder.mkdir()
    for split in ("train", "test"):
        sample[split].head(rows).to_parquet(folder / f"{split}.parquet")
    return folder


def _cached_folder(paths: RunPaths) -> Path:
    (folder,) = [p for p in (paths.cache_dir / "datasets").iterdir()
                 if p.is_dir() and not p.name.startswith(".")]
    return folder


@pytest.mark.usefixtures("private_cache")  # damages the cache
@pytest.mark.parametrize("damage", ["truncated", "labels_altered"])
def test_a_damaged_cached_split_is_rebuilt_not_read(smoke_run, imdb_sample, tmp_path, damage,
                                                    caplog):
    """A truncated cached parquet was never healed; one with other labels was read as is."""
    config, paths = smoke_run
    source = _parquet_source(tmp_path / "src", imdb_sample)
    config = config.with_overrides(data=str(source), train_size=30, val_size=5, test_size=40)
    data.download_dataset(config, paths)
    cached = _cached_folder(paths) / "train.parquet"
    if damage == "truncated":
        cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    else:  # a valid file with the same rows
        frame = pd.read_parquet(cached)
        frame.assign(label=1 - frame["label"]).to_parquet(cached, index=False)
    with caplog.at_level(logging.WARNING, logger="tasks.sources"):
        data.download_dataset(config, paths)
    assert "the SHA-256 of train.parquet differs from its source.json" in caplog.text
    truth = pd.read_parquet(source / "train.parquet")["label"].to_numpy()
    for split in ("train", "validation"):
        frame = _frames(paths)[split]
        np.testing.assert_array_equal(frame["label"].to_numpy(), truth[frame["source_index"]])
    assert sha256_file(cached) == read_json(cached.parent / "source.json")["sha256"]["train.parquet"]


@pytest.mark.usefixtures("private_cache")  # looks into the cache
def test_a_cache_hit_takes_no_lock_so_a_read_only_cache_serves(smoke_run, imdb_sample, tmp_path,
                                                                monkeypatch):
    """Taking the lock first made a hit fail on a read-only cache (tests run as root, where
    chmod cannot make a folder read-only: FileLock raising stands for it)."""
    import filelock

    config, paths = smoke_run
    config = config.with_overrides(data=str(_parquet_source(tmp_path / "src", imdb_sample)),
                                   train_size=30, val_size=5, test_size=40)
    data.download_dataset(config, paths)
    first = _frames(paths)
    for lock in (paths.cache_dir / "datasets").glob("*.lock"):
        lock.unlink()

    def read_only(*args, **kwargs):
        raise PermissionError("[Errno 30] Read-only file system")

    monkeypatch.setattr(filelock, "FileLock", read_only)
    other = RunPaths.for_run("second-run", paths.artifacts, paths.reports)
    data.download_dataset(config, other)
    for split, frame in _frames(other).items():
        pd.testing.assert_frame_equal(frame, first[split])
    assert not list((paths.cache_dir / "datasets").glob("*.lock"))


@pytest.mark.usefixtures("private_cache")  # looks into the cache
def test_a_killed_builders_temporaries_are_removed_by_the_next_builder(smoke_run, imdb_sample,
                                                                       tmp_path):
    """`.<key>.*.tmp` folders of a SIGKILLed builder stayed for ever."""
    config, paths = smoke_run
    config = config.with_overrides(data=str(_parquet_source(tmp_path / "src", imdb_sample)),
                                   train_size=30, val_size=5, test_size=40)
    data.download_dataset(config, paths)
    folder = _cached_folder(paths)
    (folder / "source.json").unlink()  # the next download builds again
    root = folder.parent
    leftovers = [root / f".{folder.name}.k1ll3d.tmp", root / f".{folder.name}.download-x.tmp",
                 root / f".{folder.name}.old.123.abcd1234"]
    for leftover in leftovers:
        (leftover / "aclImdb").mkdir(parents=True)
        (leftover / "aclImdb" / "train.parquet").write_bytes(b"half")
    (root / f".{folder.name}.train.parquet.x.tmp").write_bytes(b"half")  # an atomic_path file
    another_key = root / ".0123456789abcdef.k1ll3d.tmp"  # its builder may be alive: kept
    another_key.mkdir()
    data.download_dataset(config, paths)
    assert not [p for p in leftovers if p.exists()]
    assert {p.name for p in root.iterdir() if p.name.startswith(".")} == {another_key.name}
