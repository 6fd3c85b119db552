"""Fetch and decode the images of a batch of tasks, concurrently and task by task.

References a task's ``<Image value="$key">`` may hold, and how each is read:

* ``http(s)://...`` - downloaded (Label Studio auth only when the host is Label Studio's);
* ``/data/upload/...``, ``/data/local-files/?d=...``, ``s3://`` / ``gs://`` /
  ``azure-blob://`` - through ``label_studio_sdk``'s ``get_local_path`` with the hostname
  and access token that ``/setup`` sent (else ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY``);
  cloud URIs are presigned by Label Studio with the task id;
* a local path or ``file://`` URL - only under ``LOCAL_FILES_DOCUMENT_ROOT`` (a task must
  not make the backend read arbitrary files);
* ``data:image/...;base64,...`` - decoded in place.

Each image is decoded by ``nextchat_core.image_processing.load_image`` (EXIF transpose,
16-bit / CMYK / palette to RGB, decompression-bomb guard), so sizes are the
EXIF-transposed original pixels Label Studio shows. One task's failure (404, 401,
timeout, corrupt file, no image) becomes that task's :class:`TaskError`; the others are
unaffected.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import requests
import requests.auth
import urllib3
from PIL import Image

from nextchat_core.image_processing import load_image

from .config import LabelConfig
from .results import LabelStudioFormatError, image_reference

logger = logging.getLogger(__name__)

_CLOUD = ("s3", "gs", "azure-blob")
# Never fetched by default: link-local addresses (cloud metadata services answer at
# 169.254.169.254 and fd00:ec2::254, Alibaba's at 100.100.100.200) and "this network".
DEFAULT_DENY_NETWORKS: tuple[str, ...] = (
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
    "0.0.0.0/8",
)
MAX_REDIRECTS = 5


@dataclass
class FetchedImage:
    """A task's image as 8-bit RGB, EXIF-transposed; ``width``/``height`` in original
    pixels (the frame of every result built for the task)."""

    image: Image.Image
    ref: str

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


@dataclass
class TaskError:
    """Why a task cannot be predicted. ``kind``: ``"no_image"`` (the task has no image
    reference), ``"fetch"`` (download failed: 401, 404, timeout, refused path),
    ``"decode"`` (corrupt, truncated, oversized, not an image) or, set by the model,
    ``"prompt"`` (empty, too long, too many tokens)."""

    kind: str
    detail: str


@dataclass(frozen=True)
class FetchOptions:
    """Where and how to fetch. ``access_token`` is a secret: never logged, not in repr."""

    hostname: str | None = None
    access_token: str | None = None
    timeout: float = 20.0
    max_bytes: int = 200 * 2**20
    workers: int = 8
    local_files_root: Path | None = None
    # The project's "task data login/password" (Label Studio sends them as params.login /
    # params.password): HTTP basic auth for image hosts other than Label Studio itself.
    task_data_login: str | None = None
    task_data_password: str | None = None
    # Where images may be fetched from (FETCH_DENY_NETWORKS / FETCH_ALLOW_NETWORKS): an
    # address in ``deny_networks`` is refused, and with ``allow_networks`` set only those
    # are allowed; checked for every redirect hop, before connecting.
    deny_networks: tuple[str, ...] = field(default_factory=lambda: DEFAULT_DENY_NETWORKS)
    allow_networks: tuple[str, ...] = ()

    def __repr__(self) -> str:
        token = "set" if self.access_token else "none"
        return f"FetchOptions(hostname={self.hostname!r}, access_token=<{token}>, timeout={self.timeout})"


def local_files_root_from_env(env: Mapping[str, str] | None = None) -> Path | None:
    """The folder Label Studio serves ``/data/local-files/?d=...`` from:
    ``LOCAL_FILES_DOCUMENT_ROOT`` (Label Studio's own variable; its
    ``LABEL_STUDIO_``-prefixed spelling is read too), or ``None``."""
    env = os.environ if env is None else env
    for key in ("LOCAL_FILES_DOCUMENT_ROOT", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"):
        value = (env.get(key) or "").strip()
        if value:
            return Path(value)
    return None


def image_file_name(ref: str) -> str:
    """COCO ``file_name`` for a Label Studio image reference: the ``d`` path of a
    ``/data/local-files/?d=...`` URL, the last path component of a URL or upload, a plain
    path as given."""
    parsed = urlparse(ref)
    if "local-files" in parsed.path and "d" in parse_qs(parsed.query):
        return unquote(parse_qs(parsed.query)["d"][0])
    if parsed.scheme in ("", "file") and not ref.startswith("/data/"):
        return unquote(parsed.path) if parsed.scheme == "file" else ref
    return unquote(Path(parsed.path).name)


def resolve_local_image(ref: str, image_root: str | os.PathLike[str] | None = None) -> Path | None:
    """A readable local file for an image reference, or ``None``.

    The offline tools' rule (COCO export, training on an export), where the user names
    the files: tries, in order, the reference as a path (``file://`` URLs too); for
    ``/data/local-files/?d=rel`` the ``rel`` path under ``image_root`` or under the
    local-files root (:func:`local_files_root_from_env`); ``image_root / file_name`` and
    ``image_root / basename``. The servers' rule (:func:`fetch_images`) is stricter: a
    local path only under ``FetchOptions.local_files_root``.
    """
    candidates: list[Path] = []
    parsed = urlparse(ref)
    if parsed.scheme == "file":
        candidates.append(Path(unquote(parsed.path)))
    elif parsed.scheme == "" and not ref.startswith("/data/"):
        candidates.append(Path(ref))
    name = image_file_name(ref)
    roots = [Path(image_root)] if image_root is not None else []
    doc_root = local_files_root_from_env()
    if doc_root is not None and "local-files" in parsed.path:
        roots.append(doc_root)
    for root in roots:
        candidates += [root / name, root / Path(name).name]
    return next((c for c in candidates if c.is_file()), None)


def read_image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` of an image file after EXIF orientation (what Label Studio and
    ``PIL.ImageOps.exif_transpose`` show): orientations 5-8 swap the stored sides. Reads
    only the header. Raises ``ValueError`` for a file PIL cannot read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image size from {path}: {exc}") from exc
    if orientation in (5, 6, 7, 8):  # transposed / rotated by 90 or 270 degrees
        width, height = height, width
    return width, height


def fetch_images(
    tasks: Sequence[dict[str, Any]], config: LabelConfig, options: FetchOptions
) -> list[FetchedImage | TaskError]:
    """The image of every task, in task order: a :class:`FetchedImage` or, for a task whose
    image cannot be used, an :class:`TaskError` (logged with the task id). Each distinct
    reference is fetched and decoded once, whatever the number of tasks sharing it."""
    out: list[FetchedImage | TaskError | None] = [None] * len(tasks)
    groups: dict[str, list[int]] = {}
    refs: dict[str, str] = {}
    for i, task in enumerate(tasks):
        try:
            ref = image_reference(task, config)
        except LabelStudioFormatError as exc:
            out[i] = _failed(task.get("id"), "no_image", exc.detail)
            continue
        # Cloud URIs are presigned per task; anything else is the same image for all.
        key = f"{ref}#{task.get('id')}" if urlparse(ref).scheme in _CLOUD else ref
        groups.setdefault(key, []).append(i)
        refs[key] = ref
    if not groups:
        return out  # type: ignore[return-value]
    with tempfile.TemporaryDirectory(prefix="nextchat-fetch-") as cache_dir:

        def one(n: int, key: str) -> FetchedImage | tuple[str, str]:
            # Per-reference isolation: a failure to fetch or decode this image becomes an
            # error for the tasks that use it (logged with each task id below); the other
            # references go on. Each reference downloads into its own folder, so two
            # downloads never share a cache file.
            ref = refs[key]
            task_id = tasks[groups[key][0]].get("id")
            folder = os.path.join(cache_dir, str(n))
            os.makedirs(folder)
            try:
                source = _fetch(ref, task_id, options, folder)
            except (OSError, ValueError, requests.RequestException) as exc:
                return "fetch", f"cannot fetch image {_short(ref)}: {_why(exc)}"
            try:
                return FetchedImage(image=load_image(source), ref=ref)
            except (ValueError, TypeError, OSError) as exc:
                return "decode", f"image {_short(ref)}: {exc}"

        keys = list(groups)
        if len(keys) == 1:
            fetched = [one(0, keys[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(options.workers, len(keys))) as pool:
                fetched = list(pool.map(one, range(len(keys)), keys))
    for key, got in zip(keys, fetched, strict=True):
        for i in groups[key]:
            out[i] = got if isinstance(got, FetchedImage) else _failed(tasks[i].get("id"), *got)
    return out  # type: ignore[return-value]


def fetch_image_file(ref: str, task_id: Any, options: FetchOptions, dest_dir: str | Path) -> Path:
    """The image ``ref`` of task ``task_id`` as a local file (downloaded into ``dest_dir``
    when it is not one already): the retraining worker's image resolver, with the same
    rules and safeguards as a ``/predict`` fetch. Raises ``OSError``/``ValueError``/
    ``requests.RequestException`` naming the reference when it cannot be fetched."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        source = _fetch(ref, task_id, options, str(dest))
    except (OSError, ValueError, requests.RequestException) as exc:
        raise FileNotFoundError(
            f"task {task_id}: cannot fetch image {_short(ref)}: {_why(exc)}"
        ) from exc
    if isinstance(source, bytes):
        path = dest / f"task-{task_id}-inline.img"
        path.write_bytes(source)
        return path
    return Path(source)


def _failed(task_id: Any, kind: str, detail: str) -> TaskError:
    logger.error("task %s: %s", task_id, detail)
    return TaskError(kind=kind, detail=detail)


def _fetch(ref: str, task_id: Any, options: FetchOptions, cache_dir: str) -> str | bytes:
    """A local file path or the raw bytes of the image ``ref``."""
    if ref.startswith("data:"):
        return _data_uri(ref)
    parsed = urlparse(ref)
    if parsed.scheme == "file" or (
        parsed.scheme == ""
        and not ref.startswith("/data/")
        and not ref.startswith(("upload/", "/upload/", "storage-data/", "/storage-data/"))
    ):
        return str(_local_file(unquote(parsed.path) if parsed.scheme == "file" else ref, options))
    if parsed.scheme not in ("", "http", "https", "s3", "gs", "azure-blob"):
        raise ValueError(
            f"unsupported image reference scheme {parsed.scheme!r}: expected http(s), "
            "a Label Studio upload or local-files URL, s3/gs/azure-blob, file or data:"
        )
    if parsed.scheme in _CLOUD and task_id is None:
        raise ValueError(
            "a cloud storage image needs the task's id (Label Studio presigns it per task)"
        )
    if ref.startswith("/data/") and "?d=" in ref and options.local_files_root is not None:
        # Label Studio Local Storage with the shared folder mounted here: read it from disk
        # by the same rule as a plain local path (symlinks resolved, never outside the
        # root); a file that rule refuses is never fetched some other way.
        relative = parse_qs(parsed.query).get("d", [""])[-1]
        return str(_local_file(relative.lstrip("/"), options))
    from label_studio_sdk._extensions.label_studio_tools.core.utils.io import (
        get_local_path,
        http_session,
        local_files_resolver,
    )

    # The SDK reads the session (and the local-files resolver) from context variables,
    # which are per thread: set them here, in the worker thread that downloads.
    resolver = (
        (lambda rel: str(_local_file(rel.lstrip("/"), options)))
        if options.local_files_root is not None
        else None
    )
    with http_session(_session(options)), local_files_resolver(resolver):
        # Label Studio's address and token go only with references served by Label Studio
        # (relative URLs, cloud URIs, its own host); other hosts never see the token.
        to_label_studio = parsed.scheme not in ("http", "https") or (
            options.hostname is not None and parsed.netloc == urlparse(options.hostname).netloc
        )
        return get_local_path(
            ref,
            cache_dir=cache_dir,
            hostname=(options.hostname or "") if to_label_studio else "",
            access_token=(options.access_token or "") if to_label_studio else "",
            task_id=task_id,
        )


def _local_file(path: str, options: FetchOptions) -> Path:
    root = options.local_files_root
    if root is None:
        raise ValueError(
            "local image paths are refused unless LOCAL_FILES_DOCUMENT_ROOT is set to the "
            "folder that holds them (use an http(s) URL or a Label Studio upload instead)"
        )
    resolved = (root / path).resolve() if not os.path.isabs(path) else Path(path).resolve()
    if not resolved.is_relative_to(root.resolve()):  # also a symlink that points out
        raise ValueError("local path is outside LOCAL_FILES_DOCUMENT_ROOT")
    if not resolved.is_file():
        raise FileNotFoundError(f"no such file under LOCAL_FILES_DOCUMENT_ROOT: {path}")
    return resolved


class FetchRefused(ValueError):
    """A destination the fetch rules do not allow (``FETCH_DENY_NETWORKS`` /
    ``FETCH_ALLOW_NETWORKS``); said before any connection is made."""


class _LimitedSession(requests.Session):
    """Every image download (ours and the SDK's, through ``http_session``) goes through
    this: one deadline for the whole download (``timeout``: connect, redirects and body
    together; requests' own timeout is per socket read, so a host that drips a byte a
    second would hold a thread forever), the body read in pieces and abandoned at
    ``max_bytes`` whatever Content-Length says (or omits: chunked replies), redirects
    followed here so that each hop's address is checked (:meth:`_check_destination`) and
    credentials never follow a redirect to another host. requests offers none of these
    as options, hence the subclass."""

    def __init__(self, options: FetchOptions) -> None:
        super().__init__()
        self._timeout = options.timeout
        self._max_bytes = options.max_bytes
        self._deny = [ipaddress.ip_network(n, strict=False) for n in options.deny_networks]
        self._allow = [ipaddress.ip_network(n, strict=False) for n in options.allow_networks]

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        deadline = time.monotonic() + self._timeout
        method = method.decode() if isinstance(method, bytes) else method
        url = url.decode() if isinstance(url, bytes) else url
        for name in ("timeout", "allow_redirects", "stream"):
            kwargs.pop(name, None)
        headers = dict(kwargs.pop("headers", None) or {})
        origin = urlparse(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            self._check_destination(url)
            remaining = self._remaining(deadline)
            try:
                response = super().request(  # type: ignore[misc]  # the popped keywords
                    method,
                    url,
                    *args,
                    headers=headers,
                    timeout=(remaining, remaining),
                    allow_redirects=False,
                    stream=True,
                    **kwargs,
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                # Refused, reset, silent or not HTTP: one message for all, so a task's
                # author cannot map which ports of the backend's network are open.
                raise requests.ConnectionError(
                    f"no HTTP response from {urlparse(url).hostname} within {self._timeout:g} s"
                ) from exc
            if not response.is_redirect:
                self._read_body(response, deadline)
                return response
            target = requests.compat.urljoin(response.url, response.headers["location"])
            response.close()
            url, method = target, "GET" if response.status_code in (301, 302, 303) else method
            if urlparse(url).netloc != origin:
                # Another host: Label Studio's token and task-data logins stay behind.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                kwargs["auth"] = _NO_AUTH
        raise requests.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects")

    def _remaining(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise requests.Timeout(f"timed out after {self._timeout:g} s")
        return remaining

    def _check_destination(self, url: str) -> None:
        parsed = urlparse(url)
        host = parsed.hostname
        if parsed.scheme not in ("http", "https") or not host:
            raise FetchRefused(f"only http(s) URLs can be fetched, got {_short(url)}")
        try:
            infos = socket.getaddrinfo(host, parsed.port or 443, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as exc:
            raise requests.ConnectionError(f"cannot resolve host {host}") from exc
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:169.254.x.x is IPv4
            if mapped is not None:
                address = mapped
            if any(address in net for net in self._deny) or (
                self._allow and not any(address in net for net in self._allow)
            ):
                raise FetchRefused(
                    f"image host {host} is not an allowed destination (refused by "
                    "FETCH_DENY_NETWORKS / FETCH_ALLOW_NETWORKS)"
                )

    def _read_body(self, response: requests.Response, deadline: float) -> None:
        """Read the body into ``response.content``, within the deadline and size limit."""
        raw = response.raw
        data = bytearray()
        sock = getattr(getattr(raw, "connection", None), "sock", None)
        try:
            while True:
                remaining = self._remaining(deadline)
                if sock is not None:
                    sock.settimeout(remaining)  # no single read outlasts the deadline
                chunk = raw.read1(65536, decode_content=True)
                if not chunk:
                    break
                data += chunk
                if len(data) > self._max_bytes:
                    raise ValueError(
                        f"image is larger than MAX_DOWNLOAD_MB ({self._max_bytes / 2**20:.1f} "
                        "MiB); stopped reading at the limit"
                    )
        except requests.RequestException:
            raise  # our own deadline (requests' errors are OSErrors too)
        except (TimeoutError, urllib3.exceptions.TimeoutError) as exc:
            raise requests.Timeout(f"timed out after {self._timeout:g} s") from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            raise requests.ConnectionError(f"the connection broke off: {exc}") from exc
        finally:
            if len(data) > self._max_bytes or time.monotonic() >= deadline:
                response.close()
        # requests keeps a read body in ``_content``; filling it lets every caller (the
        # SDK uses ``response.content``) read what was already downloaded here.
        response._content = bytes(data)
        response._content_consumed = True


def _no_auth(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request


_NO_AUTH = _no_auth


class _TaskDataAuth(requests.auth.AuthBase):
    """Basic auth for task-data hosts; requests to Label Studio keep the SDK's token."""

    def __init__(self, login: str, password: str, ls_hostname: str | None) -> None:
        self._basic = requests.auth.HTTPBasicAuth(login, password)
        self._ls_netloc = urlparse(ls_hostname).netloc if ls_hostname else None

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if (
            "Authorization" in request.headers
            or urlparse(request.url or "").netloc == self._ls_netloc
        ):
            return request
        return self._basic(request)


def _session(options: FetchOptions) -> requests.Session:
    session = _LimitedSession(options)
    if options.task_data_login and options.task_data_password:
        session.auth = _TaskDataAuth(
            options.task_data_login, options.task_data_password, options.hostname
        )
    return session


def _data_uri(ref: str) -> bytes:
    header, _, payload = ref.partition(",")
    if not header.startswith("data:image/") or ";base64" not in header:
        raise ValueError("a data: URI image must be 'data:image/<type>;base64,<data>'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"data: URI is not valid base64: {exc}") from exc


def _why(exc: BaseException) -> str:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        hint = {
            401: " (unauthorized: check the Label Studio access token / LABEL_STUDIO_API_KEY)",
            403: " (forbidden: check the token's permissions)",
            404: " (not found: check the task's image URL)",
        }.get(code, "")
        if code >= 500:
            hint = " (the image host failed: a server error on its side; retry later or check that host)"
        return f"HTTP {code}{hint}"
    if isinstance(exc, requests.Timeout):
        return f"{exc} (FETCH_TIMEOUT is the deadline for each image; raise it for slow storage)"
    if isinstance(exc, requests.ConnectionError):
        return f"{exc} (is the host reachable from the backend?)"
    # The SDK's messages and ours carry no secrets (tokens travel in headers only).
    return str(exc)


def _short(ref: str, limit: int = 120) -> str:
    if ref.startswith("data:"):
        return ref[:30] + "..."
    # Drop query strings (presigned URLs carry credentials there) and user:password@.
    base = ref.split("?", 1)[0] if "?d=" not in ref else ref
    parsed = urlparse(base)
    if parsed.password is not None or parsed.username is not None:
        base = parsed._replace(netloc="***@" + parsed.netloc.rsplit("@", 1)[-1]).geturl()
    return base if len(base) <= limit else base[: limit - 3] + "..."
