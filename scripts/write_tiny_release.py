"""Write a tiny random MoshiVis directory in exactly the released file set (model.safetensors
with LM, adapters and SigLIP tower in bf16; Mimi in the moshi layout; the SentencePiece model),
for trying the moshika-vis switch without the 16 GB download:

    python scripts/write_tiny_release.py /tmp/moshika-vis-tiny
    MOSHIVIS_PRESET=moshika-vis MOSHIVIS_CHECKPOINT=/tmp/moshika-vis-tiny moshivis-lab converse

The tokenizer is the shipped tiny one (bases/tiny), so the text vocabulary is 1000.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moshivis_lab.bases import bases_root
from moshivis_lab.model.release import write_tiny_release


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the directory to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = bases_root() / "tiny" / "tokenizer" / "spm.model"
    out = write_tiny_release(args.out, tokenizer, seed=args.seed)
    for p in sorted(out.iterdir()):
        print(f"{p.stat().st_size / 1e6:8.2f} MB  {p}")


if __name__ == "__main__":
    main()
