"""The CLIP tokenizer built offline from open_clip's BPE merges gives open_clip's ids."""

import open_clip
import pytest

from scorers.tiny import build_clip_tokenizer

TEXTS = [
    "A photo depicts a red bicycle leaning on a brick wall.",
    "Hello, WORLD: naïve café, 123 it's 3.5mm f/1.8 — ok?",
    "  irregular   spacing\tand\nnew lines  ",
    "emoji 🙂 and 東京 and ünïcödé",
    " ".join(["cinematic lighthouse at dusk"] * 30),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_open_clip(tokenizer, text):
    reference = open_clip.get_tokenizer("ViT-B-32-quickgelu")
    ids = tokenizer(text, truncation=True, max_length=77).input_ids
    expected = [i for i in reference([text])[0].tolist() if i != 0]
    assert ids == expected


def test_special_tokens(tokenizer):
    assert tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407 and len(tokenizer) == 49408
