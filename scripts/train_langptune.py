"""LangPTune: the profile writer and the recommender that reads its profiles, trained in alternation.

    python scripts/train_langptune.py                      # cpu-demo: synthetic data, SmolLM2-135M-Instruct
    python scripts/train_langptune.py --writer-steps 0     # the baseline: zero-shot profiles, recommender trained
    python scripts/train_langptune.py --preset langptune-paper --data data/music --run-dir runs/lpt
    python scripts/train_langptune.py --run-dir runs/langptune --resume --iterations 3
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.config import exit_on_user_error, parse_config  # noqa: E402
from rl.distributed import exit_if_distributed  # noqa: E402
from rl.langptune_trainer import PRESETS, LangPTuneConfig, train  # noqa: E402
from rl.tracking import summary_line  # noqa: E402


def main(argv=None):
    with exit_on_user_error():  # a bad flag or a missing model/data path: one line and exit status 2
        cfg, preset = parse_config(LangPTuneConfig, PRESETS, argv, default_preset="cpu-demo")
        final = train(cfg, preset)
    if final and os.environ.get("RANK", "0") == "0":
        print(summary_line(final))


if __name__ == "__main__":
    main()
    exit_if_distributed()
