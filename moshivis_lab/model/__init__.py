"""The Moshi LM (temporal + depth transformer, delays, streaming, hooks) and its checkpoints."""

from moshivis_lab.model.checkpoint import (
    count_parameters,
    load_moshi,
    load_weights,
    save_moshi,
)
from moshivis_lab.model.generate import Conversation, converse, timed_transcript
from moshivis_lab.model.hooks import ActivationCache, HookPoint, run_with_cache
from moshivis_lab.model.lm import LMOutput, MoshiLM, StreamingState, delay_codes, undelay
from moshivis_lab.model.sampling import sample_token

__all__ = [
    "ActivationCache",
    "Conversation",
    "HookPoint",
    "LMOutput",
    "MoshiLM",
    "StreamingState",
    "converse",
    "count_parameters",
    "delay_codes",
    "load_moshi",
    "load_weights",
    "run_with_cache",
    "sample_token",
    "save_moshi",
    "timed_transcript",
    "undelay",
]
