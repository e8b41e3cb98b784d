"""What an exported model stops generating at.

A model is trained to end each answer with its template's end-of-turn token (`<|im_end|>`,
`<|eot_id|>`). A base model's generation config names only its end-of-text token, and a chat
template put on it (chatml on a base SmolLM2 or Qwen2.5) ends turns with another one: `generate()`,
MLflow's pyfunc and inference servers read `generation_config.json`, so such a checkpoint answered
and then went on, turn after turn, to the length limit. The end-of-turn token is added there.
"""

from __future__ import annotations

from pathlib import Path


def stop_at(folder: Path, token_id: int) -> bool:
    """Add `token_id` to the eos ids of the Hugging Face model folder `folder` (its
    generation_config.json, made from config.json where missing). Returns whether it changed. A
    folder without config.json (a LoRA adapter) generates with its base model's settings."""
    if not (folder / "config.json").is_file():
        return False
    from transformers import AutoConfig, GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(str(folder))
    except OSError:
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(folder)))
    eos = generation.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if token_id in ids:
        return False
    generation.eos_token_id = [*ids, token_id]
    generation.save_pretrained(str(folder))
    return True
