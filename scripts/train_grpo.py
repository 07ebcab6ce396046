"""GRPO training of DUET profile writers.

    python scripts/train_grpo.py                                   # cpu-demo: synthetic data, SmolLM2-135M
    torchrun --nproc_per_node=8 scripts/train_grpo.py --preset duet-paper --data data/music --run-dir runs/music
    python scripts/train_grpo.py --run-dir runs/grpo --resume       # continue from the last checkpoint
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.config import run_cli  # noqa: E402
from rl.distributed import exit_if_distributed  # noqa: E402
from rl.grpo_trainer import PRESETS, GRPOConfig, train  # noqa: E402


def main(argv=None):
    run_cli(GRPOConfig, PRESETS, train, argv)


if __name__ == "__main__":
    main()
    exit_if_distributed()
