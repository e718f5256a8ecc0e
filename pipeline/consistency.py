"""Consistency markers: the sheet's entries as marker sentences, scene prompts that
carry them verbatim, and the check that a rewrite kept them.

Generic character descriptions give a different person in every scene; a fixed sentence per
product, character, setting and style, repeated word for word in every scene's prompt, gives
the image model the same description each time. The sentences are built here from the sheet's
fields (not written freely by the LLM per scene), so every scene gets exactly the same words.
"""

from __future__ import annotations

from pipeline.schemas import ConsistencySheet, ScenePlan

GLOBAL_MARKERS = ("style",)  # the look of the whole film: in every scene whatever the planner lists


def _join(*parts: str) -> str:
    return ", ".join(p.strip().rstrip(".") for p in parts if p and p.strip())


def marker_texts(sheet: ConsistencySheet | None) -> dict[str, str]:
    """Marker id -> the sentence scene prompts carry. Ids: "product", "setting", "style" and
    each character's name in lower case. Empty entries make no marker."""
    if sheet is None:
        return {}
    markers: dict[str, str] = {}
    if sheet.product is not None:
        p = sheet.product
        details = _join(p.shape, p.colours, p.materials, f"logo {p.logo_placement.strip()}" if p.logo_placement.strip() else "")
        markers["product"] = f"{p.name.strip()}: {details}" if details else p.name.strip()
    for character in sheet.characters:
        details = _join(character.age, character.hair, character.clothing, character.other)
        markers[character.name.strip().lower()] = f"{character.name.strip()}: {details}" if details else character.name.strip()
    if sheet.setting.strip():
        markers["setting"] = f"Setting: {sheet.setting.strip().rstrip('.')}"
    if sheet.style.strip():
        markers["style"] = f"Style: {sheet.style.strip().rstrip('.')}"
    return markers


def scene_markers(sheet: ConsistencySheet | None, ids: list[str] | None) -> list[str]:
    """The marker sentences of one scene, in the sheet's order: the ids the planner listed
    (None: all of them) plus the global ones. Unknown ids are ignored."""
    texts = marker_texts(sheet)
    wanted = set(texts) if ids is None else {i.strip().lower() for i in ids} | set(GLOBAL_MARKERS)
    return [text for key, text in texts.items() if key in wanted]


def compose_prompt(description: str, markers: list[str]) -> str:
    """Description first, then the markers: a text encoder that cuts at 77 tokens keeps the
    description, the part that says what the scene is."""
    description = " ".join(description.split())
    if not markers:
        return description
    return description.rstrip(" .") + ". " + ". ".join(m.rstrip(" .") for m in markers) + "."


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


def missing_markers(text: str, markers: list[str]) -> list[str]:
    """Markers not found in `text` verbatim (case and runs of whitespace aside; a marker's
    final full stop is not required, as a rewrite may go on after it with a comma)."""
    haystack = _normal(text)
    return [m for m in markers if _normal(m.rstrip(" .")) not in haystack]


def scene_text(scene: ScenePlan) -> str:
    """What the text-image scorers compare against with `scoring.text: scene`: the scene's
    description with its markers (its storyboard prompt), never the camera vocabulary."""
    return scene.prompt
