"""Qwen 2.5 Base: loaded once per process on first use, run under a deadline, unloaded when idle.

torch and transformers are imported on first load, so only the enhancement worker's pool
child (after the fork) ever pays for them; the media worker imports this module freely.
The deadline is transformers' own `max_time` stopping criterion, checked after every token
inside `generate`: when it passes, generation stops in this thread; nothing runs on.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enhancement.prompts import IDEA_LABEL

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Stop strings: the end of one example's paragraph, or the start of the next example.
STOP_STRINGS = ("\n\n", f"\n{IDEA_LABEL}")


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one generation; part of the cache key."""

    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int


@dataclass(frozen=True)
class Completion:
    """What one generation produced, and whether the deadline cut it short."""

    text: str
    tokens: int
    seconds: float
    timed_out: bool


class QwenModel:
    """A causal LM and its tokenizer from one directory, loaded lazily and shared by calls.

    `on_change(loaded)` is told whenever the model is loaded or unloaded, so the process
    can say what it holds (GET /health).
    """

    def __init__(
        self,
        path: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        idle_unload_s: float = 0.0,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.path = path
        self.device = device
        self.dtype = dtype
        self.idle_unload_s = idle_unload_s
        self.on_change = on_change
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._last_used = 0.0
        self._idle_timer: threading.Timer | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def complete(self, prompt: str, *, sampling: Sampling, deadline_s: float) -> Completion:
        """Continue `prompt`; stop at a stop string, EOS, the token cap or the deadline."""
        import torch

        with self._lock:
            self._load()
            started = time.perf_counter()
            inputs = self._tokenizer(prompt, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                output = self._model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    repetition_penalty=sampling.repetition_penalty,
                    max_new_tokens=sampling.max_new_tokens,
                    max_time=deadline_s,
                    stop_strings=list(STOP_STRINGS),
                    tokenizer=self._tokenizer,
                    pad_token_id=self._tokenizer.pad_token_id or self._tokenizer.eos_token_id,
                )
            seconds = time.perf_counter() - started
            new_tokens = output[0, inputs["input_ids"].shape[1] :]
            text = self._tokenizer.decode(new_tokens, skip_special_tokens=True)
            ended = (
                int(new_tokens[-1]) == self._tokenizer.eos_token_id
                or len(new_tokens) >= sampling.max_new_tokens
                or any(stop in text for stop in STOP_STRINGS)
            )
            self._last_used = time.monotonic()
            self._schedule_unload()
        return Completion(
            text=text,
            tokens=len(new_tokens),
            seconds=seconds,
            timed_out=not ended and seconds >= deadline_s,
        )

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype)
        self._model = model.to(self.device).eval()
        log.info(
            "Qwen loaded from %s on %s (%s) in %.1f s",
            self.path,
            self.device,
            str(self.dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )
        if self.on_change:
            self.on_change(True)

    def _schedule_unload(self) -> None:
        if self.idle_unload_s <= 0:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = threading.Timer(self.idle_unload_s, self._unload_if_idle)
        self._idle_timer.daemon = True
        self._idle_timer.start()

    def _unload_if_idle(self) -> None:
        with self._lock:
            idle_s = time.monotonic() - self._last_used
            if self._model is None or idle_s < self.idle_unload_s:
                return
            self._model = self._tokenizer = None
            gc.collect()
            if self.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
            log.info("Qwen unloaded after %.0f s idle", idle_s)
        if self.on_change:
            self.on_change(False)
