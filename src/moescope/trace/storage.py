"""Where traces and results live: a local folder or an object-store prefix, one interface over both (pyarrow.fs).

    location("runs/t1")                          -> a local folder (Path semantics, flock/rename/fsync in the writer)
    location("s3://bucket/runs/t1")              -> an S3 prefix (or any store pyarrow.fs opens: gs://, hdfs://, ...)
    location("file:///data/t1")                  -> the same folder as "/data/t1", but written the object-store way
                                                    (no flock, rename or fsync): a URL is always taken as a URL

S3 settings come, in this order of precedence, from `storage_options` (`--storage-option key=value`), an AWS
profile (`profile=NAME` or AWS_PROFILE: ~/.aws/credentials and ~/.aws/config, read here), the endpoint variables
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (pyarrow does not read them), and the AWS SDK's own chain (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, instance metadata). A Location pickles as (url, options), so
a Ray worker on another node opens the same store with the driver's options.
"""

from __future__ import annotations

import atexit
import configparser
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from moescope.errors import MoescopeError

# keys `--storage-option` takes for s3:// (besides pyarrow's S3FileSystem keywords below)
S3_OWN_KEYS = ("profile", "endpoint_url")
S3_KEYWORDS = ("access_key", "secret_key", "session_token", "region", "scheme", "endpoint_override", "role_arn",
               "session_name", "external_id", "anonymous", "connect_timeout", "request_timeout",
               "force_virtual_addressing", "allow_bucket_creation", "tls_ca_file_path")
_BOOLEANS = ("anonymous", "force_virtual_addressing", "allow_bucket_creation")
_FLOATS = ("connect_timeout", "request_timeout")

_defaults: dict[str, str] = {}  # set once per process by the CLI's --storage-option


def set_default_options(options: dict[str, str]) -> None:
    """Options every URL of this process is opened with unless a call passes its own (the CLI's --storage-option)."""
    _defaults.clear()
    _defaults.update(options)


def default_options() -> dict[str, str]:
    return dict(_defaults)


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """`["key=value", ...]` -> dict; one-line error for a pair without '=' or a key S3 does not take."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MoescopeError(f"--storage-option {pair!r}: give KEY=VALUE (e.g. endpoint_url=http://127.0.0.1:9000)")
        if key not in S3_OWN_KEYS + S3_KEYWORDS:
            raise MoescopeError(f"--storage-option {key}: unknown option; choose from {', '.join(S3_OWN_KEYS + S3_KEYWORDS)}")
        options[key] = value
    return options


def check_options(options: dict) -> dict[str, str]:
    """A `storage_options=` dict as the option strings `--storage-option` gives; one-line error for a key S3 does not
    take or a value that is not a plain string, number or bool."""
    if not isinstance(options, dict):
        raise MoescopeError(f"storage_options must be a dict of settings (e.g. {{'endpoint_url': 'http://...'}}), "
                            f"not {type(options).__name__}")
    checked = {}
    for key, value in options.items():
        if key not in S3_OWN_KEYS + S3_KEYWORDS:
            raise MoescopeError(f"storage_options[{key!r}]: unknown option; choose from {', '.join(S3_OWN_KEYS + S3_KEYWORDS)}")
        if not isinstance(value, (str, int, float, bool)):
            raise MoescopeError(f"storage_options[{key!r}]: give a string, number or bool, not {type(value).__name__}")
        checked[key] = str(value)
    return checked


def with_options(where, storage_options: dict | None):
    """`where` as it is, or — given `storage_options` (the settings of `--storage-option`, as a dict) — the URL as a
    Location opened with those options instead of the process's defaults. Options with a local path are an error.
    The Python API's `storage_options=` goes through here; everything below takes the Location as it takes a path."""
    if storage_options is None:
        return where
    if not is_url(where):
        raise MoescopeError(f"storage_options= is for object-store URLs (s3://bucket/prefix); {where} is a local path")
    return location(where.url if isinstance(where, Location) else where, check_options(storage_options))


def urls_with_options(wheres: tuple, storage_options: dict | None) -> tuple:
    """`wheres` (paths, URLs, or other objects such as a Trace) with each URL among them opened with
    `storage_options` (`with_options`); options given where no URL is are an error."""
    if storage_options is None:
        return tuple(wheres)
    if not any(is_url(where) for where in wheres):
        raise MoescopeError("storage_options= is for object-store URLs (s3://bucket/prefix); none was given")
    return tuple(with_options(where, storage_options) if is_url(where) else where for where in wheres)


def is_url(location) -> bool:
    """True for 'scheme://...'; a Path never is (Path('s3://b') collapses the '//')."""
    if isinstance(location, Location):
        return not location.local
    if not isinstance(location, str):
        return False
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.isalnum() and len(scheme) > 1


def location(where, options: dict[str, str] | None = None) -> "Location":
    """A Location for a path or URL (an existing Location is returned as it is)."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    opts = default_options() if options is None else dict(options)
    return Location(text.rstrip("/") if is_url(text) else text, tuple(sorted(opts.items())) if is_url(text) else ())


@dataclass(frozen=True)
class Location:
    """A trace or results folder: a local path, or a URL and the options to open its store with.

    `rel` paths are '/'-separated and relative to the folder ('routing/part-00000.parquet')."""

    url: str
    options: tuple[tuple[str, str], ...] = field(default=())

    @property
    def local(self) -> bool:
        return not is_url(self.url)

    @property
    def scheme(self) -> str:
        return self.url.partition("://")[0] if not self.local else ""

    @property
    def fs(self) -> pafs.FileSystem:
        return pafs.LocalFileSystem() if self.local else _filesystem(self.url.partition("://")[0], self.options)

    @property
    def root(self) -> str:
        """The folder as `fs` names it: an absolute local path, or 'bucket/prefix'."""
        if self.local:
            return str(Path(self.url).resolve())
        return self.url.partition("://")[2]

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]

    def key(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def __truediv__(self, rel: str) -> "Location":
        return Location(f"{self.url}/{rel}", self.options)

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:  # local only: lets a local Location stand where a path is expected
        if not self.local:
            raise TypeError(f"{self.url} is not a local path")
        return self.url

    def resolve(self) -> "Location":
        return Location(str(Path(self.url).resolve()), self.options) if self.local else self

    # -- objects ------------------------------------------------------------------------------------
    def size(self, rel: str) -> int | None:
        """Bytes of the file/object `rel`, or None when there is none."""
        info = self._call(self.fs.get_file_info, self.key(rel))
        return info.size if info.type == pafs.FileType.File else None

    def exists(self, rel: str = "") -> bool:
        return self._call(self.fs.get_file_info, self.key(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self._call(self.fs.open_input_stream, self.key(rel)) as f:
            return f.read()

    def read_json(self, rel: str, *, attempts: int = 10):
        """A JSON object that writers replace whole (manifest, lease). pyarrow reads an object as a HEAD for its size
        and then a GET of that many bytes, so a reader racing a replacement can get the new object cut at the old
        size: a torn text that does not parse (the objects are single JSON objects), so it is read again."""
        for attempt in range(attempts):
            data = self.read_bytes(rel)
            try:
                return json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if attempt + 1 == attempts:
                    raise
                time.sleep(0.01 * (attempt + 1))  # 18 % of reads tore under back-to-back rewrites on moto

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One PUT: an object store shows the old object or the whole new one, never a part (local: not atomic;
        the local writer keeps its own temp + rename + fsync)."""
        if self.scheme not in ("s3", "gs"):  # a filesystem with real folders (file://, hdfs://): make the parent
            self._call(self.fs.create_dir, self.key(rel).rsplit("/", 1)[0], recursive=True)
        with self._call(self.fs.open_output_stream, self.key(rel)) as f:
            f.write(data)

    def delete(self, rel: str, *, missing_ok: bool = False) -> bool:
        """Remove `rel`; False when it was not there (and `missing_ok`)."""
        try:
            self._call(self.fs.delete_file, self.key(rel))
        except FileNotFoundError:
            if not missing_ok:
                raise
            return False
        return True

    def list(self, rel: str = "") -> dict[str, int]:
        """{relative path: size} of every file under `rel` (recursive; empty when there is nothing)."""
        base = self.key(rel)
        infos = self._call(self.fs.get_file_info, pafs.FileSelector(base, recursive=True, allow_not_found=True))
        start = len(self.root) + 1
        return {info.path[start:]: info.size for info in infos if info.type == pafs.FileType.File}

    def bucket_exists(self) -> bool:
        if self.scheme != "s3":
            return True
        return self._call(self.fs.get_file_info, self.bucket).type == pafs.FileType.Directory

    def upload(self, rel: str, path: Path) -> None:
        """The local file `path` as the object `rel`, streamed in one upload (it appears whole or not at all)."""
        if self.scheme not in ("s3", "gs"):
            self._call(self.fs.create_dir, self.key(rel).rsplit("/", 1)[0], recursive=True)
        with open(path, "rb") as src, self._call(self.fs.open_output_stream, self.key(rel)) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)

    def download_to(self, rel: str, path: Path) -> None:
        """The object `rel` into the local file `path`, streamed."""
        with self._call(self.fs.open_input_stream, self.key(rel)) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)

    def open_input(self, rel: str):
        """A random-access file for Parquet readers."""
        return self._call(self.fs.open_input_file, self.key(rel))

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (OSError, pa.ArrowException) as err:
            if isinstance(err, FileNotFoundError):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MoescopeError(f"{self.url}: storage error: {first}") from None


def exists(where, rel: str = "") -> bool:
    """Whether there is a file or folder `rel` under `where` (a path, a URL or a Location; `rel` "": `where` itself)."""
    return location(where).exists(rel) if is_url(where) else (Path(where) / rel).exists()


_DOWNLOADED: dict[Path, str] = {}  # local copy -> the URL it was downloaded from


def source_of(path) -> str:
    """Where a folder came from: the URL of a `download`ed copy, else the path itself (for what a report shows)."""
    return str(path) if path is None else _DOWNLOADED.get(Path(path), str(path))  # None: results held in memory


def _temporary(remote: Location) -> Path:
    """A path named like the URL's last part in a new temporary folder, removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix="moescope-fetched-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / remote.url.rsplit("/", 1)[-1]
    _DOWNLOADED[path] = remote.url
    return path


def download(where) -> Path:
    """A folder to read: a local path as it is; an object-store prefix (a results folder: small) copied into a
    temporary folder named like the prefix's last part, removed when the process exits (a prefix holding nothing:
    a path that does not exist, as a local folder that is not there)."""
    if not is_url(where):
        return Path(where)
    remote = location(where)
    folder = _temporary(remote)
    listing = remote.list()
    if listing:
        folder.mkdir()
    for rel in listing:
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        remote.download_to(rel, target)
    return folder


def fetch(where) -> Path:
    """An input file or folder to read (what `import` reads): a local path as it is; an object, or a prefix of them,
    copied into a temporary file or folder of the same name (removed when the process exits). A URL with nothing
    there is a one-line error."""
    if not is_url(where):
        return Path(where)
    remote = location(where)
    if remote.size("") is None:
        if not remote.bucket_exists():
            raise MoescopeError(f"{remote.url}: no such bucket (or no access to it); check the URL and the storage options")
        if not remote.list():
            raise MoescopeError(f"{remote.url}: no such object or prefix")
        return download(remote)
    path = _temporary(remote)
    remote.download_to("", path)
    return path


def write_through_local(dest, write):
    """`write(path)` (which writes one file) for `dest`: called with `dest` itself when it is a local path; for a URL
    with a temporary local file of the same name, uploaded in one piece once `write` returns (an object store shows
    the old object or the new one, never a part). Returns what `write` returns."""
    if not is_url(dest):
        return write(Path(dest))
    remote = location(dest)
    if not remote.bucket_exists():
        raise MoescopeError(f"--out {remote.url}: no such bucket (or no access to it); create it or check the storage options")
    if remote.size("") is None and remote.list():
        raise MoescopeError(f"--out {remote.url} is a prefix holding objects; give the name of an object to write")
    folder = Path(tempfile.mkdtemp(prefix="moescope-upload-"))
    try:
        path = folder / remote.url.rsplit("/", 1)[-1]
        result = write(path)
        remote.upload("", path)
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- S3 --------------------------------------------------------------------------------------------------
def _profile_settings(profile: str) -> dict[str, str]:
    """aws_access_key_id/... of `profile` from the shared credentials and config files."""
    settings: dict[str, str] = {}
    home = Path.home() / ".aws"
    sources = ((os.environ.get("AWS_CONFIG_FILE") or home / "config", f"profile {profile}" if profile != "default" else "default"),
               (os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / "credentials", profile))
    found = False
    for path, section in sources:
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except configparser.Error as err:
            raise MoescopeError(f"{path}: unreadable AWS file ({err.__class__.__name__})") from None
        if parser.has_section(section):
            found = True
            settings.update(parser.items(section))
    if not found:
        raise MoescopeError(f"AWS profile {profile!r} is in neither ~/.aws/config nor ~/.aws/credentials")
    return settings


def _endpoint(url: str) -> dict[str, str]:
    parsed = urlparse(url if "://" in url else f"https://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise MoescopeError(f"S3 endpoint {url!r}: give http(s)://HOST[:PORT]")
    return {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}


def s3_keywords(options: dict[str, str]) -> dict:
    """pyarrow S3FileSystem keywords from options, a profile and the endpoint variables (options first)."""
    options = dict(options)
    unknown = set(options) - set(S3_OWN_KEYS + S3_KEYWORDS)
    if unknown:
        raise MoescopeError(f"storage option {sorted(unknown)[0]}: unknown; choose from {', '.join(S3_OWN_KEYS + S3_KEYWORDS)}")
    kwargs: dict = {}
    profile = options.pop("profile", None) or os.environ.get("AWS_PROFILE")
    profile_endpoint = None
    if profile:
        settings = _profile_settings(profile)
        for ours, theirs in (("access_key", "aws_access_key_id"), ("secret_key", "aws_secret_access_key"),
                             ("session_token", "aws_session_token"), ("region", "region")):
            if settings.get(theirs):
                kwargs[ours] = settings[theirs]
        profile_endpoint = settings.get("endpoint_url")
    endpoint = (options.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or profile_endpoint)
    if endpoint:
        kwargs.update(_endpoint(endpoint))
        kwargs.setdefault("region", os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    for key, value in options.items():
        if key in _BOOLEANS:
            kwargs[key] = str(value).lower() in ("1", "true", "yes")
        elif key in _FLOATS:
            kwargs[key] = float(value)
        else:
            kwargs[key] = value
    return kwargs


def _filesystem(scheme: str, options: tuple[tuple[str, str], ...]) -> pafs.FileSystem:
    """One filesystem object per (scheme, settings) in a process (they hold connection pools); the settings include
    what the environment and profile give, so a changed AWS_ENDPOINT_URL opens a new one."""
    try:
        if scheme == "s3":
            return _s3(tuple(sorted(s3_keywords(dict(options)).items())))
        if scheme == "file" and not options:
            return pafs.LocalFileSystem()
        if options:
            raise MoescopeError(f"--storage-option is for s3:// URLs; {scheme}:// takes its options in the URL")
        return pafs.FileSystem.from_uri(f"{scheme}://")[0]
    except (OSError, pa.ArrowException, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoescopeError(f"cannot open {scheme}:// storage: {first}") from None


@lru_cache(maxsize=16)
def _s3(kwargs: tuple[tuple[str, object], ...]) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(**dict(kwargs))
