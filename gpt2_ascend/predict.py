"""The one generation entry point: prompts -> continuations, in left-padded batches, streamed or not, counted and
timed. generate.py and train.py --run_mode predict (train/run_modes.predict_recipe) both call it, with a model from
loading.load_model and settings from their flags / recipe; the decoding itself is generation.generate_text's."""
from __future__ import annotations

import time

from . import device as dev
from .generation import generate_text


def generate_texts(model, tokenizer, prompts: list[str], batch_size: int = 1, stream=None, on_text=None,
                   **settings) -> dict:
    """Continuations of `prompts` (generation.generate_text's settings: max_new_tokens or max_decode_length,
    do_sample, top_k, top_p, temperature, repetition_penalty, seed, ...), batch_size prompts at a time. stream: a
    writer (print) that gets each prompt and then its tokens as they are produced (batch size 1); on_text(prompt,
    text): called as each continuation is done. Returns dict(results=[dict(prompt, text)], new_tokens, seconds):
    new tokens counted by re-tokenizing each continuation, seconds of generation (loading not included)."""
    prompts = [p for p in prompts if p is not None]
    if not prompts:
        raise ValueError("no prompt: nothing to continue")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"the batch size must be a positive integer, got {batch_size!r}")
    if stream is not None and batch_size > 1:
        raise ValueError("streaming prints one sequence at a time: use a batch size of 1")
    results, new_tokens, start = [], 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        streamer = None
        if stream is not None:
            from transformers import TextStreamer
            stream(batch[0], end="", flush=True)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        texts = generate_text(model, tokenizer, batch, batch_size=len(batch), streamer=streamer, **settings)
        for prompt, text in zip(batch, texts):
            if on_text is not None:
                on_text(prompt, text)
            results.append(dict(prompt=prompt, text=text))
            new_tokens += len(tokenizer(text).input_ids)
    dev.synchronize(next(model.parameters()).device)
    return dict(results=results, new_tokens=new_tokens, seconds=round(time.perf_counter() - start, 3))
