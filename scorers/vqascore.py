"""VQAScore (Lin et al. 2024, "Evaluating Text-to-Visual Generation with Image-to-Text Generation").

Reference: t2v_metrics (github.com/linzhiqiu/t2v_metrics). A vision-language model is asked, in its chat
template with the image first, 'Does this figure show "{prompt}"? Please answer yes or no.' and the score is the
probability that its answer starts with "Yes".

raw   = P("Yes") = softmax(next-token logits after the assistant turn opens)["Yes"]
score = 100 * raw

One forward pass over the templated question; the logits are used as they are. t2v_metrics reads them from
generate(max_new_tokens=1), which also applies the model's generation-config processors (Qwen2-VL's
repetition_penalty 1.05); those are sampling settings, not part of the model, and are left out here.
Works with any transformers image-text-to-text model whose answer "Yes" is one token (Qwen2-VL, Qwen2.5-VL).
Batches are left-padded, so the last position is every row's next token. Images go through the PIL image
processor, as in the reference (transformers 4).
"""

from __future__ import annotations

import os
from functools import cached_property

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

from .base import ScoreOutput, Scorer, has_tensors, resolve_device, resolve_dtype
from .hub import from_pretrained, pil_image_processor_kwargs, trained_model
from .registry import defaults
from .tensors import PatchTransform

DEFAULT_MODEL = defaults("vqascore")["model"]
SMALL_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
QUESTION, ANSWER = defaults("vqascore")["question"], defaults("vqascore")["answer"]


def normalise(p_yes: float) -> float:
    return 100.0 * p_yes


class VQAScore(Scorer):
    name = "vqascore"

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        processor: str | os.PathLike | None = None,
        question: str = QUESTION,
        answer: str = ANSWER,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        allow_random_weights: bool = False,
    ):
        self.device = resolve_device(device)
        bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        # Qwen-VL models are trained and run in bf16 (t2v_metrics too); fp16 can overflow in their MLPs.
        self.dtype = resolve_dtype(dtype, self.device, gpu_auto=torch.bfloat16 if bf16 else torch.float16)
        self.question = question
        processor = processor or model
        self.model = trained_model(AutoModelForImageTextToText.from_pretrained, model, "VQAScore model", allow_random_weights)
        self.model.to(self.device, self.dtype).eval()
        image_processor = from_pretrained(
            AutoImageProcessor.from_pretrained, processor, "VQAScore image processor", "processor",
            **pil_image_processor_kwargs(),
        )
        self.processor = from_pretrained(
            AutoProcessor.from_pretrained, processor, "VQAScore processor", "processor", image_processor=image_processor
        )
        self.processor.tokenizer.padding_side = "left"
        ids = self.processor.tokenizer.encode(answer, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"VQAScore needs an answer that is one token; {answer!r} is {len(ids)} tokens: {ids}")
        self.answer_id = ids[0]

    def prompt_text(self, prompt: str) -> str:
        """The chat-templated question for one prompt, ending where the assistant's answer starts."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question.format(prompt)}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @cached_property
    def tensor_transform(self) -> PatchTransform:
        """The tensor path's preprocessing, from the same image processor the PIL path uses."""
        return PatchTransform.from_hf(self.processor.image_processor)

    def _score(self, images: list[Image.Image], prompts: list[str]) -> list[ScoreOutput]:
        if has_tensors(images):
            inputs = self._tensor_inputs(images, prompts)
        else:
            inputs = self.processor(
                text=[self.prompt_text(p) for p in prompts], images=images, padding=True, return_tensors="pt"
            ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        logits = self.model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1].float()
        p_yes = torch.softmax(logits, dim=-1)[:, self.answer_id].tolist()
        return [ScoreOutput(raw=p, score=normalise(p), truncated=False) for p in p_yes]

    def _tensor_inputs(self, images: list, prompts: list[str]) -> dict:
        """The processor's inputs for a batch with tensors: patches made on the device (PIL images
        in the batch through the PIL processor), each prompt's image token repeated once per merged
        patch as Qwen2VLProcessor does, then its tokenizer (a test checks the ids match)."""
        patches, grids = [], []
        for image in images:
            if isinstance(image, torch.Tensor):
                flat, grid = self.tensor_transform(image.to(self.device, non_blocking=True))
                patches.append(flat)
                grids.append(list(grid))
            else:
                out = self.processor.image_processor(images=[image], return_tensors="pt")
                patches.append(out["pixel_values"].to(self.device))
                grids.append(out["image_grid_thw"][0].tolist())
        token = self.processor.image_token
        merge = self.processor.image_processor.merge_size ** 2
        texts = [self.prompt_text(p).replace(token, token * (t * h * w // merge), 1)
                 for p, (t, h, w) in zip(prompts, grids)]
        inputs = dict(self.processor.tokenizer(texts, padding=True, return_tensors="pt"))
        if getattr(self.processor, "return_mm_token_type_ids", False):
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.processor.image_token_id).long()
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        inputs["pixel_values"] = torch.cat(patches)
        inputs["image_grid_thw"] = torch.tensor(grids, dtype=torch.long, device=self.device)
        return inputs
