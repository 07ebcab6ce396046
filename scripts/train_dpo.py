"""LettinGo: explore candidate profiles, score them, build preference pairs, train the profile writer with DPO.

    python scripts/train_dpo.py                                    # cpu-demo: all stages, synthetic data
    python scripts/train_dpo.py --stage explore --explorers smollm2-135m-instruct Qwen/Qwen3-0.6B
    torchrun --nproc_per_node=8 scripts/train_dpo.py --preset lettingo-paper --data data/music --stage train
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.config import exit_on_user_error, parse_config  # noqa: E402
from rl.distributed import exit_if_distributed  # noqa: E402
from rl.tracking import summary_line  # noqa: E402
from rl.dpo_trainer import PRESETS, DPOConfig, main as run  # noqa: E402


def main(argv=None):
    with exit_on_user_error():  # a bad flag or a missing model/data path: one line and exit status 2
        cfg, preset = parse_config(DPOConfig, PRESETS, argv, default_preset="cpu-demo")
        final = run(cfg, preset)
    if final and os.environ.get("RANK", "0") == "0":
        print(summary_line(final))


if __name__ == "__main__":
    main()
    exit_if_distributed()
