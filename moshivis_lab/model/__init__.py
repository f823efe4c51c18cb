"""The Moshi LM (temporal + depth transformer, delays, streaming, hooks), MoshiVis (the LM + image
prefix + gated cross-attention adapters) and their checkpoints."""

from moshivis_lab.model.adapters import (
    CrossAttention,
    GatedCrossAttention,
    ImageKV,
    ImagePrefix,
    XAGate,
)
from moshivis_lab.model.checkpoint import (
    count_parameters,
    load_moshi,
    load_weights,
    save_moshi,
)
from moshivis_lab.model.generate import Conversation, converse, timed_transcript
from moshivis_lab.model.hooks import ActivationCache, HookPoint, run_with_cache
from moshivis_lab.model.lm import LMOutput, MoshiLM, StreamingState, delay_codes, undelay
from moshivis_lab.model.moshivis import (
    MoshiVis,
    MoshiVisOutput,
    adapter_parameter_groups,
    adapter_parameters,
    count_adapter_parameters,
    freeze_for_adapters,
)
from moshivis_lab.model.sampling import sample_token
from moshivis_lab.model.vis_checkpoint import (
    encoder_keys,
    load_adapters,
    load_moshivis,
    load_moshivis_weights,
    read_moshivis_config,
    save_adapters,
    save_moshivis,
)

__all__ = [
    "ActivationCache",
    "Conversation",
    "CrossAttention",
    "GatedCrossAttention",
    "HookPoint",
    "ImageKV",
    "ImagePrefix",
    "LMOutput",
    "MoshiLM",
    "MoshiVis",
    "MoshiVisOutput",
    "StreamingState",
    "XAGate",
    "adapter_parameter_groups",
    "adapter_parameters",
    "converse",
    "count_adapter_parameters",
    "count_parameters",
    "delay_codes",
    "encoder_keys",
    "freeze_for_adapters",
    "load_adapters",
    "load_moshi",
    "load_moshivis",
    "load_moshivis_weights",
    "load_weights",
    "read_moshivis_config",
    "run_with_cache",
    "sample_token",
    "save_adapters",
    "save_moshi",
    "save_moshivis",
    "timed_transcript",
    "undelay",
]
