"""Offline chat: a deterministic storyboard writer, Cinematographer and Prompt Engineer.

They answer in the agents' convention (the last user message is a JSON object of inputs) with
valid JSON, and the critique loop improves over iterations the way a real model's should, so
the pipeline's agent loop, stop rule and traces are exercised without an LLM. Same inputs, same
answer: the demo and the tests are reproducible.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass

from pipeline.costs import CallUsage, estimate_tokens
from pipeline.providers.offline.common import stable_hash
from pipeline.providers.base import ChatTask, ProviderError
from pipeline.telemetry import account


def _pick(options: tuple[str, ...], *key: object) -> str:
    return options[stable_hash(*key) % len(options)]


# --- Chat: storyboard -----------------------------------------------------------------------

_STOPWORDS = frozenset(
    "a an the and or but of for with without in on at to from by into onto over under about "
    "this that these those its it is are was were be been being as than then so very just "
    "show shows showing make makes made create video short clip scene scenes seconds "
    "their there they them our your you we us his her he she who whom which what when where "
    "while some any each every more most less few many much also only launch promo promotional "
    "advert commercial brand product film".split()
)
# "A launch video for X" is about X: beats read better naming X alone.
_LEAD_IN = re.compile(
    r"^(?:(?:a|an|the)\s+)?(?:(?:short|launch|promo|promotional|product|brand)\s+)*"
    r"(?:video|ad|advert|advertisement|commercial|film|clip|spot)\s+(?:about|for|of|showing)\s+",
    re.IGNORECASE,
)


def subject_of(prompt: str, limit: int = 240) -> str:
    """The story prompt's first sentence, cut at a word boundary: the subject every beat names."""
    text = _LEAD_IN.sub("", " ".join(prompt.split()))
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".!? ")
    if len(first) > limit:
        first = first[:limit].rsplit(" ", 1)[0]
    first = first or text[:limit]
    article = re.match(r"(?:a|an|the)\s+", first, re.IGNORECASE)
    if article:  # "A closer look at the bottle", not "... at A bottle"
        first = "the " + first[article.end():]
    return first


def brand_words(story_prompt: str, limit: int = 5) -> list[str]:
    """Distinctive words of the story prompt, as written (names keep their capitals); brand
    alignment means keeping them."""
    words: list[str] = []
    seen: set[str] = set()
    for word in re.findall(r"[A-Za-z][A-Za-z'-]{3,}", story_prompt):
        if word.lower() not in _STOPWORDS and word.lower() not in seen:
            seen.add(word.lower())
            words.append(word)
        if len(words) == limit:
            break
    return words


_OPENING = "Opening scene: {s}, introduced in its wider world as the story begins"
_CLOSING = "Closing beat: {s} presented one last time with room for the tagline, ending the story"
_MIDDLE_BEATS = (
    "A closer look at {s}, the craft and care that make it special",
    "In use: a person reaches for {s} and it does what it promises",
    "Lifestyle moment: {s} fits naturally into an everyday routine",
    "Hero moment: {s} alone, confident and unmistakable",
    "Transition: movement and energy around {s} carry the story forward",
    "Reaction: a genuine smile from someone enjoying {s}",
)


# The offline consistency sheet: a fixed look chosen from the prompt's hash, so the same story
# always gets the same sheet (a real planner reads the product and people off the prompt).
_SHAPES = ("a tall slim cylinder with rounded shoulders", "a compact rounded rectangle", "a gently tapered cone")
_COLOURS = ("matte midnight blue with a copper band", "warm ivory with a sage-green accent", "satin charcoal with a coral stripe")
_MATERIALS = ("brushed aluminium and frosted glass", "ceramic and pale oak", "recycled paper board and cork")
_LOGOS = ("a small embossed logo centred on the front", "a debossed logo low on the left side")
_HOSTS = (
    ("Maya", "a woman in her early thirties", "shoulder-length curly black hair", "a mustard knit sweater and dark jeans"),
    ("Leo", "a man in his late twenties", "short cropped brown hair and a trimmed beard", "a navy overshirt over a white tee"),
    ("Ines", "a woman in her fifties", "a silver bob", "a teal linen shirt with rolled sleeves"),
)
_SETTINGS = (
    "a sunlit Scandinavian apartment with white walls and oak floors",
    "a small urban cafe with exposed brick and green plants",
    "a calm studio set with a soft grey backdrop",
)
_STYLES = (
    "clean commercial photography, soft natural light, palette of warm neutrals with one accent colour",
    "cinematic lifestyle look, gentle film grain, muted teal-and-amber palette",
)
# Beats in which a person appears (the host character's marker goes there).
_PEOPLE_BEATS = ("In use:", "Lifestyle moment:", "Reaction:")


def consistency_sheet(prompt: str) -> dict:
    """The offline planner's consistency sheet: the product named from the prompt's subject,
    one host character and a setting and style, each picked deterministically."""
    subject = subject_of(prompt, limit=80)
    name = subject[4:] if subject.lower().startswith("the ") else subject
    host = _HOSTS[stable_hash("host", prompt) % len(_HOSTS)]
    return {
        "product": {
            "name": name,
            "shape": _pick(_SHAPES, "shape", prompt),
            "colours": _pick(_COLOURS, "colours", prompt),
            "materials": _pick(_MATERIALS, "materials", prompt),
            "logo_placement": _pick(_LOGOS, "logo", prompt),
        },
        "characters": [{"name": host[0], "age": host[1], "hair": host[2], "clothing": host[3]}],
        "setting": _pick(_SETTINGS, "setting", prompt),
        "style": _pick(_STYLES, "style", prompt),
    }


def storyboard(prompt: str, scene_count: int, durations: list[int] | None = None) -> dict:
    """`scene_count` distinct scenes: an opening, rotating middle beats, a closing beat, with a
    consistency sheet; each scene lists the markers it shows (the host only where a person is
    in the beat)."""
    if scene_count < 1:
        raise ProviderError("offline storyboard: scene_count must be at least 1")
    subject = subject_of(prompt)
    templates: list[str] = []
    for index in range(scene_count):
        if index == 0:
            templates.append(_OPENING)
        elif index == scene_count - 1:
            templates.append(_CLOSING)
        else:
            beat = _MIDDLE_BEATS[(index - 1) % len(_MIDDLE_BEATS)]
            repeat = (index - 1) // len(_MIDDLE_BEATS)
            templates.append(beat + (f" (variation {repeat + 1})" if repeat else ""))
    sheet = consistency_sheet(prompt)
    host = sheet["characters"][0]["name"]
    scenes = []
    for index, template in enumerate(templates):
        description = template.format(s=subject)
        if durations and index < len(durations):
            description += f" ({durations[index]} s)"
        markers = ["product", "setting", "style"]
        if template.startswith(_PEOPLE_BEATS):
            markers.insert(1, host.lower())
        scenes.append({"description": description, "markers": markers})
    return {"consistency": sheet, "scenes": scenes}


# --- Chat: cinematographer and prompt engineer ----------------------------------------------


@dataclass(frozen=True)
class Aspect:
    """One thing a production-ready image prompt states. `detect` finds it in any prompt (also
    one written by a real LLM); `label` is how critiques name it, so the cinematographer can
    tell which aspects a critique asks for."""

    key: str
    label: str
    detect: re.Pattern[str]
    phrases: tuple[str, ...]
    advice: str


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


ASPECTS: tuple[Aspect, ...] = (
    Aspect(
        "camera_angle",
        "camera angle",
        _rx(r"low[- ]angle|high[- ]angle|eye[- ]level|overhead|bird'?s[- ]eye|three-quarter|top[- ]down|dutch angle|camera angle"),
        ("low-angle three-quarter view", "eye-level medium shot", "high-angle overhead view"),
        "state the camera angle and shot size (e.g. low-angle three-quarter view)",
    ),
    Aspect(
        "lens",
        "lens",
        _rx(r"\b\d{2,3}\s?mm\b|\blens\b|telephoto|macro"),
        ("shot on a 50mm prime lens", "shot on an 85mm portrait lens", "shot on a 35mm lens"),
        "name the lens and focal length (e.g. 50mm prime)",
    ),
    Aspect(
        "lighting",
        "lighting",
        _rx(r"key light|rim light|backlight|softbox|window light|golden hour|lighting"),
        (
            "soft key light from camera left with a subtle rim light",
            "golden hour backlight with a bounce fill from the right",
            "large softbox key light from above with gentle side fill",
        ),
        "describe the lighting direction and quality (key, fill, rim)",
    ),
    Aspect(
        "composition",
        "composition",
        _rx(r"rule[- ]of[- ]thirds|leading lines|negative space|symmetrical|composition|framing"),
        (
            "rule-of-thirds composition with negative space on the right",
            "centred symmetrical composition with leading lines",
            "layered framing with foreground elements and clean negative space",
        ),
        "fix the composition (rule of thirds, leading lines, negative space)",
    ),
    Aspect(
        "depth_of_field",
        "depth of field",
        _rx(r"depth of field|bokeh|f/\d|aperture"),
        (
            "shallow depth of field at f/2.0 with creamy bokeh",
            "moderate depth of field at f/4 keeping the subject crisp",
        ),
        "specify depth of field with an aperture (e.g. f/2.0, soft bokeh)",
    ),
    Aspect(
        "colour_temperature",
        "colour temperature",
        _rx(r"\b\d{4}\s?K\b|colou?r temperature"),
        (
            "warm 3200K key against a cool 5600K ambient",
            "neutral 5600K daylight balance with warm 4000K accents",
        ),
        "give the colour temperature in Kelvin (e.g. warm 3200K key, 5600K fill)",
    ),
    Aspect(
        "subject_detail",
        "subject detail",
        _rx(r"textur|materials?\b|surface|finish|craftsmanship"),
        (
            "crisp detail on every surface, material and texture",
            "fine rendering of materials, surface finish and texture",
        ),
        "add concrete subject detail: materials, texture, surface finish",
    ),
    Aspect(
        "colour_grade",
        "colour grade",
        _rx(r"colou?r grade|palette|graded"),
        ("cinematic teal-and-amber colour grade", "muted natural palette with rich blacks"),
        "set a colour grade or palette that carries the mood",
    ),
    Aspect(
        "brand",
        "brand consistency",
        _rx(r"on-brand|brand"),
        ("{b} kept on-brand and recognisable",),
        "tie the shot to the brand: keep {b} recognisable and consistent",
    ),
    Aspect(
        "finish",
        "professional finish",
        _rx(r"commercial|advertising|editorial|photorealistic|high-end"),
        ("photorealistic high-end commercial photograph",),
        "ask for a professional finish (photorealistic, high-end commercial)",
    ),
)
ASPECT_BY_KEY = {aspect.key: aspect for aspect in ASPECTS}
# What the cinematographer writes on a first pass: the basics of a shot.
FIRST_PASS = ("camera_angle", "lens", "lighting", "composition")
# How many requested aspects one rewrite adds: the loop improves step by step.
FIXES_PER_ITERATION = 2
NUMERIC_SPEC = _rx(r"\b\d{2,3}\s?mm\b|f/\d|\b\d{4}\s?K\b")
# Most valuable first: the cinematographer fixes the first ones it is told about.
_IMPROVEMENT_ORDER = tuple(
    ASPECT_BY_KEY[key]
    for key in (
        "depth_of_field",
        "colour_temperature",
        "subject_detail",
        "brand",
        "finish",
        "colour_grade",
        "camera_angle",
        "lens",
        "lighting",
        "composition",
    )
)


def present_aspects(prompt: str) -> set[str]:
    return {aspect.key for aspect in ASPECTS if aspect.detect.search(prompt)}


def _requested_aspects(critique: str | None, improvements: list[str]) -> list[str]:
    """Aspects a critique asks for, in the order the critic listed them."""
    requested: list[str] = []
    for text in [*improvements, critique or ""]:
        for aspect in ASPECTS:
            if aspect.key not in requested and (aspect.label in text.lower() or aspect.detect.search(text)):
                requested.append(aspect.key)
    return requested


def _base_prompt(scene_prompt: str) -> str:
    """The scene prompt without its storyboard duration note, ready for a list of clauses."""
    return re.sub(r"\s*\(\d+ s\)(?=\s*(?:\.|$))", "", " ".join(scene_prompt.split())).rstrip(". ")


def _lost_markers(prompt: str, markers: list[str]) -> list[str]:
    lowered = " ".join(prompt.split()).casefold()
    return [m for m in markers if " ".join(m.rstrip(" .").split()).casefold() not in lowered]


def cinematographer(
    scene_prompt: str,
    story_prompt: str,
    iteration: int = 1,
    previous_prompt: str | None = None,
    critique: str | None = None,
    improvements: list[str] | None = None,
    markers: list[str] | None = None,
) -> dict:
    """Rewrite the scene prompt as a shot description. A first pass states the basics; each
    later pass keeps what the previous prompt had and adds the aspects the critique asks for
    (two per pass), so scores rise over iterations the way a real critique loop does. The
    scene prompt is kept whole, so its consistency markers stay verbatim; any marker it lacks
    is added."""
    aspects = set(FIRST_PASS) if previous_prompt is None else present_aspects(previous_prompt) | set(FIRST_PASS)
    requested = [key for key in _requested_aspects(critique, improvements or []) if key not in aspects]
    if previous_prompt is not None and not requested:
        requested = [aspect.key for aspect in ASPECTS if aspect.key not in aspects]
    aspects.update(requested[:FIXES_PER_ITERATION])

    brand = ", ".join(brand_words(story_prompt, limit=3)) or "the subject"
    clauses = [_base_prompt(scene_prompt)]
    clauses += [m.rstrip(" .") for m in _lost_markers(clauses[0], list(markers or []))]
    for aspect in ASPECTS:
        if aspect.key in aspects:
            phrase = _pick(aspect.phrases, aspect.key, scene_prompt)
            clauses.append(phrase.format(b=brand))
    return {"enhanced_prompt": ", ".join(clauses) + "."}


def _share_kept(words: list[str], text: str) -> float:
    lowered = text.lower()
    return sum(word.lower() in lowered for word in words) / len(words) if words else 1.0


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _clamp(value: float) -> float:
    return float(max(0, min(100, round(value))))


def prompt_engineer(
    scene_prompt: str, story_prompt: str, enhanced_prompt: str, iteration: int = 1, markers: list[str] | None = None
) -> dict:
    """Heuristic review: which aspects the prompt states, how concrete it is (numbers for lens,
    aperture, Kelvin), whether it still says what the scene is about, how much of the story's
    vocabulary it keeps, and (brand alignment) whether every consistency marker is there word
    for word. The critique names what is missing; the improvements are ordered by how much
    they would raise the score."""
    present = present_aspects(enhanced_prompt)
    has = lambda key: key in present  # noqa: E731
    words = len(enhanced_prompt.split())
    numbers = len({match.group(0).lower() for match in NUMERIC_SPEC.finditer(enhanced_prompt)})
    vocabulary = brand_words(story_prompt)
    kept_share = _share_kept(vocabulary, enhanced_prompt)
    scene_lost = 1 - _share_kept(brand_words(scene_prompt, limit=8), enhanced_prompt)
    lost = _lost_markers(enhanced_prompt, list(markers or []))

    scores = {
        "completeness": _clamp(52 + 4.6 * len(present) - 20 * scene_lost),
        "specificity": _clamp(56 + 7 * min(numbers, 3) + 7 * has("subject_detail") + min(words, 60) / 6),
        "professionalism": _clamp(
            66 + 9 * has("finish") + 7 * has("colour_grade") + 6 * has("composition") - (12 if words > 220 else 0)
        ),
        "cinematography": _clamp(
            52 + 8 * sum(map(has, ("camera_angle", "lens", "lighting", "depth_of_field"))) + 7 * has("colour_temperature")
        ),
        "brand_alignment": _clamp(56 + 26 * kept_share + 16 * has("brand") - 30 * len(lost) / max(len(markers or []), 1)),
    }

    missing = [aspect for aspect in _IMPROVEMENT_ORDER if aspect.key not in present]
    brand = ", ".join(vocabulary[:3]) or "the product"
    improvements = [_sentence(aspect.advice.format(b=brand)) for aspect in missing][:4]
    if scene_lost > 0.25:
        improvements.insert(0, "Keep the scene's own content: the rewrite lost what the scene is about")
    for marker in reversed(lost):
        improvements.insert(0, f"Restore the consistency marker word for word: {marker}")
    if words > 220:
        improvements.append("Tighten the prompt: it is long enough to dilute the subject")
    strong = [aspect.label for aspect in ASPECTS if aspect.key in present]
    if missing:
        critique = (
            f"Iteration {iteration}: the prompt states {', '.join(strong) or 'no technical aspects'}; "
            f"it is missing {', '.join(aspect.label for aspect in missing)}."
        )
    else:
        critique = f"Iteration {iteration}: production-ready; every technical aspect is stated."
    return {"scores": scores, "critique": critique, "improvements": improvements}


def infer_task(payload: dict) -> ChatTask:
    """Which agent sent these inputs (for servers that only see the messages)."""
    if "scene_count" in payload:
        return "storyboard"
    if "enhanced_prompt" in payload:
        return "prompt_engineer"
    if "scene_prompt" in payload:
        return "cinematographer"
    raise ProviderError(f"offline chat: unrecognised inputs (keys: {sorted(payload)})")


def last_user_payload(messages: list[dict[str, str]]) -> dict:
    """The JSON inputs object of the agents' message convention: the last user message that is
    a JSON object (a corrective re-ask after invalid output is plain text and is skipped)."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content") or ""
        if isinstance(content, list):  # content parts (text + image): the inputs are the text part
            content = next((p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"), "")
        try:
            payload = json.loads(content)
        except json.JSONDecodeError:
            continue
        if isinstance(payload, dict):
            return payload
    raise ProviderError("offline chat: no user message holds a JSON object of inputs")


def offline_reply(task: ChatTask, payload: dict) -> dict:
    try:
        if task == "storyboard":
            return storyboard(payload["prompt"], int(payload["scene_count"]), payload.get("durations"))
        if task == "cinematographer":
            return cinematographer(
                payload["scene_prompt"],
                payload.get("story_prompt") or payload["scene_prompt"],
                int(payload.get("iteration") or 1),
                payload.get("previous_prompt"),
                payload.get("critique"),
                list(payload.get("improvements") or []),
                list(payload.get("markers") or []),
            )
        if task == "prompt_engineer":
            return prompt_engineer(
                payload["scene_prompt"],
                payload.get("story_prompt") or payload["scene_prompt"],
                payload["enhanced_prompt"],
                int(payload.get("iteration") or 1),
                list(payload.get("markers") or []),
            )
    except KeyError as error:
        raise ProviderError(f"offline chat {task}: missing input {error}") from error
    raise ProviderError(f"offline chat: unknown task {task!r}")


class OfflineChat:
    """Deterministic ChatModel: same inputs, same JSON answer. `latency_s` simulates a model."""

    def __init__(self, latency_s: float = 0.0):
        self.latency_s = latency_s

    async def complete(self, messages: list[dict[str, str]], *, task: ChatTask) -> str:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        answer = json.dumps(offline_reply(task, last_user_payload(messages)))
        # Plausible token counts, priced at 0 (provider "offline"), so the demo shows the accounting.
        prompt = "".join(str(m.get("content", "")) for m in messages)
        account(CallUsage(
            kind="chat", provider="offline", model="offline-agents", task=task,
            input_tokens=estimate_tokens(prompt), output_tokens=estimate_tokens(answer),
        ))
        return answer
