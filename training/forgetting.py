"""What a retraining job does against forgetting, on the synthetic base domain.

The bundled demo model was trained on :mod:`training.synth` scenes (the original
vocabulary: :data:`synth.SHAPES`, :data:`synth.COLORS`). Retraining it on a project's
corrections alone can overwrite what it knew; two measures, both built from that domain:

* **replay** (``RETRAIN_REPLAY``): base-domain samples mixed into the training data, a
  fixed buffer of ``round(replay * samples)`` scenes per job (``samples``: its corrections
  and their copy-paste copies; yes/no questions among them under ``exists`` scoring) -
  what the model already knows,
  rehearsed while it learns the new (the standard remedy, e.g. experience replay in
  continual learning);
* the **regression slice** (``RETRAIN_REGRESSION``): a fixed set of base-domain records
  the served and the new version are both scored on; the gate refuses a version that
  loses more than ``PROMOTE_FORGETTING_TOLERANCE`` there, whatever it gains on the
  project's held-out corrections.

Both are rendered in memory, deterministically from their own seeds (never the demo
recipe's training or evaluation seeds, nor each other's), with the renderer of the demo's
held-out split (``SynthConfig()``) and its task mix (3:1 single : multi-instance; the
replay of an ``exists``-scored checkpoint adds the domain's yes/no questions). They
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


# The replay of a checkpoint whose region score asks "Is there ...?" (``exists`` scoring):
# a share of the domain's own yes/no questions ("Is there a red star?" -> "Yes, <at>
# <boxes>." / "No.") is rehearsed too, or the answers drift with the corrections' presence
# questions (measured: bench/RESULTS.md, new words).
PRESENCE_DOMAIN = synth.SynthConfig(
    task_mix={"rec": 0.5, "multi": 0.2, "caption": 0.0, "chat": 0.3}, records_per_scene=1
)


def base_domain_records(
    seed: int, n: int, *, label: str, domain: synth.SynthConfig = BASE_DOMAIN
) -> list[Record]:
    """``n`` records of the base domain (scene ``i`` of ``seed``, ``domain``'s task mix:
    referring expressions, and yes/no questions where it has them), images and masks in
    memory; ``label`` names them in ``Record.source``."""
    if n < 0:
        raise ValueError(f"the number of base-domain records must be >= 0, got {n}")
    records: list[Record] = []
    index = 0
    while len(records) < n:  # a scene the grammar cannot describe (rare) is passed over
        scene, recs = next(synth.generate(seed, 1, domain, start=index))
        index += 1
        if not recs:
            continue
        r = recs[0]
        chat = r["task"] == "chat"
        text = r["question"] if chat else r["expression"]
        records.append(
            Record(
                image=scene.image,
                task="chat" if chat else "rec",
                text=text,
                answer=r["answer"] if chat else None,
                boxes=[[float(v) for v in b] for b in r["boxes"]],
                masks=r["masks"],  # COCO RLE of the referred objects' visible masks
                width=scene.width,
                height=scene.height,
                source=f"{label} scene {scene.scene_id} ({text!r})",
            )
        )
    return records


def replay_set(samples: int, ratio: float, config: NextChatConfig) -> SampleSet:
    """The replay buffer for a job training on ``samples`` samples of the project (its
    corrections and their copy-paste copies): ``round(ratio * samples)`` base-domain
    samples (empty for ``ratio == 0``), with yes/no questions under ``exists`` scoring."""
    n = round(ratio * samples)
    domain = PRESENCE_DOMAIN if config.score.presence == "exists" else BASE_DOMAIN
    return SampleSet(base_domain_records(REPLAY_SEED, n, label="replay", domain=domain), config)


def regression_set(n: int, config: NextChatConfig) -> SampleSet:
    """The fixed regression slice of ``n`` base-domain records (the same in every job)."""
    return SampleSet(base_domain_records(REGRESSION_SEED, n, label="regression"), config)
