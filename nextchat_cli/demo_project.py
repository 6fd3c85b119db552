"""``nextchat demo-project``: a working Label Studio try-out of the bundled model in one
command.

It creates a project whose labels are the bundled model's domain (the shapes of
``training.synth``, each with the domain's multi-instance prompt as its ``hint``), uploads
demo scenes as files (Label Studio serves uploads itself, so the browser shows them without
any CORS setup), connects this backend with interactive pre-annotation on, and prints the
project's URL.
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

from nextchat_cli.options import add_label_studio_options

# Label colours: one per shape, in the order of training.synth.SHAPES.
_PALETTE = ("#FF6B6B", "#4D96FF", "#6BCB77", "#FFD93D", "#B983FF", "#FF9F45", "#20C997")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo-project",
        help="create a Label Studio project to try the bundled model in (scenes uploaded)",
        description=(
            "Create a Label Studio project for the bundled model's domain: boxes and masks "
            "labelled with the demo's shapes, N demo scenes uploaded, this backend connected "
            "with interactive pre-annotation on. Prints the project URL."
        ),
    )
    add_label_studio_options(p)
    p.add_argument(
        "--backend-url",
        default="http://localhost:9090",
        help="this backend as Label Studio reaches it (default: %(default)s, `make serve`)",
    )
    p.add_argument("--scenes", type=int, default=20, help="demo scenes to upload (default 20)")
    p.add_argument("--seed", type=int, default=20261201, help="scene generator seed")
    p.add_argument("--title", default="nextchat demo: shapes", help="project title")
    p.set_defaults(func=_run)


def demo_label_config() -> str:
    """The label config of the demo project: the boxes-and-masks layout of
    ``label_configs/boxes_masks.xml`` with one label per shape of the demo domain, whose
    ``hint`` is the domain's prompt for every shape of that kind ("all circles")."""
    from training import synth

    def labels() -> str:
        return "\n".join(
            f"    <Label value={quoteattr(shape)} hint={quoteattr('all ' + synth.plural(shape))}"
            f" background={quoteattr(_PALETTE[i % len(_PALETTE)])}/>"
            for i, shape in enumerate(synth.SHAPES)
        )

    colors = ", ".join(synth.COLORS)
    return f"""<View>
  <Header value="Find: type what to look for, e.g. the red circle (Auto-Annotation on)" size="6"/>
  <TextArea name="prompt" toName="image" placeholder="e.g. the red circle, all stars"
            editable="true" rows="1" showSubmitButton="true"/>
  <Image name="image" value="$image" zoom="true"/>
  <Header value="Boxes (rectangle tool). Colors the model knows: {colors}" size="6"/>
  <RectangleLabels name="label" toName="image">
{labels()}
  </RectangleLabels>
  <Header value="Masks (brush tool)" size="6"/>
  <BrushLabels name="mask" toName="image">
{labels()}
  </BrushLabels>
</View>"""


@dataclass
class DemoProject:
    project_id: int
    url: str  # the project's data manager page
    tasks: int
    ml_backend_id: int


def create_demo_project(
    url: str,
    api_key: str,
    *,
    backend_url: str,
    scenes: int = 20,
    seed: int = 20261201,
    title: str = "nextchat demo: shapes",
) -> DemoProject:
    """Create the project, upload ``scenes`` rendered demo scenes, connect the backend.
    ``RuntimeError`` with Label Studio's answer when a step fails."""
    import requests
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError
    from PIL import Image

    from training import synth

    if scenes < 1:
        raise ValueError(f"--scenes must be at least 1, got {scenes}")
    base = url.rstrip("/")
    client = LabelStudio(base_url=base, api_key=api_key)
    try:
        project = client.projects.create(title=title, label_config=demo_label_config())
    except ApiError as exc:
        raise RuntimeError(
            f"Label Studio at {base} refused to create the project ({exc.status_code}: "
            f"{str(exc.body)[:200]}); check the API key"
        ) from exc
    assert project.id is not None
    files = []
    config = synth.SynthConfig()
    for i in range(scenes):
        scene = synth.render_scene(synth.scene_rng(seed, i), config, scene_id=i)
        buf = io.BytesIO()
        Image.fromarray(scene.image).save(buf, format="PNG")
        # one form field per file: Label Studio reads one file per field name
        files.append((f"file{i}", (f"scene-{i:04d}.png", buf.getvalue(), "image/png")))
    # File upload is not in label-studio-sdk's typed client: the import route takes
    # multipart files as the web UI sends them (each file becomes a task with an upload).
    reply = requests.post(
        f"{base}/api/projects/{project.id}/import",
        files=files,
        headers={"Authorization": f"Token {api_key}"},
        timeout=120,
    )
    if reply.status_code >= 300:
        raise RuntimeError(
            f"Label Studio refused the scene upload ({reply.status_code}: {reply.text[:200]})"
        )
    imported = int(reply.json().get("task_count", 0))
    try:
        ml = client.ml.create(
            url=backend_url, project=project.id, title="nextchat", is_interactive=True
        )
    except ApiError as exc:
        raise RuntimeError(
            f"Label Studio could not connect the backend at {backend_url} ({exc.status_code}: "
            f"{str(exc.body)[:300]}). Is it running (`make serve`) and reachable from Label "
            "Studio? The project was created; connect it under Settings -> Model."
        ) from exc
    ml_id: Any = getattr(ml, "id", None)
    return DemoProject(
        project_id=project.id,
        url=f"{base}/projects/{project.id}/data",
        tasks=imported,
        ml_backend_id=int(ml_id) if ml_id is not None else -1,
    )


def _run(args: argparse.Namespace) -> int:
    if not args.url or not args.api_key:
        raise ValueError(
            "a demo project needs the Label Studio URL and API key: set LABEL_STUDIO_URL and "
            "LABEL_STUDIO_API_KEY (or pass --url / --api-key)"
        )
    made = create_demo_project(
        args.url,
        args.api_key,
        backend_url=args.backend_url,
        scenes=args.scenes,
        seed=args.seed,
        title=args.title,
    )
    print(f"created project {made.project_id} with {made.tasks} demo scenes: {made.url}")
    print(
        "open a task, turn on Auto-Annotation, type e.g. 'the red circle' and press Enter; "
        "or select tasks and run 'Retrieve predictions'"
    )
    return 0
