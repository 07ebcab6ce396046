"""GRPO training of DUET profile writers.

    python scripts/train_grpo.py                                   # cpu-demo: synthetic data, SmolLM2-135M
    torchrun --nproc_per_node=8 scripts/train_grpo.py --preset duet-paper --data data/music --run-dir runs/music
    python scripts/train_grpo.py --run-dir runs/grpo --resume       # continue from the last checkpoint
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.config import exit_on_user_error, parse_config  # noqa: E402
from rl.distributed import exit_if_distributed  # noqa: E402
from rl.tracking import summary_line  # noqa: E402
from rl.grpo_trainer import PRESETS, GRPOConfig, train  # noqa: E402


def main(argv=None):
    with exit_on_user_error():  # a bad flag or a missing model/data path: one line and exit status 2
        cfg, preset = parse_config(GRPOConfig, PRESETS, argv, default_preset="cpu-demo")
        final = train(cfg, preset)
    if final and os.environ.get("RANK", "0") == "0":
        print(summary_line(final))


if __name__ == "__main__":
    main()
    exit_if_distributed()
