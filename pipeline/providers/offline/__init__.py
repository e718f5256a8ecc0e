"""The offline provider pair: deterministic agents (`agents`) and a procedural image generator
(`images`), split by what they are.

It serves the no-key demo and the tests, so it must behave like the real thing where the
pipeline can tell: valid JSON in the agents' convention (the last user message is a JSON object
of inputs), a critique loop that improves over iterations, and images that visibly depend on the
prompt, the variation and the reference image. Everything it makes is labelled offline.

The names are re-exported here so `from pipeline.providers.offline import OfflineChat` keeps working.
"""

from pipeline.providers.offline.agents import (
    ASPECTS,
    OfflineChat,
    brand_words,
    cinematographer,
    infer_task,
    last_user_payload,
    offline_reply,
    present_aspects,
    prompt_engineer,
    storyboard,
    subject_of,
)
from pipeline.providers.offline.common import stable_hash
from pipeline.providers.offline.images import OFFLINE_LABEL, OfflineImages, render_offline_image

__all__ = [
    "ASPECTS", "OFFLINE_LABEL", "OfflineChat", "OfflineImages", "brand_words", "cinematographer",
    "infer_task", "last_user_payload", "offline_reply", "present_aspects", "prompt_engineer",
    "render_offline_image", "stable_hash", "storyboard", "subject_of",
]
