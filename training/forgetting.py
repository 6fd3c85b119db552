"""What a retraining job does against forgetting, on the synthetic base domain.

The bundled demo model was trained on :mod:`training.synth` scenes (the original
vocabulary: :data:`synth.SHAPES`, :data:`synth.COLORS`). Retraining it on a project's
corrections alone can overwrite what it knew; two measures, both built from that domain:

* **replay** (``RETRAIN_REPLAY``): base-domain samples mixed into the training data, a
  fixed buffer of ``round(replay * corrections)`` scenes - what the model already knows,
  rehearsed while it learns the new (the standard remedy, e.g. experience replay in
  continual learning);
* the **regression slice** (``RETRAIN_REGRESSION``): a fixed set of base-domain records
  the served and the new version are both scored on; the gate refuses a version that
  loses more than ``PROMOTE_FORGETTING_TOLERANCE`` there, whatever it gains on the
  project's held-out corrections.

Both are rendered in memory, deterministically from their own seeds (never the demo
recipe's training or evaluation seeds, nor each other's), with the renderer of the demo's
held-out split (``SynthConfig()``) and its task mix (3:1 single : multi-instance). They
fit a checkpoint trained on this domain (the bundled one); for another checkpoint, leave
them off (the default) or point replay at that model's own data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import synth
from .data import Record, SampleSet

if TYPE_CHECKING:
    from nextchat_core.config import NextChatConfig

REPLAY_SEED = 20261221  # the replay buffer's scenes
REGRESSION_SEED = 20261222  # the regression slice's scenes
# The demo's held-out split mix (training.demo.eval_split): referring expressions 3 : 1
# single- to multi-instance, one record per scene.
BASE_DOMAIN = synth.SynthConfig(
    task_mix={"rec": 0.75, "multi": 0.25, "caption": 0.0, "chat": 0.0}, records_per_scene=1
)


def base_domain_records(seed: int, n: int, *, label: str) -> list[Record]:
    """``n`` referring-expression records of the base domain (scene ``i`` of ``seed``),
    images and masks in memory; ``label`` names them in ``Record.source``."""
    if n < 0:
        raise ValueError(f"the number of base-domain records must be >= 0, got {n}")
    records: list[Record] = []
    index = 0
    while len(records) < n:  # a scene the grammar cannot describe (rare) is passed over
        scene, recs = next(synth.generate(seed, 1, BASE_DOMAIN, start=index))
        index += 1
        if not recs:
            continue
        r = recs[0]
        records.append(
            Record(
                image=scene.image,
                task="rec",
                text=r["expression"],
                answer=None,
                boxes=[[float(v) for v in b] for b in r["boxes"]],
                masks=r["masks"],  # COCO RLE of the referred objects' visible masks
                width=scene.width,
                height=scene.height,
                source=f"{label} scene {scene.scene_id} ({r['expression']!r})",
            )
        )
    return records


def replay_set(corrections: int, ratio: float, config: NextChatConfig) -> SampleSet:
    """The replay buffer for a job training on ``corrections`` samples:
    ``round(ratio * corrections)`` base-domain samples (empty for ``ratio == 0``)."""
    n = round(ratio * corrections)
    return SampleSet(base_domain_records(REPLAY_SEED, n, label="replay"), config)


def regression_set(n: int, config: NextChatConfig) -> SampleSet:
    """The fixed regression slice of ``n`` base-domain records (the same in every job)."""
    return SampleSet(base_domain_records(REGRESSION_SEED, n, label="regression"), config)
