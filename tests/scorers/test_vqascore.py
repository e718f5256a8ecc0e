"""VQAScore: P("Yes") computed by hand from the full next-token logits of the raw model."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from scorers import load_scorer, vqascore


def test_question_and_answer_defaults():
    assert vqascore.QUESTION == 'Does this figure show "{}"? Please answer yes or no.'
    assert vqascore.ANSWER == "Yes" and vqascore.DEFAULT_MODEL == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_chat_template_puts_image_then_question(tiny_scorers):
    text = tiny_scorers("vqascore").prompt_text("a cat")
    assert text.index("<|image_pad|>") < text.index('Does this figure show "a cat"? Please answer yes or no.')
    assert text.endswith("<|im_start|>assistant\n")


def test_p_yes_by_hand(tiny_scorers, tiny_options, images, prompts):
    path = tiny_options["vqascore"]["model"]
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    yes = processor.tokenizer.convert_tokens_to_ids("Yes")
    out = tiny_scorers("vqascore").score(images, prompts)
    for image, prompt, o in zip(images, prompts, out):
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": f'Does this figure show "{prompt}"? Please answer yes or no.'}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        p = torch.softmax(logits.double(), dim=-1)[yes].item()
        assert o.raw == pytest.approx(p, rel=1e-4, abs=1e-7)
        assert o.score == pytest.approx(100 * p, rel=1e-4, abs=1e-5)
        assert 0.0 <= o.score <= 100.0 and not o.truncated


def test_answer_must_be_one_token(tiny_options):
    with pytest.raises(ValueError, match="one token"):
        load_scorer("vqascore", **tiny_options["vqascore"], answer="Yes indeed absolutely", device="cpu")


def test_missing_model_names_the_id():
    with pytest.raises(RuntimeError, match="(?s)nobody/no-such-vlm.*HF_HOME"):
        load_scorer("vqascore", model="nobody/no-such-vlm", device="cpu")
