"""Looking inside MoshiVis: activations, gates, cross-attention maps, attributions.

- ``cache``: ``run_with_cache`` (detached tensors on the device you ask for), ``caching``
  (streaming), ``HOOK_DOCS`` / ``describe_hooks`` (every hook name documented in one place);
- ``gates``: gate traces per layer x step, dialogues with a topic switch, segmentation by turn /
  speaker / topic / relevance, the image-relevance AUROC, gate interventions and their effects;
- ``attention``: cross-attention maps over the image patches, mapped to pixels, the eager-path
  check and the pointing game against scene-graph boxes;
- ``attribution``: captum Integrated Gradients to pixels, image tokens and user audio, with
  completeness gaps and agreement with attention;
- ``report``: ``interp_report`` writes the headline numbers to ``data/<preset>/interp``.
"""

from moshivis_lab.interp.attention import (
    AttentionMaps,
    PointingItem,
    PointingResult,
    box_area_share,
    check_eager,
    cross_attention_maps,
    pointing_game,
    pointing_items,
    question_maps,
    upsample,
)
from moshivis_lab.interp.attribution import (
    Attribution,
    attention_agreement,
    attribute_image,
    attribute_user_audio,
    attribution_study,
    spoken_target,
    target_of,
)
from moshivis_lab.interp.cache import (
    HOOK_DOCS,
    caching,
    describe_hooks,
    hooks_table,
    image_tokens_for,
    load_image,
    run_with_cache,
)
from moshivis_lab.interp.gates import (
    GateIntervention,
    GateTrace,
    compare_stream_replies,
    compare_text_replies,
    force_gates,
    gate_trace,
    gate_traces,
    logit_shift,
    relevance_auroc,
    segment_summary,
    segment_trace,
    spoken_dialogue,
    switch_profile,
    text_dialogue,
)
from moshivis_lab.interp.report import interp_report

__all__ = [
    "HOOK_DOCS",
    "AttentionMaps",
    "Attribution",
    "GateIntervention",
    "GateTrace",
    "PointingItem",
    "PointingResult",
    "attention_agreement",
    "attribute_image",
    "attribute_user_audio",
    "attribution_study",
    "box_area_share",
    "caching",
    "check_eager",
    "compare_stream_replies",
    "compare_text_replies",
    "cross_attention_maps",
    "describe_hooks",
    "force_gates",
    "gate_trace",
    "gate_traces",
    "hooks_table",
    "image_tokens_for",
    "interp_report",
    "load_image",
    "logit_shift",
    "pointing_game",
    "pointing_items",
    "question_maps",
    "relevance_auroc",
    "run_with_cache",
    "segment_summary",
    "segment_trace",
    "spoken_dialogue",
    "spoken_target",
    "switch_profile",
    "target_of",
    "text_dialogue",
    "upsample",
]

# The conversation explorer's data and the prosody comparison (before / after adaptation).
from moshivis_lab.interp.conversation import (  # noqa: E402
    Conversation,
    ConversationEngine,
    record_conversation,
)
from moshivis_lab.interp.prosody import ProsodyReport, Rendition, prosody_report  # noqa: E402

__all__ += [
    "Conversation",
    "ConversationEngine",
    "ProsodyReport",
    "Rendition",
    "prosody_report",
    "record_conversation",
]
