"""Local prompt refinement: a short prompt rewritten into the detailed captions Open-Sora was trained
on, by an instruction-tuned language model that mlx-lm runs on this machine.

The on-device counterpart of Open-Sora 1.2's ``--llm-refine`` (which sends each prompt to a cloud
model): nothing leaves the machine. The language model is a phase of its own in the memory plan,
loaded, run on every prompt and released before the text encoder starts. Deterministic for a seed
(the sampler draws from MLX's global generator, seeded before each prompt).

Default model: ``mlx-community/Qwen2.5-1.5B-Instruct-4bit`` (Qwen2.5-1.5B-Instruct converted and
4-bit quantized by mlx-lm), downloaded from the Hugging Face hub on first use like the
video models; any mlx-lm model folder or hub id works (``--refine-prompt MODEL``).
"""

from __future__ import annotations

import gc
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx

from ..conditioning import extract_prompt_json
from ..errors import UserError
from ..runtime.memory import PhaseReport, measure_phase, process_memory, release_freed_cpu_memory
from ..runtime.streaming import PhasePlan, UnitSize, plan_phase
from .text import merge_prompt, split_prompt

DEFAULT_REFINER = "mlx-community/Qwen2.5-1.5B-Instruct-4bit"

# Our own instruction (Open-Sora's captions: one paragraph, concrete, visual, present tense).
SYSTEM_PROMPT = (
    "You turn a short idea for a video into the caption a text-to-video model should receive. "
    "Describe only what a camera would see: the main subject and its appearance, what it does and how "
    "it moves, the setting, the light and colours, and the camera's position or movement. Use plain, "
    "concrete words in the present tense, in one paragraph of two to four sentences and at most 80 "
    "words. Keep every detail the idea gives and do not contradict it; invent nothing that changes its "
    "meaning. Write no title, list, quotation marks, sound, dialogue or commentary: answer with the "
    "caption alone, in English."
)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


@dataclass
class RefinerSettings:
    model: str = DEFAULT_REFINER
    max_tokens: int = 160
    temperature: float = 0.7
    top_p: float = 0.9


def tidy(text: str) -> str:
    """The model's answer as one prompt line: whitespace collapsed, surrounding quotes removed."""
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def resolve_refiner(model: str) -> Path:
    """A local mlx-lm model folder, or a hub id downloaded (cached) like the video models."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"--refine-prompt {model}: no config.json in that folder; give an mlx-lm model folder "
                            f"or a hub id such as {DEFAULT_REFINER}")
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise UserError(f"--refine-prompt {model!r}: not a folder, nor a hub id like {DEFAULT_REFINER}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # noqa: BLE001 (network, missing repo, auth: one message)
        raise UserError(f"--refine-prompt {model}: cannot download it from the Hugging Face hub ({type(e).__name__}: "
                        f"{e}); give a local mlx-lm model folder instead") from None


def plan_refinement(folder: Path, budget: int | None, max_tokens: int) -> PhasePlan:
    """The refinement phase's memory plan: the whole model (read once) + its KV cache and logits."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"--refine-prompt {folder}: no *.safetensors weights in that folder")
    weights = sum(f.stat().st_size for f in files)
    config = json.loads((folder / "config.json").read_text())
    layers = int(config.get("num_hidden_layers", 32))
    heads = int(config.get("num_attention_heads", 32))
    kv_heads = int(config.get("num_key_value_heads", heads))
    hidden = int(config.get("hidden_size", 4096))
    vocab = int(config.get("vocab_size", 32000))
    context = 512 + max_tokens  # the system prompt and a prompt, then the answer
    kv_cache = layers * 2 * context * kv_heads * (hidden // heads) * 2
    activations = kv_cache + 16 * context * hidden * 4 + 4 * vocab * 4
    return plan_phase("prompt refinement", [UnitSize("language model", weights, weights, 1)], budget,
                      process_memory(), activations, overlap=False, what=f" with {folder.name}")


@dataclass
class PromptRefiner:
    """Loads an mlx-lm model and rewrites prompts with it (``with refiner: refiner.refine(...)``)."""

    folder: Path
    settings: RefinerSettings = field(default_factory=RefinerSettings)

    def __post_init__(self) -> None:
        self.model = None
        self.tokenizer = None

    def __enter__(self) -> "PromptRefiner":
        from mlx_lm import load

        self.model, self.tokenizer = load(str(self.folder))
        return self

    def __exit__(self, *exc) -> None:
        self.model = self.tokenizer = None
        gc.collect()
        mx.clear_cache()
        release_freed_cpu_memory()

    def chat(self, prompt: str) -> str:
        """The model's input: our instruction and the prompt in the model's chat template."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def sampler(self) -> Callable[[mx.array], mx.array]:
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(temp=self.settings.temperature, top_p=self.settings.top_p)

    def generate_raw(self, prompt: str, seed: int) -> str:
        """mlx-lm's ``generate`` on the chat, the global generator seeded with ``seed``."""
        from mlx_lm import generate

        if self.model is None:
            raise RuntimeError("PromptRefiner: use it inside 'with refiner:' (the model is loaded there)")
        mx.random.seed(seed % 2**64)
        return generate(self.model, self.tokenizer, prompt=self.chat(prompt), max_tokens=self.settings.max_tokens,
                        sampler=self.sampler(), verbose=False)

    def refine(self, prompt: str, seed: int) -> str:
        """A prompt rewritten; loop segments ('|0|...|2|...') one by one, an embedded JSON object kept."""
        text, reference, strategy = extract_prompt_json(prompt)
        segments, loops = split_prompt(text)
        refined = [tidy(self.generate_raw(s, seed)) or s for s in segments]
        extra = {k: v for k, v in (("reference_path", reference), ("mask_strategy", strategy)) if v is not None}
        return merge_prompt(refined, loops) + (json.dumps(extra) if extra else "")


def refine_prompts(prompts: Sequence[str], seed: int, budget: int | None, settings: RefinerSettings,
                   on_refined: Callable[[str, str], None] | None = None,
                   on_plan: Callable[[PhasePlan], None] | None = None) -> tuple[list[str], PhaseReport, PhasePlan]:
    """The refinement phase: plan (MemoryBudgetError before loading), load, rewrite, release."""
    folder = resolve_refiner(settings.model)
    plan = plan_refinement(folder, budget, settings.max_tokens)
    if on_plan is not None:
        on_plan(plan)
    refined = []
    with measure_phase("prompt refinement") as report:
        start = time.perf_counter()
        with PromptRefiner(folder, settings) as refiner:
            report.load_wait = time.perf_counter() - start  # the whole model, before any generation
            for prompt in prompts:
                refined.append(refiner.refine(prompt, seed))
                if on_refined is not None:
                    on_refined(prompt, refined[-1])
    return refined, report, plan
