"""A data source, apart from the run's subsets: parse its name, fetch and extract an
archive safely, read its files, and cache its two normalised full splits.

Three kinds of source (`config.data`):
- `hub`: `stanfordnlp/imdb` through `datasets`;
- an https URL of the original `aclImdb_v1.tar.gz` (Maas et al., ACL 2011): streamed with a
  progress bar, SHA-256 verified, extracted safely;
- a local folder holding `train.parquet` + `test.parquet`, or an extracted `aclImdb/`.

The source comes from the trigger form, so it may reach only what the deployment allows:
- a local folder must lie under one of `$LORAFLOW_DATA_ROOTS` (folders separated by
  `os.pathsep`; default: the folder holding `$LORAFLOW_DATA` and the project's `data/`),
  symlinks resolved first;
- a URL must be https and every address its host resolves to public (checked when
  connecting, on every redirect too), fetched without proxies. `LORAFLOW_PRIVATE_URLS=1`
  allows http, private and loopback addresses and the environment's proxies (tests, an
  air-gapped mirror).

The normalised full splits are cached once under `<artifacts>/cache/datasets/<key>/` with
their SHA-256 in `source.json`, so a second run neither downloads nor extracts, and a
damaged cached file is rebuilt. Used by the download step (tasks.data: the run's subsets),
validation (tasks.validate: the whole source) and preflight (tasks.preflight).
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import pandas as pd

from tasks.paths import (
    PROJECT_DIR,
    atomic_dir,
    atomic_path,
    checksums,
    damaged_files,
    read_json,
    remove_leftovers,
    write_json,
)

log = logging.getLogger(__name__)

HUB_ID = "stanfordnlp/imdb"
SOURCE_SPLITS = (
    "train",
    "test",
)  # a source's two splits; a run's three subsets: tasks.paths.SPLITS
PUBLISHED_ROWS = {"train": 25_000, "test": 25_000}  # stanfordnlp/imdb and aclImdb_v1.tar.gz
COLUMNS = ("text", "label", "review_id", "rating")  # the last two only where the source has them
# SHA-256 of the published aclImdb_v1.tar.gz (84,125,825 bytes), as pinned by independent
# downloaders (TensorFlow Datasets, Julia MLDatasets, gomlx); other URLs need `#sha256=<hex>`.
CANONICAL_URL = ("ai.stanford.edu", "/~amaas/data/sentiment/aclImdb_v1.tar.gz")
CANONICAL_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
_REVIEW_FILE = re.compile(r"^(\d+)_(\d+)\.txt$")  # aclImdb file names: <id>_<rating>.txt
_WANTED_MEMBER = re.compile(r"^(?:\./)?aclImdb/(?:train|test)/(?:pos|neg)/[^/]+\.txt$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SPLIT_FILES = [f"{s}.parquet" for s in SOURCE_SPLITS]
# Each split's texts normalised (tasks.text.normalise), computed once with the cache: the
# download step draws every run's subsets from them (4 s of regex over IMDB a run before).
_TEXT_FILES = {s: f"{s}.normalised.parquet" for s in SOURCE_SPLITS}


# --- the full splits, cached ---------------------------------------------------------------


def load_full_splits(source: str, cache_dir: Path) -> dict[str, pd.DataFrame]:
    """Both full splits of `source`, normalised, from the cache when it holds them."""
    from filelock import FileLock

    kind, resolved = parse_source(source)
    folder = source_folder(source, cache_dir)
    frames = read_cached(folder)  # a verified hit takes no lock: a read-only cache serves
    if frames is not None:
        return frames
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One process fetches; a concurrent run with the same source waits, then reads.
    with FileLock(str(folder.parent / f"{folder.name}.lock")):
        remove_leftovers(folder)  # of a killed builder: no other builder of key is alive
        frames = read_cached(folder, warn=False)  # damage was logged above
        if frames is not None:
            return frames
        if kind == "hub":
            frames = _load_hub()
        elif kind == "url":
            frames = _load_url(resolved, folder)
        else:
            frames = _load_local(Path(resolved))
        frames = {s: normalise(frames[s], f"{source} [{s}]") for s in SOURCE_SPLITS}
        with atomic_dir(folder) as tmp:
            for s in SOURCE_SPLITS:
                frames[s].to_parquet(tmp / f"{s}.parquet", index=False)
            written = _SPLIT_FILES + _write_normalised_texts(frames, tmp)
            write_json(
                tmp / "source.json",  # last: with the checksums that make a hit
                {
                    "source": source,
                    "kind": kind,
                    "rows": {s: len(frames[s]) for s in SOURCE_SPLITS},
                    "sha256": checksums(tmp, written),
                    "created_at": datetime.now(UTC).isoformat(),
                },
            )
    log.info("data cached: %s", folder)
    return frames


def read_cached(folder: Path, *, warn: bool = True) -> dict[str, pd.DataFrame] | None:
    """The cached full splits in `folder` if every file matches its SHA-256 in
    source.json, else None (nothing cached, an older cache without checksums, or a file
    damaged on disk: logged when `warn`)."""
    try:
        expected = read_json(folder / "source.json")["sha256"]
        if not all(name in expected for name in _SPLIT_FILES):
            return None
        damaged = damaged_files(folder, dict(expected))  # the normalised texts too
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if damaged:
        if warn:
            log.warning(
                "data cache %s: the SHA-256 of %s differs from its source.json "
                "(damaged on disk); rebuilding it",
                folder,
                ", ".join(damaged),
            )
        return None
    log.info("data cache hit: %s", folder)
    return {s: pd.read_parquet(folder / f"{s}.parquet") for s in SOURCE_SPLITS}


def _write_normalised_texts(frames: dict[str, pd.DataFrame], folder: Path) -> list[str]:
    """Each split's normalised texts beside it; none for a source whose text column holds
    other values than strings (validation refuses it, naming the rows)."""
    import pyarrow as pa

    from tasks.text import normalise as normalise_text

    try:
        for split, name in _TEXT_FILES.items():
            texts = frames[split]["text"]
            if not texts.map(lambda t: isinstance(t, str)).all():
                return []
            pd.DataFrame({"text": texts.map(normalise_text)}).to_parquet(folder / name, index=False)
    except (pa.ArrowException, TypeError, ValueError):
        return []
    return list(_TEXT_FILES.values())


def normalised_texts(source: str, cache_dir: Path) -> dict[str, pd.Series] | None:
    """The source's texts normalised, from its cache folder (verified with the splits by
    `load_full_splits`), or None where the cache has none."""
    folder = source_folder(source, cache_dir)
    try:
        return {s: pd.read_parquet(folder / name)["text"] for s, name in _TEXT_FILES.items()}
    except (OSError, ValueError, KeyError):
        return None


def source_folder(source: str, cache_dir: Path) -> Path:
    """Where the normalised full splits of `source` are cached (and their validation)."""
    return Path(cache_dir) / "datasets" / cache_key(*parse_source(source))


def read_parquet(path: Path) -> pd.DataFrame:
    """A Parquet file as a frame; text that is not valid UTF-8 raises UnreadableData naming
    the file, the column and the first bad row (pandas would fail later, naming none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    try:
        table.validate(full=True)  # checks every string value's UTF-8
        invalid = None
    except pa.ArrowInvalid as err:
        invalid = err
    for name in table.column_names:
        column = table.column(name)
        # bytes columns too: their text is decoded later (and pandas fails naming nothing)
        if (
            pa.types.is_binary(column.type)
            or pa.types.is_large_binary(column.type)
            or (
                invalid is not None
                and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type))
            )
        ):
            for row, value in enumerate(column.cast(pa.binary()).to_pylist()):
                try:
                    value is None or value.decode("utf-8")
                except UnicodeDecodeError as bad:
                    raise UnreadableData(
                        f"{path}: column {name!r}, row {row}: not valid "
                        f"UTF-8 ({bad.reason} at byte {bad.start})"
                    ) from None
    if invalid is not None:
        raise UnreadableData(f"{path}: {invalid}") from None
    try:
        return table.to_pandas()
    except pa.ArrowException as err:
        raise UnreadableData(f"{path}: {err}") from None


class UnreadableData(ValueError):
    """A source file whose text cannot be decoded."""


def parse_source(source: str) -> tuple[str, str]:
    """("hub" | "url" | "local", the source with a local path made absolute). A URL must be
    allowed (`check_url`), a folder must lie under the data roots (`data_roots`)."""
    if source == "hub":
        return "hub", source
    scheme = _SCHEME.match(source)
    if scheme:
        if scheme.group(1).lower() not in ("http", "https"):
            raise ValueError(
                f"unknown data source {source!r}: expected 'hub', an https:// URL "
                "of aclImdb_v1.tar.gz, or a local folder"
            )
        check_url(source)
        expected_sha256(source)  # fail before any network traffic when no checksum is known
        return "url", source
    folder = Path(source).expanduser().resolve()  # symlinks resolved: a link cannot lead out
    roots = data_roots()
    if not any(folder.is_relative_to(root) for root in roots):
        # Nothing about the folder itself (not even whether it exists) leaves this message.
        shown = f"{source!r}" + (f" (resolved to {folder})" if str(folder) != source else "")
        raise ValueError(
            f"data folder {shown} is outside the allowed data folders "
            f"{[str(r) for r in roots]}; set LORAFLOW_DATA_ROOTS (folders separated by "
            f"{os.pathsep!r}) to allow another"
        )
    if not folder.exists():
        raise ValueError(
            f"data folder {source!r} does not exist (resolved to {folder}); "
            "expected 'hub', an https:// URL, or a folder with "
            "train/test.parquet or aclImdb/"
        )
    if not folder.is_dir():
        raise ValueError(
            f"data source {source!r} is a file; expected a folder holding "
            "train.parquet and test.parquet, or an extracted aclImdb/"
        )
    return "local", str(folder)


def data_roots() -> list[Path]:
    """The folders a local source must lie under: `$LORAFLOW_DATA_ROOTS` (folders separated
    by os.pathsep); unset or empty, the folder holding `$LORAFLOW_DATA` (when that is a
    local folder) and the project's `data/`. Resolved, so symlinks compare as targets."""
    setting = os.environ.get("LORAFLOW_DATA_ROOTS", "")
    roots = [Path(entry) for entry in setting.split(os.pathsep) if entry.strip()]
    if not roots:
        default = os.environ.get("LORAFLOW_DATA", "")
        if default and default != "hub" and not _SCHEME.match(default):
            roots.append(Path(default).expanduser().resolve().parent)
        roots.append(PROJECT_DIR / "data")
    return [root.expanduser().resolve() for root in roots]


def source_rows(kind: str, resolved: str) -> dict[str, int] | None:
    """Rows per split of a parsed source without reading its text: the published sizes for
    the hub and the archive; for a local folder its Parquet metadata or its review files;
    None when the folder's layout is for the download step to judge."""
    if kind in ("hub", "url"):
        return dict(PUBLISHED_ROWS)
    import pyarrow.parquet as pq

    folder = Path(resolved)
    files = {s: folder / f"{s}.parquet" for s in SOURCE_SPLITS}
    if all(f.exists() for f in files.values()):
        try:
            return {s: pq.read_metadata(f).num_rows for s, f in files.items()}
        except (OSError, ValueError):
            return None  # not Parquet: the download step says so with the file's name
    root = _aclimdb_root(folder)
    if root is None:
        return None
    return {
        s: sum(1 for lab in ("neg", "pos") for _ in (root / s / lab).glob("*.txt"))
        for s in SOURCE_SPLITS
    }


def cache_key(kind: str, resolved: str) -> str:
    """Hash of the source; for a local folder also of its files' sizes and mtimes, so an
    edited folder is read again."""
    ident: dict = {"kind": kind, "source": resolved}
    if kind == "local":
        folder = Path(resolved)
        stamps = [folder / f"{s}.parquet" for s in SOURCE_SPLITS]
        if not all(p.exists() for p in stamps):  # aclImdb: a folder's mtime changes with its files
            root = _aclimdb_root(folder) or folder
            stamps = [root / s / lab for s in SOURCE_SPLITS for lab in ("neg", "pos")]
        ident["files"] = [
            [str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in stamps if p.exists()
        ]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def normalise(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    """Keep text, label (int64 where integral), review_id, rating. Nulls and odd values stay
    as they are: judging them is validation's job, with a full report."""
    missing = [c for c in ("text", "label") if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; it has {list(frame.columns)}")
    frame = frame[[c for c in COLUMNS if c in frame.columns]].reset_index(drop=True)
    if pd.api.types.is_integer_dtype(frame["label"]):
        frame["label"] = frame["label"].astype("int64")
    return frame


# --- the three kinds of source ---------------------------------------------------------------


def _load_hub() -> dict[str, pd.DataFrame]:
    import datasets  # heavy; only this source needs it

    dataset = datasets.load_dataset(HUB_ID)
    return {s: dataset[s].to_pandas() for s in SOURCE_SPLITS}


def _load_local(folder: Path) -> dict[str, pd.DataFrame]:
    parquet = {s: folder / f"{s}.parquet" for s in SOURCE_SPLITS}
    if any(p.exists() for p in parquet.values()):
        missing = [p.name for p in parquet.values() if not p.exists()]
        if missing:
            raise ValueError(
                f"data folder {folder} lacks {missing}; expected both "
                "train.parquet and test.parquet"
            )
        return {s: read_parquet(p) for s, p in parquet.items()}
    root = _aclimdb_root(folder)
    if root is None:  # what the folder does hold stays out of the message (and the task log)
        raise ValueError(
            f"data folder {folder} holds neither train.parquet + test.parquet nor "
            "aclImdb/{train,test}/{pos,neg}/"
        )
    return read_aclimdb(root)


def _aclimdb_root(folder: Path) -> Path | None:
    for root in (folder / "aclImdb", folder):
        if all((root / s / lab).is_dir() for s in SOURCE_SPLITS for lab in ("neg", "pos")):
            return root
    return None


def read_aclimdb(root: Path) -> dict[str, pd.DataFrame]:
    """`<root>/{train,test}/{neg,pos}/<id>_<rating>.txt` as frames ordered by (label, id),
    the order of the shared Parquet copy."""
    frames = {}
    for split in SOURCE_SPLITS:
        rows = []
        for label, name in ((0, "neg"), (1, "pos")):
            folder = root / split / name
            files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
            if not files:
                raise ValueError(f"no reviews in {folder}; expected files named <id>_<rating>.txt")
            for f in files:
                match = _REVIEW_FILE.match(f.name)
                if not match:
                    raise ValueError(
                        f"unexpected file {f}; aclImdb reviews are named <id>_<rating>.txt"
                    )
                # bytes, not read_text: universal newlines would alter the original text
                try:
                    text = f.read_bytes().decode("utf-8")
                except UnicodeDecodeError as bad:
                    raise UnreadableData(
                        f"{f}: not valid UTF-8 ({bad.reason} at byte {bad.start})"
                    ) from None
                rows.append((text, label, int(match[1]), int(match[2])))
        frame = pd.DataFrame(rows, columns=list(COLUMNS)).astype(
            {"label": "int64", "review_id": "int32", "rating": "int8"}
        )
        frames[split] = frame.sort_values(["label", "review_id"], ignore_index=True)
    return frames


def _load_url(url: str, folder: Path) -> dict[str, pd.DataFrame]:
    """The archive at `url`, downloaded and extracted beside the cache `folder` under a
    temporary name of its own (so the next builder removes what a killed one left)."""
    expected = expected_sha256(url)
    with tempfile.TemporaryDirectory(
        prefix=f".{folder.name}.download-", suffix=".tmp", dir=folder.parent
    ) as tmp:
        archive = Path(tmp) / "aclImdb_v1.tar.gz"
        fetch(url, archive, expected)
        target = Path(tmp) / "extracted"
        safe_extract(archive, target)
        root = _aclimdb_root(target)
        if root is None:
            raise ValueError(f"{url} holds no aclImdb/{{train,test}}/{{pos,neg}}/ reviews")
        return read_aclimdb(root)


def expected_sha256(url: str) -> str:
    """The digest from a `#sha256=<hex>` fragment, else the published one for the canonical
    Stanford URL; any other URL without a fragment is refused (nothing is unverified)."""
    parts = urllib.parse.urlsplit(url)
    if parts.fragment:
        match = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", parts.fragment)
        if not match:
            raise ValueError(
                f"URL fragment {parts.fragment!r} of {url!r}: expected #sha256=<64 hex digits>"
            )
        return match[1].lower()
    if (parts.hostname, urllib.parse.unquote(parts.path)) == CANONICAL_URL:
        return CANONICAL_SHA256
    raise ValueError(
        f"no checksum known for {url!r}; append #sha256=<64 hex digits> "
        "(the SHA-256 of the archive) to the URL"
    )


def fetch(url: str, target: Path, sha256: str) -> Path:
    """Stream `url` (fragment dropped) into `target` with a progress bar; keep it only if
    its SHA-256 equals `sha256`. The URL, every redirect and every address connected to
    are checked first (`check_url`, `connect_public`)."""
    from tqdm.auto import tqdm

    from tasks.environment import progress_disabled

    check_url(url)
    plain = urllib.parse.urlsplit(url)._replace(fragment="").geturl()
    request = urllib.request.Request(plain, headers={"User-Agent": "loraflow"})
    try:
        response = _opener().open(request, timeout=60)
    except urllib.error.HTTPError as err:
        raise ValueError(
            f"download of {plain} failed: HTTP {err.code} {err.reason}; expected a 2xx response"
        ) from err
    except urllib.error.URLError as err:
        raise ConnectionError(f"could not reach {plain}: {err.reason}") from err
    digest = hashlib.sha256()
    with response, atomic_path(target) as tmp:  # no complete-looking file unless verified
        if not 200 <= response.status < 300:
            raise ValueError(f"download of {plain} failed: HTTP {response.status}; expected 2xx")
        total = int(response.headers.get("Content-Length") or 0) or None
        with (
            tmp.open("wb") as out,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=target.name,
                mininterval=2.0,
                disable=progress_disabled(),
            ) as bar,
        ):
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise ValueError(
                f"checksum mismatch for {plain}: got sha256 {digest.hexdigest()}, "
                f"expected {sha256}; the download was deleted"
            )
    return target


# --- which URLs a download may reach ----------------------------------------------------------
# The URL comes from the trigger form: without a check, `http://127.0.0.1:<port>/...` or a
# name resolving to 10.x would make the worker call services that only it can reach.

_OPT_IN = "set LORAFLOW_PRIVATE_URLS=1 to allow http and private addresses (tests, a mirror)"


def private_urls_allowed() -> bool:
    return os.environ.get("LORAFLOW_PRIVATE_URLS", "").strip().lower() in ("1", "true", "yes")


def check_url(url: str) -> None:
    """Refuse a URL that is not https, or whose host is an address that is not public (a
    host name is resolved and checked when connecting), unless private URLs are allowed."""
    if private_urls_allowed():
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "https":
        raise ValueError(f"data URL {url!r} is not https; {_OPT_IN}")
    if not parts.hostname:
        raise ValueError(f"data URL {url!r} names no host")
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return  # a host name
    if not address.is_global:
        raise ValueError(f"data URL {url!r}: {address} is not a public address; {_OPT_IN}")


def connect_public(
    address: tuple[str, int],
    timeout: float | None = None,
    source_address: tuple[str, int] | None = None,
) -> socket.socket:
    """socket.create_connection that resolves the host once, refuses it unless every address
    is public, then connects to those addresses (no second lookup that could answer
    otherwise). Raises ValueError before any connection."""
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    private = [a for a in addresses if not ipaddress.ip_address(a).is_global]
    if private:
        raise ValueError(
            f"refusing to connect to {host}: it resolves to {', '.join(private)}, "
            f"not a public address; {_OPT_IN}"
        )
    error: OSError | None = None
    for ip in addresses:
        try:
            return socket.create_connection((ip, port), timeout, source_address)
        except OSError as err:
            error = err
    raise error or OSError(f"{host} resolves to no address")


class _PublicHTTPSConnection(http.client.HTTPSConnection):
    """TLS still verifies the certificate against the host name; only the TCP connection
    goes through `connect_public`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = connect_public


class _PublicHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_PublicHTTPSConnection, req, context=self._context)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is followed only to a URL `check_url` allows; its connection is checked
    like the first one's."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            check_url(newurl)
        except ValueError as err:
            fp.close()
            raise ValueError(f"{req.full_url} redirects elsewhere: {err}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    if private_urls_allowed():
        return urllib.request.build_opener()  # urllib's own: http, any address, env proxies
    # No proxies: through one, the address finally connected to could not be checked.
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), _PublicHTTPSHandler(), _CheckedRedirects()
    )


def safe_extract(archive: Path, target: Path) -> None:
    """Extract the aclImdb review files of `archive` into `target`. Every member is checked
    first; one that could land outside `target` (absolute path, `..`, a link pointing
    out, a device) refuses the whole archive before anything is written."""
    target = Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            problem = _member_problem(member, target)
            if problem:
                raise ValueError(
                    f"refusing to extract {Path(archive).name}: member "
                    f"{member.name!r} {problem}; nothing was extracted"
                )
        wanted = [m for m in members if m.isfile() and _WANTED_MEMBER.match(m.name)]
        # filter="data" (PEP 706) re-checks paths and drops modes/owners we do not want.
        tar.extractall(target, members=wanted, filter="data")


def _member_problem(member: tarfile.TarInfo, target: Path) -> str | None:
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "contains '..'"
    dest = (target / name).resolve()
    if not dest.is_relative_to(target):
        return f"would be written outside {target}"
    if member.issym() or member.islnk():
        base = dest.parent if member.issym() else target
        link = member.linkname
        if link.startswith("/") or not (base / link).resolve().is_relative_to(target):
            return f"is a link to {link!r}, outside {target}"
    elif not (member.isfile() or member.isdir()):
        return "is a device, FIFO or other special file"
    return None
