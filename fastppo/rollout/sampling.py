"""Hugging Face `generate` kwargs → vLLM `SamplingParams` kwargs, faithfully or not at all.

`trainer.generate(..., **generation_kwargs)` takes the same kwargs on either rollout engine.
For vLLM they are resolved the way `model.generate` resolves them — the kwarg, else the
model's `generation_config`, else transformers' defaults (max_length 20, top_k 50, greedy) —
and translated per prompt (`max_length`/`min_length` count the prompt, vLLM's limits do not).
A kwarg, or a setting of the model's generation config, that vLLM cannot reproduce is a
`ValueError` naming it: never silently dropped. Pure Python: importing this needs no vLLM.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

# transformers' defaults for fields a generation config leaves unset (GenerationConfig docs).
HF_DEFAULTS = {
    "max_length": 20,
    "max_new_tokens": None,
    "min_length": 0,
    "min_new_tokens": None,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
    "num_return_sequences": 1,
    "eos_token_id": None,
}
TRANSLATED = tuple(HF_DEFAULTS) + ("pad_token_id", "seed", "generation_config")
# Kwargs that change nothing about the tokens sampled (pad ids are stripped from responses anyway).
NO_EFFECT = ("use_cache", "bos_token_id")
# Generation-config settings that change what HF samples and vLLM has no equivalent for,
# with the value that means "off".
UNTRANSLATABLE_CONFIG = {
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "force_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "exponential_decay_length_penalty": None, "encoder_repetition_penalty": 1.0, "guidance_scale": None,
    "renormalize_logits": False, "remove_invalid_values": False, "dola_layers": None, "stop_strings": None,
    "max_time": None, "token_healing": False, "watermarking_config": None, "length_penalty": 1.0,
}


def resolve(generation_kwargs: dict, model_generation_config=None) -> dict:
    """The effective value of every translated field, as `model.generate` would see it.

    Raises ValueError naming the first kwarg (or model generation-config field) that has no
    faithful vLLM translation.
    """
    unknown = [name for name in generation_kwargs if name not in TRANSLATED and name not in NO_EFFECT]
    if unknown:
        raise ValueError(
            f"generation kwarg {unknown[0]!r} has no faithful translation to vLLM's SamplingParams; "
            f"supported: {', '.join(TRANSLATED + NO_EFFECT)} (or use rollout_engine='hf')"
        )
    base = generation_kwargs.get("generation_config", model_generation_config)
    settings = dict(HF_DEFAULTS)
    if base is not None:
        for name, off in UNTRANSLATABLE_CONFIG.items():
            value = getattr(base, name, None)
            if value is not None and value != off:
                raise ValueError(f"generation_config.{name}={value!r} changes how Hugging Face samples and has "
                                 "no vLLM equivalent; unset it or use rollout_engine='hf'")
        for name in HF_DEFAULTS:
            value = getattr(base, name, None)
            if value is not None:
                settings[name] = value
    for name in HF_DEFAULTS:
        # a None kwarg means "unset" to HF, except eos_token_id=None: "no EOS, run to the limit"
        if name in generation_kwargs and (generation_kwargs[name] is not None or name == "eos_token_id"):
            settings[name] = generation_kwargs[name]
    settings["seed"] = generation_kwargs.get("seed")
    _check(settings)
    return settings


def sampling_params_kwargs(settings: dict, prompt_lengths: list, return_logprobs: bool,
                           max_new_tokens: Optional[list] = None) -> list:
    """One `SamplingParams(**kwargs)` dict per prompt, from `resolve`'s settings.

    prompt_lengths: tokens per prompt; max_new_tokens: an optional per-prompt override
    (`length_sampler`). Greedy (`do_sample=False`) is temperature 0. EOS handling is explicit:
    the resolved `eos_token_id`(s) are vLLM's stop tokens (kept in the output, as HF keeps
    its EOS) and vLLM's own EOS is ignored, so both engines stop on the same tokens.
    Request i of a seeded call gets seed + i: one seed for all would give identical prompts
    identical samples, where HF's one generator gives each row its own.
    """
    eos = settings["eos_token_id"]
    stop_ids = [] if eos is None else [int(eos)] if isinstance(eos, numbers.Integral) else [int(t) for t in eos]
    greedy = not settings["do_sample"]
    out = []
    for i, length in enumerate(prompt_lengths):
        if max_new_tokens is not None and max_new_tokens[i] is not None:
            max_tokens, limit = int(max_new_tokens[i]), "length_sampler"
        elif settings["max_new_tokens"] is not None:
            max_tokens, limit = int(settings["max_new_tokens"]), "max_new_tokens"
        else:
            max_tokens, limit = int(settings["max_length"]) - length, "max_length"
        if max_tokens < 1:
            raise ValueError(f"{limit} leaves no room for new tokens after a {length}-token query "
                             f"({max_tokens} new tokens); raise {limit} or use max_new_tokens")
        if settings["min_new_tokens"] is not None:
            min_tokens = int(settings["min_new_tokens"])
        else:
            min_tokens = max(0, int(settings["min_length"]) - length)
        kwargs = dict(
            n=int(settings["num_return_sequences"]),
            max_tokens=max_tokens,
            min_tokens=min(min_tokens, max_tokens),
            temperature=0.0 if greedy else float(settings["temperature"]),
            top_k=0 if greedy or not settings["top_k"] else int(settings["top_k"]),
            top_p=1.0 if greedy else float(settings["top_p"]),
            min_p=0.0 if greedy or settings["min_p"] is None else float(settings["min_p"]),
            repetition_penalty=float(settings["repetition_penalty"]),
            stop_token_ids=stop_ids,
            ignore_eos=True,
            detokenize=False,
            logprobs=0 if return_logprobs else None,
        )
        if settings["seed"] is not None:
            kwargs["seed"] = int(settings["seed"]) + i
        out.append(kwargs)
    return out


def _check(settings: dict) -> None:
    """Values HF would refuse (or that mean something else to vLLM), named."""
    def number(name, low=None, high=None, low_open=False):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"generation kwarg {name} must be a finite number, got {value!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise ValueError(f"generation kwarg {name} must be {'>' if low_open else '>='} {low}, got {value!r}")
        if high is not None and value > high:
            raise ValueError(f"generation kwarg {name} must be <= {high}, got {value!r}")

    def integer(name, low):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value) or value < low:
            raise ValueError(f"generation kwarg {name} must be an integer >= {low}, got {value!r}")

    if not isinstance(settings["do_sample"], bool):
        raise ValueError(f"generation kwarg do_sample must be True or False, got {settings['do_sample']!r}")
    for name, low in (("max_length", 1), ("min_length", -1), ("num_return_sequences", 1)):
        integer(name, low)
    for name in ("max_new_tokens", "min_new_tokens"):
        if settings[name] is not None:
            integer(name, 1 if name == "max_new_tokens" else 0)
    if settings["seed"] is not None:
        integer("seed", 0)
    if settings["top_k"] is not None:
        integer("top_k", 0)  # 0 (or None) = off, as TRL's quickstart passes it
    number("repetition_penalty", 0.0, low_open=True)
    if settings["do_sample"]:
        number("temperature", 0.0, low_open=True)
        number("top_p", 0.0, 1.0, low_open=True)
        if settings["min_p"] is not None:
            number("min_p", 0.0, 1.0)
    elif settings["num_return_sequences"] > 1:
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy decoding returns one sequence)")
    eos = settings["eos_token_id"]
    ids = [eos] if isinstance(eos, numbers.Integral) or eos is None else list(eos) if isinstance(eos, (list, tuple)) else None
    if ids is None or any(t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0)
                          for t in ids):
        raise ValueError(f"generation kwarg eos_token_id must be a token id, a list of them or None, got {eos!r}")
