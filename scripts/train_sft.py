"""SFT warm start of a profile writer, before GRPO, DPO or LangPTune: on its own best-of-N samples by reward
(rejection sampling), or on a teacher's (prompt, completion) pairs from a JSONL file.

    python scripts/train_sft.py                                          # cpu-demo: best of 8 on the GRPO demo's task
    python scripts/train_sft.py --lora-rank 16 --lr 1e-4 --run-dir runs/sft-lora
    python scripts/train_sft.py --source jsonl --pairs pairs.jsonl --run-dir runs/sft-teacher
    python scripts/train_grpo.py --init-adapter runs/sft-lora/checkpoints/step_24/adapter --lora-rank 16 --lr 1e-4
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.config import run_cli  # noqa: E402
from rl.distributed import exit_if_distributed  # noqa: E402
from rl.sft_trainer import PRESETS, SFTConfig, train  # noqa: E402


def main(argv=None):
    run_cli(SFTConfig, PRESETS, train, argv)


if __name__ == "__main__":
    main()
    exit_if_distributed()
