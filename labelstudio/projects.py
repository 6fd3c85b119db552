"""What the backend remembers per Label Studio project, under ``MODEL_DIR/projects/``.

One JSON file per project (``MODEL_DIR/projects/<id>.json``, mode 0600, written
atomically): the label config and the Label Studio hostname/access token that ``/setup``
sent (so uploaded images can be fetched after a restart and by every gunicorn worker), and
the last prompt an annotator typed (so the next task is pre-labeled with it: "next,
approve"). The token is stored, never logged.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nextchat_core.files import atomic_write

logger = logging.getLogger(__name__)

_PROJECT_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def project_key(project: Any) -> str | None:
    """The project id of a ``project`` field: ``"12.1700000000"`` (``<id>.<created ts>``,
    as /setup and /predict send it), ``12``, or ``{"id": 12}`` (webhooks) -> ``"12"``;
    ``None`` when absent. ``ValueError`` for anything else."""
    if project is None or project == "":
        return None
    if isinstance(project, dict):
        if project.get("id") is None:
            raise ValueError(
                "a 'project' object needs its 'id' (Label Studio sends {\"id\": 12, ...}), "
                f"got keys {sorted(project)[:5]}"
            )
        project = project["id"]
    if isinstance(project, bool) or not isinstance(project, int | str):
        raise ValueError(
            f"'project' must be the Label Studio project id like \"12.1700000000\", got "
            f"{type(project).__name__}"
        )
    key = str(project).split(".", 1)[0].strip()
    if not _PROJECT_ID.match(key):
        raise ValueError(
            f"'project' must be the Label Studio project id like \"12.1700000000\", got "
            f"{str(project)[:40]!r}"
        )
    return key


@dataclass
class ProjectState:
    """One project's memory. ``access_token`` is a secret: excluded from ``repr``."""

    project: str
    label_config: str | None = None
    hostname: str | None = None
    access_token: str | None = None
    last_prompt: str | None = None
    last_prompt_at: float | None = None

    def __repr__(self) -> str:
        token = "set" if self.access_token else "none"
        return (
            f"ProjectState(project={self.project!r}, hostname={self.hostname!r}, "
            f"access_token=<{token}>, last_prompt={self.last_prompt!r})"
        )


class ProjectStore:
    """Reads and writes :class:`ProjectState` files; safe across threads and processes
    (each write replaces the whole file atomically; last writer wins per field set)."""

    def __init__(self, model_dir: Path) -> None:
        self.root = Path(model_dir) / "projects"
        self._lock = threading.Lock()

    def get(self, project: str | None) -> ProjectState | None:
        if project is None:
            return None
        path = self.root / f"{project}.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("ignoring unreadable project state %s: %s", path, exc)
            return None
        fields = ProjectState.__dataclass_fields__
        return ProjectState(**{k: v for k, v in data.items() if k in fields})

    def update(self, project: str, **changes: Any) -> ProjectState:
        """Merge ``changes`` into the project's state and write it."""
        with self._lock:
            state = self.get(project) or ProjectState(project=project)
            for key, value in changes.items():
                if key not in ProjectState.__dataclass_fields__ or key == "project":
                    raise TypeError(f"unknown project state field {key!r}")
                setattr(state, key, value)
            self._write(state)
        return state

    def remember_prompt(self, project: str, prompt: str) -> None:
        self.update(project, last_prompt=prompt, last_prompt_at=time.time())

    def _write(self, state: ProjectState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{state.project}.json"
        # 0600: the file holds the Label Studio access token.
        with atomic_write(path, permissions=0o600) as f:
            json.dump(asdict(state), f)


def show_version_in_project(
    hostname: str, access_token: str, project: str, version: str, ours: set[str]
) -> str:
    """Make a Label Studio project show ``version``'s predictions: set the project's
    ``model_version`` (which the editor filters predictions by and the Data Manager's
    "Prediction score" column averages) to ``version``, through label-studio-sdk.

    Label Studio sets it to the ML backend's *title* when the backend is connected, which no
    prediction carries, so the column stays empty. It is changed only when it is empty,
    that title (the title of an ML backend of this project), or another version this
    backend served (``ours``): a version the team chose by hand is left alone. Returns what
    was done, for the log; ``RuntimeError`` when Label Studio cannot be asked.
    """
    import httpx
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    client = LabelStudio(base_url=hostname, api_key=access_token, timeout=10)
    try:
        pid = int(project)
        current = client.projects.get(id=pid).model_version or ""
        if current == version:
            return f"project {project} already shows {version}"
        titles = {b.title for b in client.ml.list(project=pid) if b.title}
        if current and current not in titles and current not in ours:
            return f"project {project} shows {current!r} (chosen in Label Studio): left alone"
        client.projects.update(id=pid, model_version=version)
    except ApiError as exc:
        if exc.status_code == 400 and "doesn't exist" in str(exc.body):
            # Label Studio accepts only a version it holds predictions of: the next call
            # after the first ones are stored does it.
            raise VersionNotInProject(
                f"project {project} holds no prediction of {version} yet"
            ) from None
        raise RuntimeError(
            f"cannot set project {project}'s model version: Label Studio answered "
            f"{exc.status_code}: {str(exc.body)[:200]}"
        ) from None
    except (httpx.HTTPError, ValueError) as exc:
        raise RuntimeError(f"cannot set project {project}'s model version: {exc}") from exc
    return f"project {project} now shows {version} (was {current or 'unset'!r})"


class VersionNotInProject(RuntimeError):
    """The project holds no prediction of the version yet (Label Studio refuses it)."""
